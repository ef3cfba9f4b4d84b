"""GPT-2 byte-level BPE (50,257 ids), the WDA tokenizer (spec wda.md §4).

The reference uses ``GPT2TokenizerFast.from_pretrained("gpt2")`` with no special tokens added and no BOS/EOS
inserted anywhere; here the same vocabulary and merges are loaded through Hugging Face ``tokenizers``: from the
hub (``Tokenizer.from_pretrained("gpt2")``) or, offline, from a local ``tokenizer.json`` given by
``tokenizer.path``.  It is pretrained (``needs_training = False``); the token cache stores the loaded
tokenizer, so a corpus cached once keeps working without network.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

HUB_ID = "gpt2"
END_OF_TEXT = "<|endoftext|>"


class GPT2TokenizerError(ValueError):
    """The GPT-2 tokenizer could not be loaded: the message names the setting and the fix."""


class GPT2Tokenizer:
    """GPT-2 BPE through ``tokenizers``; ``source`` records where it came from (hub id or file path)."""

    kind = "gpt2"
    needs_training = False

    def __init__(self, backend, source: str) -> None:
        self.backend = backend
        self.source = source

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "GPT2Tokenizer":
        path = cfg.get("path")
        return cls.from_file(path) if path else cls.from_hub(str(cfg.get("hub_id") or HUB_ID))

    @classmethod
    def from_file(cls, path: str | Path) -> "GPT2Tokenizer":
        """A local Hugging Face ``tokenizer.json`` (e.g. the one of huggingface.co/gpt2)."""
        from tokenizers import Tokenizer

        file = Path(path).expanduser()
        if not file.is_file():
            raise GPT2TokenizerError(f"tokenizer.path={path} does not exist: point it at a tokenizer.json "
                                     f"(the file of huggingface.co/gpt2/resolve/main/tokenizer.json)")
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise GPT2TokenizerError(f"tokenizer.path={path} is not a Hugging Face tokenizer.json ({err}): "
                                     f"give the tokenizer.json of the gpt2 model") from err
        return cls(backend, str(file.resolve()))

    @classmethod
    def from_hub(cls, hub_id: str = HUB_ID) -> "GPT2Tokenizer":
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_pretrained(hub_id)
        except Exception as err:  # offline: OfflineModeIsEnabled, connection errors, missing cache, ...
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise GPT2TokenizerError(f"tokenizer=gpt2 could not load {hub_id!r} from the Hugging Face hub "
                                     f"({reason}): it needs network or a local tokenizer.json: set "
                                     f"tokenizer.path=/path/to/tokenizer.json") from err
        return cls(backend, hub_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def eos_id(self) -> int | None:
        """``<|endoftext|>`` (50256 in GPT-2); inserted between documents only with data.doc_separator=eos."""
        return self.backend.token_to_id(END_OF_TEXT)

    @property
    def pad_id(self) -> int:
        """GPT-2 has no pad token: padded inputs use ``<|endoftext|>`` (their targets are ignored anyway)."""
        eos = self.eos_id
        return 0 if eos is None else eos

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, path: Path) -> None:
        meta = {"kind": self.kind, "source": self.source, "backend": self.backend.to_str()}
        Path(path).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "GPT2Tokenizer":
        from tokenizers import Tokenizer

        meta = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(Tokenizer.from_str(meta["backend"]), meta["source"])
