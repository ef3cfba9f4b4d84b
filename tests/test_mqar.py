"""MQAR (wavetrain/data/mqar.py): layout of keys, values and queries; loss only on queries; determinism; errors."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from wavetrain import compose_config
from wavetrain.data.mqar import IGNORE, MQARDataModule, generate_mqar
from wavetrain.data.sources import DataError
from wavetrain.train import build_datamodule, train

VOCAB, PAIRS, SEQ = 64, 6, 48


@pytest.fixture(scope="module")
def examples() -> tuple[torch.Tensor, torch.Tensor]:
    return generate_mqar(500, VOCAB, PAIRS, SEQ, seed=7)


def test_pairs_then_each_key_queried_once_with_its_value(examples) -> None:
    x, y = examples
    assert x.shape == y.shape == (500, SEQ) and x.dtype == y.dtype == torch.int64
    keys, values = x[:, 0:2 * PAIRS:2], x[:, 1:2 * PAIRS:2]
    assert ((keys >= 1) & (keys < VOCAB // 2)).all() and ((values >= VOCAB // 2) & (values < VOCAB)).all()
    assert (y[:, :2 * PAIRS] == IGNORE).all(), "no target inside the key-value context"
    for row in range(len(x)):
        assert len(set(keys[row].tolist())) == PAIRS, "keys of one example are distinct"
        answer = dict(zip(keys[row].tolist(), values[row].tolist()))
        queries = torch.nonzero(y[row] != IGNORE).flatten()
        assert len(queries) == PAIRS
        assert ((queries - 2 * PAIRS) % 2 == 0).all(), "queries at even offsets after the context"
        queried = x[row, queries].tolist()
        assert sorted(queried) == sorted(answer), "every key queried exactly once"
        assert y[row, queries].tolist() == [answer[k] for k in queried], "target = the queried key's value"
    assert ((x >= 0) & (x < VOCAB)).all()


def test_gaps_follow_the_power_law_and_fillers_are_random(examples) -> None:
    x, y = examples
    offsets = (torch.nonzero(y != IGNORE)[:, 1] - 2 * PAIRS) // 2
    space = (SEQ - 2 * PAIRS) // 2
    counts = torch.bincount(offsets, minlength=space).double()
    assert counts[0] > counts[space // 2:].mean() * 2, "small gaps are the most likely (power_a = 0.01)"
    filler = x[:, 2 * PAIRS:][y[:, 2 * PAIRS:] == IGNORE]
    assert len(torch.unique(filler)) > VOCAB * 0.9, "fillers span the vocabulary (random_non_queries)"
    uniform_x, uniform_y = generate_mqar(500, VOCAB, PAIRS, SEQ, seed=7, power_a=1.0, random_non_queries=False)
    uniform_offsets = (torch.nonzero(uniform_y != IGNORE)[:, 1] - 2 * PAIRS) // 2
    assert uniform_offsets.double().mean() > offsets.double().mean()
    assert (uniform_x[:, 2 * PAIRS:][uniform_y[:, 2 * PAIRS:] == IGNORE] == 0).all()


def test_deterministic_in_the_seed(examples) -> None:
    again = generate_mqar(500, VOCAB, PAIRS, SEQ, seed=7)
    other = generate_mqar(500, VOCAB, PAIRS, SEQ, seed=8)
    assert torch.equal(examples[0], again[0]) and torch.equal(examples[1], again[1])
    assert not torch.equal(examples[0], other[0])


def test_datamodule_splits_are_independent_and_follow_data_seed() -> None:
    cfg = compose_config(["data=mqar", f"seq_len={SEQ}", "data.train_examples=64", "data.val_examples=32",
                          "data.test_examples=16", "data.seed=3"])
    data = build_datamodule(cfg)
    assert isinstance(data, MQARDataModule) and data.prepare() == cfg.data.vocab_size
    assert data.train_examples_per_epoch() == 64 and data.has_split("test") and not data.has_split("other")
    train_x, val_x = data.splits["train"][0], data.splits["validation"][0]
    assert not torch.equal(train_x[:32], val_x)
    other_run = build_datamodule(compose_config(["data=mqar", f"seq_len={SEQ}", "data.train_examples=64",
                                                 "data.val_examples=32", "data.seed=3", "seed=99"]))
    other_run.prepare()
    assert torch.equal(other_run.splits["train"][0], train_x), "data.seed fixes the data whatever the run seed"


def test_loss_and_accuracy_count_only_query_positions(tmp_path: Path) -> None:
    cfg = compose_config(["data=mqar", "scale=tiny", f"seq_len={SEQ}", f"data.num_kv_pairs={PAIRS}",
                          f"data.vocab_size={VOCAB}", "data.train_examples=256", "data.val_examples=40",
                          "data.batch_size=16", "trainer.max_steps=4", "trainer.val_check_interval=4",
                          "optim.warmup_steps=1", "trainer.precision=32-true", "trainer.enable_progress_bar=false"])
    assert cfg.tokenizer.kind == "synthetic" and cfg.tokenizer.vocab_size == VOCAB
    results = train(cfg, run_dir=tmp_path)
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r.get("val/tokens")]
    assert float(rows[-1]["val/tokens"]) == 40 * PAIRS, "only the queries are scored"
    assert results["vocab_size"] == VOCAB and 0 <= results["val_acc"] <= 1
    assert results["val_loss"] == pytest.approx(np.log(VOCAB), rel=0.25), "4 steps: still near chance"


def test_bad_shapes_and_tokenizers_name_the_fix() -> None:
    with pytest.raises(DataError, match="seq_len >= 32"):
        generate_mqar(4, VOCAB, 8, 16, seed=0)
    with pytest.raises(DataError, match="data.vocab_size >= 18"):
        generate_mqar(4, 16, 8, 64, seed=0)
    with pytest.raises(DataError, match="tokenizer=synthetic"):
        build_datamodule(compose_config(["data=mqar", "tokenizer=char"]))
