"""Tokenise once, cache ids as memory-mapped arrays, serve training and evaluation examples.

Cache layout (``data.cache_dir``): ``<corpus>/<tokenizer>/tokenizer.json`` plus, per split, ``<split>.bin``
(uint16/uint32 ids of all documents concatenated, each followed by the end-of-sequence id when
``data.doc_separator: eos``), ``<split>.docs.npy`` (document start offsets), ``<split>.mask.bin`` (1 = supervised
target; only for sources with unsupervised segments, e.g. UltraChat's assistant-only loss) and ``<split>.json``
(sizes).  Keyed by (corpus fingerprint, tokenizer config, separator); files are written to a temporary name and
renamed, so an interrupted run never leaves a half-written cache.

Packings (``data.packing``):
- ``stream``: windows of seq_len+1 tokens at random offsets of the concatenated stream (nanoGPT; WDA, spec wda.md §4);
- ``sequential``: the stream cut into non-overlapping seq_len+1 windows, reshuffled every epoch (DWARF, dwarf.md §2);
- ``documents``: every document cut into windows starting at 0, T, 2T, … of up to T+1 tokens, right-padded per
  batch (x with the pad id, y with -100) (Wave Field WikiText-2 lines, wavefield.md §4; DWARF A–D, dwarf.md §2.A).

Training example g (counted over the whole run) depends only on (seed, g): a resumed run continues exactly where
it stopped, since the loader starts at g = global_step · accumulation · batch · world_size.  Evaluation examples
are identical in every run.
"""
from __future__ import annotations

import json
import logging
import math
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
from wavetrain.run.determinism import RunPositionSampler

log = logging.getLogger(__name__)
PACKINGS = ("stream", "sequential", "documents")
IGNORE = -100


def _atomic_save(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
    os.replace(tmp, path)


class SplitTokens:
    """One split's cached ids, document offsets and optional supervision mask."""

    def __init__(self, ids: np.ndarray, doc_starts: np.ndarray, mask: np.ndarray | None) -> None:
        self.ids, self.doc_starts, self.mask = ids, doc_starts, mask

    def __len__(self) -> int:
        return len(self.ids)

    def targets(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for ids[start:stop]: y is x shifted by one, -100 where the mask says unsupervised."""
        window = torch.from_numpy(self.ids[start:stop].astype(np.int64))
        y = window[1:].clone()
        if self.mask is not None:
            y[torch.from_numpy(self.mask[start + 1:stop].astype(bool)).logical_not()] = IGNORE
        return window[:-1], y

    def documents(self) -> list[tuple[int, int]]:
        ends = np.append(self.doc_starts[1:], len(self.ids))
        return list(zip(self.doc_starts.tolist(), ends.tolist()))


class TokenStore:
    """The tokenizer and the cached token streams of one corpus."""

    def __init__(self, data_cfg: DictConfig, tokenizer_cfg: DictConfig) -> None:
        self.data_cfg = data_cfg
        self.source = instantiate(data_cfg.source)
        path = data_cfg.get("path")
        self.path = str(Path(path).expanduser()) if path else None
        self.separator = data_cfg.get("doc_separator", "eos")
        if self.separator not in ("eos", "none"):
            raise DataError(f"data.doc_separator={self.separator!r}: use eos or none")
        corpus = f"{data_cfg.name}-{self.source.fingerprint(self.path)}"
        self.dir = Path(data_cfg.cache_dir).expanduser() / corpus / f"{tokenizer_key(tokenizer_cfg)}-{self.separator}"
        self.tokenizer_cfg = tokenizer_cfg

    def tokenizer(self):
        path = self.dir / "tokenizer.json"
        if path.exists():
            return load_tokenizer(path)
        tokenizer = build_tokenizer(self.tokenizer_cfg)
        if getattr(tokenizer, "needs_training", True):
            limit = self.tokenizer_cfg.get("train_docs")
            log.info("training the %s tokenizer on the train split of %s", self.tokenizer_cfg.kind, self.data_cfg.name)
            docs = (_plain_text(doc) for doc in self.source.documents("train", self.path))
            tokenizer.train(doc for i, doc in enumerate(docs) if limit is None or i < limit)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tokenizer.save(tmp)
        os.replace(tmp, path)
        return tokenizer

    def tokens(self, split: str, tokenizer) -> SplitTokens:
        """The split as memory-mapped arrays (encoded and cached on first use)."""
        meta_path = self.dir / f"{split}.json"
        if not meta_path.exists():
            self._encode_split(split, tokenizer, meta_path)
        meta = json.loads(meta_path.read_text())
        n, dtype = meta["length"], meta["dtype"]
        ids = np.memmap(self.dir / f"{split}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        starts = np.load(self.dir / f"{split}.docs.npy")
        mask = (np.memmap(self.dir / f"{split}.mask.bin", dtype=np.uint8, mode="r", shape=(n,))
                if meta["masked"] and n else None)
        return SplitTokens(ids, starts, mask)

    def _encode_split(self, split: str, tokenizer, meta_path: Path) -> None:
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
        eos = tokenizer.eos_id if self.separator == "eos" else None
        id_chunks, mask_chunks, starts, offset, masked = [], [], [], 0, False
        for docs in batched(self.source.documents(split, self.path)):
            for doc in docs:
                ids, mask = _encode_document(tokenizer, doc)
                masked = masked or not all(mask)
                if eos is not None:
                    ids.append(eos)
                    mask.append(mask[-1] if mask else True)
                starts.append(offset)
                offset += len(ids)
                id_chunks.append(np.asarray(ids, dtype=dtype))
                mask_chunks.append(np.asarray(mask, dtype=np.uint8))
        ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype)
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.dir / f"{split}.bin", lambda h: h.write(ids.tobytes()))
        _atomic_save(self.dir / f"{split}.docs.npy", lambda h: np.save(h, np.asarray(starts, dtype=np.int64)))
        if masked:
            mask = np.concatenate(mask_chunks)
            _atomic_save(self.dir / f"{split}.mask.bin", lambda h: h.write(mask.tobytes()))
        meta = {"length": int(ids.size), "dtype": np.dtype(dtype).name, "documents": len(starts), "masked": masked}
        _atomic_save(meta_path, lambda h: h.write(json.dumps(meta).encode()))
        log.info("cached %s/%s: %d documents, %d tokens", self.data_cfg.name, split, len(starts), ids.size)


def _plain_text(doc: str | list) -> str:
    return doc if isinstance(doc, str) else "".join(text for text, _ in doc)


def _encode_document(tokenizer, doc: str | list) -> tuple[list[int], list[bool]]:
    """A document is a string (all supervised) or a list of (text, supervised) segments encoded separately
    (UltraChat: role prefix, content and newline are tokenised separately, spec wda.md §4)."""
    if isinstance(doc, str):
        ids = tokenizer.encode(doc)
        return ids, [True] * len(ids)
    ids, mask = [], []
    for text, supervised in doc:
        piece = tokenizer.encode(text)
        ids += piece
        mask += [bool(supervised)] * len(piece)
    return ids, mask


class StreamWindows(Dataset):
    """Training windows of seq_len+1 tokens at offsets drawn from rng([seed, offset + i]); with a loss mask, a
    window is redrawn (up to 50 tries) until it has ``min_supervised`` supervised targets (spec wda.md §4)."""

    def __init__(self, split: SplitTokens, seq_len: int, seed: int, offset: int, length: int,
                 min_supervised: int = 0) -> None:
        self.split, self.seq_len, self.seed, self.offset, self.length = split, seq_len, seed, offset, length
        self.high = len(split) - seq_len - 1
        self.min_supervised = min_supervised if split.mask is not None else 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.offset + i])
        for _ in range(50):
            start = int(rng.integers(0, self.high + 1))
            x, y = self.split.targets(start, start + self.seq_len + 1)
            if (y != IGNORE).sum() >= self.min_supervised:
                break
        return x, y


class Examples(Dataset):
    """A fixed list of (start, stop) spans; training order is a fresh permutation per epoch, seeded by
    (seed, epoch), addressed by the run-wide example index so a resume lands on the same example."""

    def __init__(self, split: SplitTokens, spans: list[tuple[int, int]], *, seed: int | None = None,
                 offset: int = 0, length: int | None = None) -> None:
        if not spans and seed is not None:
            raise DataError("the train split yields no examples: use a smaller seq_len or a larger corpus")
        self.split, self.spans, self.seed, self.offset = split, spans, seed, offset
        self.length = len(spans) if length is None else length
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seed is None:
            return self.split.targets(*self.spans[i])
        epoch, position = divmod(self.offset + i, len(self.spans))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.spans))
        return self.split.targets(*self.spans[self._order[position]])


def sequential_spans(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping windows of seq_len+1 tokens (the stream truncated to a multiple, spec dwarf.md §2)."""
    width = seq_len + 1
    return [(s, s + width) for s in range(0, n_tokens - width + 1, width)]


def document_spans(documents: list[tuple[int, int]], seq_len: int) -> list[tuple[int, int]]:
    """Per document: windows starting at 0, T, 2T, … (while start < n−1) of up to T+1 tokens; windows shorter
    than 2 tokens dropped (spec wavefield.md §4, dwarf.md §2.A)."""
    spans = []
    for begin, end in documents:
        for start in range(begin, end - 1, seq_len):
            stop = min(start + seq_len + 1, end)
            if stop - start >= 2:
                spans.append((start, stop))
    return spans


def pad_collate(pad_id: int):
    """Right-pad a batch to its longest member: x with ``pad_id``, y with -100 (ignored by the loss)."""
    def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(x) for x, _ in batch)
        xs = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        ys = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
        for row, (x, y) in enumerate(batch):
            xs[row, :len(x)], ys[row, :len(y)] = x, y
        return xs, ys
    return collate


class TextDataModule(L.LightningDataModule):
    """Language-modelling data for any source, tokenizer and packing."""

    def __init__(self, data_cfg: DictConfig, tokenizer_cfg: DictConfig, seq_len: int, seed: int) -> None:
        super().__init__()
        self.packing = data_cfg.get("packing", "stream")
        if self.packing not in PACKINGS:
            raise DataError(f"data.packing={self.packing!r} is unknown: use one of {list(PACKINGS)}")
        if int(data_cfg.batch_size) <= 0:
            raise DataError(f"data.batch_size={data_cfg.batch_size} must be a positive number of sequences")
        self.cfg, self.seq_len, self.seed = data_cfg, int(seq_len), int(seed)
        self.store = TokenStore(data_cfg, tokenizer_cfg)
        self.tokenizer = None
        self.splits: dict[str, SplitTokens] = {}
        self.spans: dict[str, list[tuple[int, int]]] = {}

    def prepare(self) -> int:
        """Train/load the tokenizer and cache every split; returns the vocabulary size."""
        self.tokenizer = self.store.tokenizer()
        for split in ("train", "validation", "test"):
            self.splits[split] = self.store.tokens(split, self.tokenizer)
            if self.packing == "sequential":
                self.spans[split] = sequential_spans(len(self.splits[split]), self.seq_len)
            elif self.packing == "documents":
                self.spans[split] = document_spans(self.splits[split].documents(), self.seq_len)
        for split in ("train", "validation"):
            tokens = len(self.splits[split])
            if tokens < self.seq_len + 1 if self.packing != "documents" else not self.spans[split]:
                raise DataError(f"the {split} split of {self.cfg.name} has {tokens} tokens, fewer than one window "
                                f"of seq_len+1={self.seq_len + 1}: use a longer corpus or a smaller seq_len")
        return self.tokenizer.vocab_size

    def train_examples_per_epoch(self) -> int | None:
        """Examples in one pass over the train split (None for the endless ``stream`` packing)."""
        return len(self.spans["train"]) if self.packing != "stream" else None

    def has_split(self, split: str) -> bool:
        """Whether ``split`` holds at least one evaluation example."""
        return len(self._eval_dataset(split)) > 0 if len(self.splits[split]) > self.seq_len else False

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.prepare()

    def _loader(self, dataset: Dataset, sampler: RunPositionSampler | None = None) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        collate = pad_collate(self.tokenizer.pad_id) if self.packing == "documents" else None
        return DataLoader(dataset, batch_size=int(self.cfg.batch_size), shuffle=False, num_workers=workers,
                          persistent_workers=workers > 0, collate_fn=collate, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        # rows 0 .. max_steps·rows-per-step of the whole run; the sampler starts at the current step (resume)
        sampler = RunPositionSampler.for_trainer(self.trainer, int(self.cfg.batch_size))
        train = self.splits["train"]
        if self.packing == "stream":
            return self._loader(StreamWindows(train, self.seq_len, self.seed, 0, sampler.run_rows,
                                              int(self.cfg.get("min_supervised", 0))), sampler)
        return self._loader(Examples(train, self.spans["train"], seed=self.seed, length=sampler.run_rows), sampler)

    def _eval_dataset(self, split: str) -> Dataset:
        limit = self.cfg.get("val_windows")
        if self.packing == "stream":
            spans = sequential_spans(len(self.splits[split]), self.seq_len)
            if limit is not None and len(spans) > limit:  # evenly spaced subset covering the split
                spans = [spans[i * len(spans) // limit] for i in range(limit)]
        else:
            spans = self.spans[split][:limit] if limit is not None else self.spans[split]
        return Examples(self.splits[split], spans)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._eval_dataset("validation"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_dataset("test"))


def steps_for_epochs(examples_per_epoch: int, epochs: float, batch_size: int, accumulation: int, world: int) -> int:
    """Optimiser steps in ``epochs`` passes: ceil(examples / (batch · world)) micro-batches per epoch."""
    micro_per_epoch = math.ceil(examples_per_epoch / (batch_size * world))
    return max(1, math.ceil(micro_per_epoch * epochs / accumulation))
