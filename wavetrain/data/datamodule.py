"""Tokenise once, cache ids as memory-mapped arrays, serve training windows and deterministic eval windows.

Cache layout (``data.cache_dir``): ``<corpus>/<tokenizer>/tokenizer.json`` and ``<split>.bin`` (uint16 or uint32
ids, one concatenated stream; documents separated by the tokenizer's end-of-sequence id when it has one), keyed
by (corpus fingerprint, split, tokenizer config).  Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written cache behind.

Training windows: sample index g (counted over the whole run) -> a window of seq_len+1 tokens starting at a
position drawn from ``numpy.random.default_rng([seed, g])``.  The window a step sees depends only on (seed, g),
so a resumed run continues exactly where it stopped: the loader starts at g = global_step · accumulation ·
batch · world_size.  Validation/test windows are evenly spaced, non-overlapping and identical in every run.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from wavetrain.data.sources import DataError
from wavetrain.data.tokenizers import batched, build_tokenizer, load_tokenizer, tokenizer_key

log = logging.getLogger(__name__)


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


class TokenStore:
    """The tokenizer and the cached id stream of every split of one corpus."""

    def __init__(self, data_cfg: DictConfig, tokenizer_cfg: DictConfig) -> None:
        self.data_cfg = data_cfg
        self.source = instantiate(data_cfg.source)
        path = data_cfg.get("path")
        self.path = str(Path(path).expanduser()) if path else None
        corpus = f"{data_cfg.name}-{self.source.fingerprint(self.path)}"
        self.dir = Path(data_cfg.cache_dir).expanduser() / corpus / tokenizer_key(tokenizer_cfg)
        self.tokenizer_cfg = tokenizer_cfg

    def tokenizer(self):
        path = self.dir / "tokenizer.json"
        if path.exists():
            return load_tokenizer(path)
        tokenizer = build_tokenizer(self.tokenizer_cfg)
        limit = self.tokenizer_cfg.get("train_docs")
        log.info("training %s tokenizer on the train split of %s", self.tokenizer_cfg.kind, self.data_cfg.name)
        docs = self.source.documents("train", self.path)
        tokenizer.train(doc for i, doc in enumerate(docs) if limit is None or i < limit)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tokenizer.save(tmp)
        os.replace(tmp, path)
        return tokenizer

    def tokens(self, split: str, tokenizer) -> np.ndarray:
        """The split's id stream as a read-only memmap (built on first use)."""
        path = self.dir / f"{split}.bin"
        meta_path = self.dir / f"{split}.json"
        if not (path.exists() and meta_path.exists()):
            self._encode_split(split, tokenizer, path, meta_path)
        meta = json.loads(meta_path.read_text())
        if meta["length"] == 0:
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["length"],))

    def _encode_split(self, split: str, tokenizer, path: Path, meta_path: Path) -> None:
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        eos = tokenizer.eos_id
        chunks, n_docs = [], 0
        encode_batch = getattr(tokenizer, "encode_batch", None)
        for docs in batched(self.source.documents(split, self.path)):
            encoded = encode_batch(docs) if encode_batch else [tokenizer.encode(d) for d in docs]
            for ids in encoded:
                chunks.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=dtype))
            n_docs += len(docs)
        stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, stream.tobytes())
        _atomic_write_bytes(meta_path, json.dumps({"length": int(stream.size), "dtype": np.dtype(dtype).name,
                                                   "documents": n_docs}).encode())
        log.info("cached %s/%s: %d documents, %d tokens", self.data_cfg.name, split, n_docs, stream.size)


class RandomWindows(Dataset):
    """Training windows (x, y) of ``seq_len`` tokens at positions drawn from rng([seed, offset + i])."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, offset: int, length: int) -> None:
        self.tokens, self.seq_len, self.seed, self.offset, self.length = tokens, seq_len, seed, offset, length
        self.high = len(tokens) - seq_len - 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(np.random.default_rng([self.seed, self.offset + i]).integers(0, self.high + 1))
        window = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class EvalWindows(Dataset):
    """Evenly spaced, non-overlapping windows covering the split (at most ``max_windows``)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, max_windows: int | None) -> None:
        available = (len(tokens) - 1) // seq_len
        count = available if max_windows is None else min(available, max_windows)
        spacing = available // count if count else 1
        self.starts = [i * spacing * seq_len for i in range(count)]
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[i]
        window = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class TextDataModule(L.LightningDataModule):
    """Packed-stream language-modelling data for any source and tokenizer (``data.packing: stream``)."""

    def __init__(self, data_cfg: DictConfig, tokenizer_cfg: DictConfig, seq_len: int, seed: int) -> None:
        super().__init__()
        if data_cfg.get("packing", "stream") != "stream":
            raise DataError(f"data.packing={data_cfg.packing!r} is not supported by TextDataModule: use stream")
        if int(data_cfg.batch_size) <= 0:
            raise DataError(f"data.batch_size={data_cfg.batch_size} must be a positive number of sequences")
        self.cfg, self.seq_len, self.seed = data_cfg, int(seq_len), int(seed)
        self.store = TokenStore(data_cfg, tokenizer_cfg)
        self.tokenizer = None
        self.splits: dict[str, np.ndarray] = {}

    def prepare(self) -> int:
        """Train/load the tokenizer and cache every split; returns the vocabulary size."""
        self.tokenizer = self.store.tokenizer()
        for split in ("train", "validation", "test"):
            self.splits[split] = self.store.tokens(split, self.tokenizer)
        train = self.splits["train"]
        if len(train) < self.seq_len + 1:
            raise DataError(f"the train split of {self.cfg.name} has {len(train)} tokens, fewer than one window of "
                            f"seq_len+1={self.seq_len + 1}: use a longer corpus or a smaller seq_len")
        if len(self.splits["validation"]) < self.seq_len + 1:
            raise DataError(f"the validation split of {self.cfg.name} has {len(self.splits['validation'])} tokens, "
                            f"fewer than one window of seq_len+1={self.seq_len + 1}: use a smaller seq_len")
        return self.tokenizer.vocab_size

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.prepare()

    def _loader(self, dataset: Dataset) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        return DataLoader(dataset, batch_size=int(self.cfg.batch_size), shuffle=False, num_workers=workers,
                          persistent_workers=workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        micro_per_step = int(trainer.accumulate_grad_batches)
        world = int(trainer.world_size)
        per_micro = int(self.cfg.batch_size) * world
        offset = trainer.global_step * micro_per_step * per_micro
        remaining = max(int(trainer.max_steps) - trainer.global_step, 1) * micro_per_step * per_micro
        return self._loader(RandomWindows(self.splits["train"], self.seq_len, self.seed, offset, remaining))

    def val_dataloader(self) -> DataLoader:
        return self._loader(EvalWindows(self.splits["validation"], self.seq_len, self.cfg.get("val_windows")))

    def test_dataloader(self) -> DataLoader:
        return self._loader(EvalWindows(self.splits["test"], self.seq_len, self.cfg.get("val_windows")))
