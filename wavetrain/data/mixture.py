"""The C4 → UltraChat schedule of the WDA 130M run as one data module (spec wda.md §4, "Recommended reproduction").

Phase A (``phase_a_steps`` optimiser steps): C4 only, full loss.  Phase B (``phase_b_steps``, null = the rest of
``trainer.max_steps``): UltraChat with assistant-only loss; in its last ``mixed_fraction`` (10 %) every optimiser
step takes int(``mixed_main_share`` · rows) UltraChat rows (0.8 · 32 = 25) and the rest C4 rows (7), in a random
order within the step, as the reference's ``sample_mixed_batch`` does.  Validation and test use ``eval_corpus``
(UltraChat test_sft, assistant-only: the reported metric).

Both corpora are ordinary ``TokenStore`` caches with one shared tokenizer (the C4 store's: pretrained GPT-2 for
WDA; a trainable one is trained on the C4 train split).  Every training row is a ``StreamWindows`` draw, and which
corpus row g (counted over the whole run) comes from depends only on (seed, g): a resumed run continues exactly.
"""
from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from wavetrain.data.datamodule import Examples, SplitTokens, StreamWindows, TokenStore, sequential_spans
from wavetrain.data.sources import DataError
from wavetrain.run.determinism import RunPositionSampler

log = logging.getLogger(__name__)
CORPORA = ("c4", "ultrachat")
PRETRAIN, CHAT = 0, 1  # corpus codes of MixtureSchedule.corpus


class MixtureSchedule:
    """Which corpus each training row comes from, as a function of the run-wide row index only.

    ``rows_per_step`` is the global batch (micro-batch × accumulation × devices): row g belongs to optimiser step
    g // rows_per_step.  In the mixed part a seeded permutation of the step's rows marks the UltraChat ones."""

    def __init__(self, phase_a_steps: int, phase_b_steps: int, mixed_fraction: float, mixed_main_share: float,
                 rows_per_step: int, seed: int) -> None:
        if phase_a_steps < 0 or phase_b_steps < 0:
            raise DataError(f"data.phase_a_steps={phase_a_steps} and phase B ({phase_b_steps} steps) must be >= 0: "
                            f"give non-negative phase lengths (phase B = trainer.max_steps - phase_a_steps when "
                            f"data.phase_b_steps is null)")
        if not 0 <= mixed_fraction <= 1 or not 0 <= mixed_main_share <= 1:
            raise DataError(f"data.mixed_fraction={mixed_fraction} and data.mixed_main_share={mixed_main_share} "
                            f"must lie in [0, 1]")
        if rows_per_step <= 0:
            raise DataError(f"{rows_per_step} rows per optimiser step: data.batch_size must be positive")
        self.phase_a_steps = phase_a_steps
        self.mixed_start = phase_a_steps + int(round(phase_b_steps * (1 - mixed_fraction)))
        self.rows_per_step = rows_per_step
        self.chat_rows = int(mixed_main_share * rows_per_step)
        self.seed = seed

    def phase(self, step: int) -> str:
        """'pretrain' (C4 only), 'chat' (UltraChat only) or 'mixed' for optimiser step ``step`` (0-based)."""
        if step < self.phase_a_steps:
            return "pretrain"
        return "chat" if step < self.mixed_start else "mixed"

    def corpus(self, row: int) -> int:
        """PRETRAIN or CHAT for run-wide training row ``row``; steps after phase B keep the mix."""
        step, position = divmod(row, self.rows_per_step)
        phase = self.phase(step)
        if phase != "mixed":
            return PRETRAIN if phase == "pretrain" else CHAT
        order = np.random.default_rng([self.seed, 0x6D6978, step]).permutation(self.rows_per_step)
        return CHAT if order[position] < self.chat_rows else PRETRAIN


class MixtureWindows(Dataset):
    """Rows ``offset + i``: a window of the corpus the schedule picks, drawn from that corpus' own seeded stream
    (C4 with full loss; UltraChat assistant-only, redrawn until ``min_supervised`` targets)."""

    def __init__(self, windows: tuple[StreamWindows, StreamWindows], schedule: MixtureSchedule, offset: int,
                 length: int) -> None:
        self.windows, self.schedule, self.offset, self.length = windows, schedule, offset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.offset + i
        return self.windows[self.schedule.corpus(row)][row]


class PhasedMixtureDataModule(L.LightningDataModule):
    """``data=c4_ultrachat``: the TextDataModule constructor and interface over two corpora (module docstring)."""

    def __init__(self, data_cfg: DictConfig, tokenizer_cfg: DictConfig, seq_len: int, seed: int) -> None:
        super().__init__()
        if int(data_cfg.batch_size) <= 0:
            raise DataError(f"data.batch_size={data_cfg.batch_size} must be a positive number of sequences")
        if data_cfg.eval_corpus not in CORPORA:
            raise DataError(f"data.eval_corpus={data_cfg.eval_corpus!r} is unknown: use one of {list(CORPORA)}")
        for name in CORPORA:
            if data_cfg[name].get("packing", "stream") != "stream":
                raise DataError(f"data.{name}.packing={data_cfg[name].packing!r}: the mixture samples stream "
                                f"windows; set data.{name}.packing=stream")
        self.cfg, self.seq_len, self.seed = data_cfg, int(seq_len), int(seed)
        self.stores = {name: TokenStore(data_cfg[name], tokenizer_cfg) for name in CORPORA}
        self.tokenizer = None
        self.splits: dict[str, dict[str, SplitTokens]] = {}

    def prepare(self) -> int:
        """Load (or train on C4) the shared tokenizer and cache every split of both corpora; returns the vocab."""
        pretrain, chat = self.stores["c4"], self.stores["ultrachat"]
        self.tokenizer = pretrain.tokenizer()
        if getattr(self.tokenizer, "needs_training", True):  # ids from a C4-trained vocabulary: own cache folder
            chat.dir = chat.dir.with_name(f"{chat.dir.name}-vocab-{pretrain.dir.parent.name}")
        for name, store in self.stores.items():
            self.splits[name] = {split: store.tokens(split, self.tokenizer) for split in ("train", "validation",
                                                                                          "test")}
            for split in ("train",) if name != self.cfg.eval_corpus else ("train", "validation"):
                tokens = len(self.splits[name][split])
                if tokens < self.seq_len + 1:
                    raise DataError(f"the {split} split of {store.data_cfg.name} has {tokens} tokens, fewer than "
                                    f"one window of seq_len+1={self.seq_len + 1}: use a longer corpus or a smaller "
                                    f"seq_len")
        return self.tokenizer.vocab_size

    def train_examples_per_epoch(self) -> int | None:
        """Stream windows have no epoch: the run length is trainer.max_steps."""
        return None

    def has_split(self, split: str) -> bool:
        """Whether the evaluation corpus' ``split`` holds at least one window."""
        return len(self.splits[self.cfg.eval_corpus][split]) > self.seq_len

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.prepare()

    def schedule(self, max_steps: int, rows_per_step: int) -> MixtureSchedule:
        """The row schedule of a run of ``max_steps`` optimiser steps of ``rows_per_step`` rows."""
        phase_a = int(self.cfg.phase_a_steps)
        phase_b = self.cfg.phase_b_steps
        phase_b = max(int(max_steps) - phase_a, 0) if phase_b is None else int(phase_b)
        return MixtureSchedule(phase_a, phase_b, float(self.cfg.mixed_fraction), float(self.cfg.mixed_main_share),
                               rows_per_step, self.seed)

    def training_rows(self, rows_per_step: int, max_steps: int, offset: int, length: int) -> MixtureWindows:
        """Training rows offset … offset+length-1 of a run (the dataset behind train_dataloader)."""
        windows = tuple(StreamWindows(self.splits[name]["train"], self.seq_len, self.seed + index, 0,
                                      offset + length, int(self.cfg[name].get("min_supervised", 0)))
                        for index, name in enumerate(CORPORA))
        return MixtureWindows(windows, self.schedule(max_steps, rows_per_step), offset, length)

    def _loader(self, dataset: Dataset, sampler: RunPositionSampler | None = None) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        return DataLoader(dataset, batch_size=int(self.cfg.batch_size), shuffle=False, num_workers=workers,
                          persistent_workers=workers > 0, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        per_step = int(trainer.accumulate_grad_batches) * int(self.cfg.batch_size) * int(trainer.world_size)
        # rows 0 .. max_steps·per_step of the whole run; the sampler starts at the current step (resume)
        sampler = RunPositionSampler.for_trainer(trainer, int(self.cfg.batch_size))
        rows = self.training_rows(per_step, int(trainer.max_steps), 0, sampler.run_rows)
        schedule = rows.schedule
        log.info("c4_ultrachat: steps [0, %d) C4, [%d, %d) UltraChat, from %d mixed %d/%d rows per step",
                 schedule.phase_a_steps, schedule.phase_a_steps, schedule.mixed_start, schedule.mixed_start,
                 schedule.chat_rows, per_step)
        return self._loader(rows, sampler)

    def _eval_dataset(self, split: str) -> Examples:
        tokens = self.splits[self.cfg.eval_corpus][split]
        spans = sequential_spans(len(tokens), self.seq_len)
        limit = self.cfg.get("val_windows")
        if limit is not None and len(spans) > limit:  # evenly spaced subset covering the split
            spans = [spans[i * len(spans) // limit] for i in range(limit)]
        return Examples(tokens, spans)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._eval_dataset("validation"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_dataset("test"))
