"""Exact resume: the training steps' own RNG stream and the run-position sampler (the data position).

What makes a resumed run bitwise identical to an uninterrupted one:

- model, optimizer, LR scheduler and loop counters: Lightning's checkpoint;
- the data position: training row g depends only on (seed, g) (wavetrain/data/datamodule.py) and
  :class:`RunPositionSampler` makes the loader span the whole run and start at g = global_step · rows per step, so
  Lightning's restored batch counters and the loader agree;
- randomness: training steps draw from their own RNG stream (:class:`TrainingRandomness`), saved in every
  checkpoint, so evaluation, loader start-up or a resumption never shift the dropout masks of later steps.

On the CPU a resumed run's final validation loss equals the uninterrupted run's bit for bit
(tests/test_reliability.py).  On a GPU the same state is restored (CUDA RNG states included); with
``trainer.deterministic=true`` the continuation is expected to be bitwise identical as well, while with the
default nondeterministic kernels (atomic-add reductions in some backward passes) two *uninterrupted* runs already
differ in the last bits, and a resumed run agrees with the uninterrupted one only to that run-to-run noise.  That
tolerance is not measured here (no GPU in these tests): size it by comparing two uninterrupted runs.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DistributedSampler


def _rng_states() -> dict:
    """Every generator's state, as tensors and plain values (checkpoints stay loadable with weights_only=True)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position,
                                                       has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainingRandomness(L.Callback):
    """Training steps (dropout, stochastic attention) draw from their own RNG stream (torch, CUDA, numpy, python),
    swapped in around every training batch and saved in every checkpoint.  Draws made elsewhere (data-loader
    start-up, validation) therefore never shift it, and a resumed run continues the stream exactly."""

    def __init__(self) -> None:
        self.stream: dict | None = None
        self._outside: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._outside = _rng_states()
        if self.stream is not None:
            _set_rng_states(self.stream)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.stream = _rng_states()
        if self._outside is not None:
            _set_rng_states(self._outside)

    def state_dict(self) -> dict:
        return {"stream": self.stream}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stream = state_dict.get("stream")


class RunPositionSampler(DistributedSampler):
    """Indices of the training rows of one rank for a whole run, starting at the current optimiser step.

    Row g of the run (0 ≤ g < max_steps · rows per step) goes to rank g mod W as its (g div W)-th row — the order a
    DistributedSampler without shuffling gives over the whole run — and iteration starts at row
    global_step · rows per step, so a resumed run continues exactly.  Its length is the whole run, which is what
    Lightning's restored batch counters expect of a resumed loader.  A ``DistributedSampler`` so that Lightning
    keeps it rather than wrapping it in another one."""

    def __init__(self, rank_rows: int, start_row: int, rank: int = 0, world: int = 1) -> None:
        # not DistributedSampler.__init__: that sizes itself from a dataset and needs a process group
        self.rank_rows, self.start_row, self.rank, self.num_replicas = rank_rows, start_row, rank, world
        self.epoch, self.shuffle, self.drop_last = 0, False, False

    @classmethod
    def for_trainer(cls, trainer: L.Trainer, batch_size: int) -> RunPositionSampler:
        accumulation = int(trainer.accumulate_grad_batches)
        return cls(int(trainer.max_steps) * accumulation * batch_size, trainer.global_step * accumulation * batch_size,
                   int(trainer.global_rank), int(trainer.world_size))

    @property
    def run_rows(self) -> int:
        """Rows of the whole run over all ranks: the length the training dataset must have."""
        return self.rank_rows * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank + self.start_row * self.num_replicas, self.run_rows, self.num_replicas))

    def __len__(self) -> int:
        return self.rank_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


