"""Multi-query associative recall (MQAR), the synthetic task of HazyResearch's zoology (Arora, Eyuboglu et al.,
"Zoology: Measuring and improving recall in efficient language models", 2023, §3 and Figure 2).

One example of ``seq_len`` input tokens: ``num_kv_pairs`` key-value pairs, then the same keys queried again in a
random order at power-law distributed gaps; the target at a query position is that key's value::

    position:  0  1  2  3  4  5  6  7  8  9 10 11 12 13
    x:         k1 v1 k2 v2 .  .  k2 .  .  .  k1 .  .  .      (. = random filler tokens)
    y:         -  -  -  -  -  -  v2 -  -  -  v1 -  -  -      (- = -100: no loss, no accuracy)

Keys come from ids [1, vocab_size/2), values from [vocab_size/2, vocab_size); the keys of one example are distinct,
so each query has exactly one answer in its context.  Queries sit at even offsets ``2·gap`` after the pairs, with
``gap`` drawn without replacement from P(gap = g) ∝ (g+1)^(power_a−1) (small gaps likely, zoology's default
power_a = 0.01).  Fillers are uniform over the whole vocabulary (zoology's ``random_non_queries``).  Loss and
accuracy are computed on the query positions only (every other target is -100), so ``val/acc`` is recall accuracy.

The "tokenizer" is implicit: ids are the task's symbols and ``data.vocab_size`` sets the model's vocabulary
(``tokenizer=synthetic``, which data=mqar selects, records that no text tokenizer is involved).
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from wavetrain.data.sources import DataError
from wavetrain.run.determinism import RunPositionSampler

IGNORE = -100
SPLITS = ("train", "validation", "test")


def check_mqar_shape(vocab_size: int, num_kv_pairs: int, seq_len: int) -> None:
    """Reject shapes the task cannot fill, naming the fix."""
    if num_kv_pairs < 1:
        raise DataError(f"data.num_kv_pairs={num_kv_pairs} must be at least 1")
    if seq_len < 4 * num_kv_pairs:
        raise DataError(f"seq_len={seq_len} is too short for data.num_kv_pairs={num_kv_pairs}: the pairs take "
                        f"2·{num_kv_pairs} tokens and the queries another 2·{num_kv_pairs}; use seq_len >= "
                        f"{4 * num_kv_pairs} or fewer pairs")
    if vocab_size // 2 - 1 < num_kv_pairs or vocab_size - vocab_size // 2 < num_kv_pairs:
        raise DataError(f"data.vocab_size={vocab_size} has too few key ids ([1, {vocab_size // 2})) or value ids "
                        f"for {num_kv_pairs} distinct pairs: use data.vocab_size >= {2 * num_kv_pairs + 2}")


def _distinct_choice(rng: np.random.Generator, rows: int, population: int, k: int,
                     log_weights: np.ndarray | None = None, chunk: int = 2048) -> np.ndarray:
    """``rows`` × ``k`` distinct draws from range(population) in random order, each row sampled without
    replacement (successively, with probabilities ∝ exp(log_weights), via the Gumbel top-k trick)."""
    out = np.empty((rows, k), dtype=np.int64)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        scores = rng.gumbel(size=(n, population))
        if log_weights is not None:
            scores += log_weights
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)  # successive-sampling order
        out[start:start + n] = np.take_along_axis(top, order, axis=1)
    return out


def generate_mqar(num_examples: int, vocab_size: int, num_kv_pairs: int, seq_len: int,
                  seed: int | np.random.SeedSequence, power_a: float = 0.01,
                  random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_examples`` MQAR examples as (x, y), each (num_examples, seq_len) int64; y = -100 except at queries.

    Deterministic in ``seed``.  Same layout and distributions as zoology's ``multiquery_ar`` (num_passes=1)."""
    check_mqar_shape(vocab_size, num_kv_pairs, seq_len)
    if power_a <= 0:
        raise DataError(f"data.power_a={power_a} must be positive (1.0 = uniform gaps, 0.01 = zoology's default)")
    rng = np.random.default_rng(seed)
    context = 2 * num_kv_pairs
    key_vocab = vocab_size // 2
    keys = _distinct_choice(rng, num_examples, key_vocab - 1, num_kv_pairs) + 1
    values = _distinct_choice(rng, num_examples, vocab_size - key_vocab, num_kv_pairs) + key_vocab
    space = (seq_len - context) // 2  # query slots: even offsets 0, 2, ..., 2·(space−1) after the pairs
    log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps = _distinct_choice(rng, num_examples, space, num_kv_pairs, log_weights=log_p)
    filler = rng.integers(0, vocab_size, size=(num_examples, seq_len)) if random_non_queries else None
    x = filler if filler is not None else np.zeros((num_examples, seq_len), dtype=np.int64)
    y = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    x[:, 0:context:2], x[:, 1:context:2] = keys, values
    query_positions = context + 2 * gaps
    np.put_along_axis(x, query_positions, keys, axis=1)
    np.put_along_axis(y, query_positions, values, axis=1)
    return torch.from_numpy(x), torch.from_numpy(y)


class MQARExamples(Dataset):
    """A fixed set of examples.  With a seed (training) the order is a fresh permutation per epoch seeded by
    (seed, epoch) and addressed by the run-wide example index, so a resumed run continues on the same example."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, seed: int | None = None, offset: int = 0,
                 length: int | None = None) -> None:
        self.x, self.y, self.seed, self.offset = x, y, seed, offset
        self.length = len(x) if length is None else length
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.seed is None:
            return self.x[i], self.y[i]
        epoch, position = divmod(self.offset + i, len(self.x))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
        index = int(self._order[position])
        return self.x[index], self.y[index]


class MQARDataModule(L.LightningDataModule):
    """MQAR train/validation/test sets, plugged in through ``data.datamodule`` (same constructor and
    prepare()/train_examples_per_epoch()/has_split() as the text pipeline's TextDataModule).

    Each split is generated from its own stream of ``SeedSequence([data.seed, split index])``, so the splits never
    share a random stream and every run with the same data.seed sees identical data."""

    def __init__(self, data_cfg: DictConfig, tokenizer_cfg: DictConfig, seq_len: int, seed: int) -> None:
        super().__init__()
        if tokenizer_cfg.get("kind") != "synthetic":
            raise DataError(f"data=mqar generates token ids itself, but tokenizer={tokenizer_cfg.get('kind')} was "
                            f"chosen: use tokenizer=synthetic (data=mqar selects it; a later scale preset or "
                            f"command-line tokenizer=... overrode it)")
        if int(data_cfg.batch_size) <= 0:
            raise DataError(f"data.batch_size={data_cfg.batch_size} must be a positive number of sequences")
        self.cfg, self.seq_len = data_cfg, int(seq_len)
        self.data_seed = int(data_cfg.seed) if data_cfg.get("seed") is not None else int(seed)
        self.seed = int(seed)
        self.sizes = {"train": int(data_cfg.train_examples), "validation": int(data_cfg.val_examples),
                      "test": int(data_cfg.test_examples)}
        if self.sizes["train"] <= 0 or self.sizes["validation"] <= 0:
            raise DataError(f"data.train_examples={self.sizes['train']} and data.val_examples="
                            f"{self.sizes['validation']} must be positive")
        check_mqar_shape(int(data_cfg.vocab_size), int(data_cfg.num_kv_pairs), self.seq_len)
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self) -> int:
        """Generate every split (seconds at most); returns the vocabulary size (data.vocab_size)."""
        for index, split in enumerate(SPLITS):
            if self.sizes[split] > 0:
                self.splits[split] = generate_mqar(
                    self.sizes[split], int(self.cfg.vocab_size), int(self.cfg.num_kv_pairs), self.seq_len,
                    np.random.SeedSequence([self.data_seed, index]), float(self.cfg.power_a),
                    bool(self.cfg.random_non_queries))
        return int(self.cfg.vocab_size)

    def train_examples_per_epoch(self) -> int:
        """Examples in one pass over the train set (data.train_examples)."""
        return self.sizes["train"]

    def has_split(self, split: str) -> bool:
        """Whether ``split`` holds at least one example."""
        return self.sizes.get(split, 0) > 0

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.prepare()

    def _loader(self, dataset: Dataset, sampler: RunPositionSampler | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=int(self.cfg.batch_size), shuffle=False,
                          num_workers=int(self.cfg.get("num_workers", 0)), sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        # rows 0 .. max_steps·rows-per-step of the whole run; the sampler starts at the current step (resume)
        sampler = RunPositionSampler.for_trainer(self.trainer, int(self.cfg.batch_size))
        return self._loader(MQARExamples(*self.splits["train"], seed=self.seed, length=sampler.run_rows), sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(MQARExamples(*self.splits["validation"]))

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.splits:
            raise DataError("data.test_examples=0: no test split; set data.test_examples > 0 or run.test=false")
        return self._loader(MQARExamples(*self.splits["test"]))
