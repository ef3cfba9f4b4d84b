"""Tokenizers: text <-> ids, trained on the train split and cached beside the token cache.

Every tokenizer has the same small interface: ``train(texts)``, ``encode(text)``, ``decode(ids)``,
``vocab_size``, ``save(path)`` / ``load(path)``, and the special ids it defines (``pad_id``, ``eos_id`` or None).
``TOKENIZERS`` maps each ``tokenizer.kind`` to its class; ``build_tokenizer`` builds an untrained one from config.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class CharTokenizer:
    """One id per distinct character of the training text; id 0 is <unk> for characters never seen in training."""

    kind = "char"
    pad_id = 0
    eos_id = None

    def __init__(self, chars: Sequence[str] = ()) -> None:
        self.chars = list(chars)
        self._ids = {c: i + 1 for i, c in enumerate(self.chars)}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "CharTokenizer":
        return cls()

    def train(self, texts: Iterable[str]) -> None:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise ValueError("cannot train the char tokenizer: the training split has no text")
        self.__init__(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, 0) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd" for i in ids)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"kind": self.kind, "chars": self.chars}), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "CharTokenizer":
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["chars"])


class ByteLevelBPETokenizer:
    """Hugging Face ``tokenizers`` byte-level BPE (ByteLevel pre-tokenizer, add_prefix_space=False, ByteLevel
    decoder, BpeTrainer with the configured special tokens first), as in spec dwarf.md §2 and wavefield.md §8."""

    kind = "bpe"

    def __init__(self, vocab_size: int, min_frequency: int = 2, special_tokens: Sequence[str] = ("<pad>",),
                 backend=None) -> None:
        if vocab_size <= len(special_tokens):
            raise ValueError(f"tokenizer.vocab_size={vocab_size} must exceed its {len(special_tokens)} special "
                             f"tokens {list(special_tokens)}: raise tokenizer.vocab_size")
        self.target_vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.special_tokens = list(special_tokens)
        self.backend = backend

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ByteLevelBPETokenizer":
        return cls(int(cfg.vocab_size), int(cfg.get("min_frequency", 2)), list(cfg.get("special_tokens", ["<pad>"])))

    def train(self, texts: Iterable[str]) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=self.target_vocab_size, min_frequency=self.min_frequency,
                                      special_tokens=self.special_tokens, show_progress=False)
        backend.train_from_iterator(texts, trainer=trainer)
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size() if self.backend is not None else self.target_vocab_size

    def _special_id(self, candidates: tuple[str, ...]) -> int | None:
        for token in candidates:
            if token in self.special_tokens:
                return self.special_tokens.index(token)
        return None

    @property
    def pad_id(self) -> int:
        return self._special_id(("<pad>", "<PAD>")) or 0

    @property
    def eos_id(self) -> int | None:
        return self._special_id(("</s>", "<eos>", "<EOS>"))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def save(self, path: Path) -> None:
        meta = {"kind": self.kind, "min_frequency": self.min_frequency, "special_tokens": self.special_tokens,
                "target_vocab_size": self.target_vocab_size, "backend": self.backend.to_str()}
        Path(path).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "ByteLevelBPETokenizer":
        from tokenizers import Tokenizer

        meta = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(meta["target_vocab_size"], meta["min_frequency"], meta["special_tokens"],
                   Tokenizer.from_str(meta["backend"]))


def _registry() -> dict[str, type]:
    from wavetrain.data.gpt2 import GPT2Tokenizer
    from wavetrain.data.wordchar import WordCharTokenizer

    return {"char": CharTokenizer, "bpe": ByteLevelBPETokenizer, "wordchar": WordCharTokenizer,
            "gpt2": GPT2Tokenizer}


TOKENIZERS: dict[str, type] = _registry()


def build_tokenizer(cfg: DictConfig):
    """An untrained tokenizer of kind ``cfg.kind``."""
    if cfg.kind not in TOKENIZERS:
        raise ValueError(f"tokenizer.kind={cfg.kind!r} is unknown: choose one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[cfg.kind].from_config(cfg)


def load_tokenizer(path: Path):
    kind = json.loads(Path(path).read_text(encoding="utf-8"))["kind"]
    return TOKENIZERS[kind].load(path)


def tokenizer_key(cfg: DictConfig) -> str:
    """Stable short name of a tokenizer config, used in cache file names."""
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
    return f"{cfg.kind}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def batched(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
