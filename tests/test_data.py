"""Data pipeline: tokenizers, the token cache, window sampling, and the real loaders on local files."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wavetrain import compose_config
from wavetrain.data.datamodule import (Examples, SplitTokens, StreamWindows, TextDataModule, TokenStore,
                                       document_spans, pad_collate, sequential_spans)
from wavetrain.data.sources import DataError, format_chat
from wavetrain.data.tokenizers import ByteLevelBPETokenizer, CharTokenizer, load_tokenizer


def _datamodule(overrides: list[str]) -> TextDataModule:
    cfg = compose_config(overrides)
    return TextDataModule(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.seed)


def test_char_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = CharTokenizer()
    tok.train(["hello world", "xyz"])
    assert tok.decode(tok.encode("hello xyz")) == "hello xyz"
    assert tok.encode("Q") == [0]  # unseen character -> <unk>
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encode("world") == tok.encode("world")


def test_bpe_tokenizer_trains_with_special_tokens_first(tmp_path: Path) -> None:
    tok = ByteLevelBPETokenizer(300, 2, ["<pad>", "<unk>", "<s>", "</s>"])
    tok.train(["the quick brown fox jumps over the lazy dog " * 20] * 5)
    assert tok.backend.token_to_id("</s>") == 3 and tok.eos_id == 3 and tok.pad_id == 0
    text = "the lazy fox"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "bpe.json")
    assert load_tokenizer(tmp_path / "bpe.json").encode(text) == tok.encode(text)


def test_bpe_vocab_must_exceed_special_tokens() -> None:
    with pytest.raises(ValueError, match="must exceed its 4 special tokens"):
        ByteLevelBPETokenizer(4, 2, ["<pad>", "<unk>", "<s>", "</s>"])


def test_embedded_shakespeare_is_cached_and_reused(isolated_cache: Path) -> None:
    dm = _datamodule(["seq_len=64"])
    vocab = dm.prepare()
    assert vocab == 66  # 65 characters + <unk>
    train, val = dm.splits["train"], dm.splits["validation"]
    assert len(train) + len(val) == 1115394 and len(val) == 1115394 - int(1115394 * 0.9)
    assert isinstance(train.ids, np.memmap) and train.mask is None
    cached = sorted(p.name for p in dm.store.dir.iterdir())
    assert {"tokenizer.json", "train.bin", "validation.bin"} <= set(cached)
    assert not [p for p in cached if ".tmp" in p]
    again = _datamodule(["seq_len=64"])
    again.prepare()
    assert again.store.dir == dm.store.dir and np.array_equal(again.splits["train"].ids[:100], train.ids[:100])


def _split(n: int = 1000, docs: list[int] | None = None, mask: np.ndarray | None = None) -> SplitTokens:
    return SplitTokens(np.arange(n, dtype=np.uint16), np.asarray(docs or [0]), mask)


def test_stream_windows_depend_only_on_seed_and_index() -> None:
    a = StreamWindows(_split(), 16, seed=3, offset=0, length=10)
    b = StreamWindows(_split(), 16, seed=3, offset=5, length=5)
    assert all((a[5 + i][0] == b[i][0]).all() for i in range(5))  # sample g depends only on (seed, g)
    x, y = a[0]
    assert (y[:-1] == x[1:]).all() and len(x) == 16


def test_loss_mask_and_min_supervised_redraw() -> None:
    mask = np.zeros(1000, dtype=np.uint8)
    mask[500:520] = 1
    windows = StreamWindows(_split(mask=mask), 16, seed=0, offset=0, length=20, min_supervised=8)
    for i in range(20):
        x, y = windows[i]
        supervised = y != -100
        assert (y[supervised] == x[supervised] + 1).all()
        assert all(500 <= int(t) < 520 for t in y[supervised])


def test_sequential_and_document_spans() -> None:
    assert sequential_spans(10, 3) == [(0, 4), (4, 8)]
    # documents [0, 10) and [10, 13): windows at 0, 4, 8 of up to 5 tokens; the 1-token tail is dropped
    assert document_spans([(0, 10), (10, 13)], 4) == [(0, 5), (4, 9), (8, 10), (10, 13)]


def test_examples_reshuffle_per_epoch_and_resume_by_offset() -> None:
    spans = sequential_spans(100, 9)  # 10 windows
    full = Examples(_split(100), spans, seed=1, length=30)
    firsts = [int(full[i][0][0]) for i in range(30)]
    assert sorted(firsts[:10]) == sorted(firsts[10:20]) and firsts[:10] != firsts[10:20]
    resumed = Examples(_split(100), spans, seed=1, offset=13, length=17)
    assert [int(resumed[i][0][0]) for i in range(17)] == firsts[13:]


def test_pad_collate_pads_inputs_and_ignores_targets() -> None:
    x, y = pad_collate(0)([(torch.tensor([5, 6, 7]), torch.tensor([6, 7, 8])), (torch.tensor([9]), torch.tensor([1]))])
    assert x.tolist() == [[5, 6, 7], [9, 0, 0]] and y.tolist() == [[6, 7, 8], [1, -100, -100]]


def test_missing_local_path_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="does not exist"):
        _datamodule(["data.path=/nonexistent/corpus.txt"]).prepare()


@pytest.mark.parametrize("data", ["c4", "owt", "ultrachat", "wikitext2"])
def test_hub_corpora_offline_ask_for_a_local_copy(data: str) -> None:
    dm = _datamodule([f"data={data}", "scale=tiny"])
    with pytest.raises(DataError, match="needs network or a local copy: set data.path="):
        dm.prepare()


def test_c4_local_files_of_the_hub_schema(shared_data: Path, tmp_path: Path) -> None:
    # the OLMo sample names C4's timestamp "date": rename to the exact HF schema (SOURCES.md)
    rows = [json.loads(line) for line in gzip.open(shared_data / "c4" / "c4-sample.00000-of-00001.json.gz", "rt")]
    path = tmp_path / "c4-train.00000-of-00001.json.gz"
    with gzip.open(path, "wt") as handle:
        for row in rows[:300]:
            handle.write(json.dumps({"url": row["url"], "text": row["text"], "timestamp": row["date"]}) + "\n")
    dm = _datamodule(["data=c4", f"data.path={path}", "tokenizer=bpe", "tokenizer.vocab_size=500", "seq_len=64"])
    assert dm.prepare() == 500
    assert len(dm.splits["train"]) > 10 * len(dm.splits["validation"]) > 0
    assert dm.tokenizer.decode(dm.splits["train"].ids[:40].tolist()).startswith(rows[0]["text"][:20])


def test_c4_dummy_shard_with_timestamp_field(shared_data: Path) -> None:
    path = shared_data / "c4" / "c4-train.00000-of-01024.json.gz"
    cfg = compose_config(["data=c4", f"data.path={path}", "tokenizer=char"])
    store = TokenStore(cfg.data, cfg.tokenizer)
    docs = list(store.source.documents("train", str(path)))
    assert docs and all(isinstance(d, str) for d in docs)


def test_owt_local_text_files(shared_data: Path) -> None:
    dm = _datamodule(["data=owt", f"data.path={shared_data / 'openwebtext'}", "tokenizer=char", "seq_len=64"])
    dm.prepare()
    assert len(dm.splits["train"]) > len(dm.splits["validation"]) > 64


def test_ultrachat_local_jsonl_is_formatted_with_roles(shared_data: Path) -> None:
    path = shared_data / "ultrachat_200k" / "test_gen_sample_2.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    text = format_chat(first, 0)
    assert text.startswith("User: ") and "\nAssistant: " in text
    cfg = compose_config(["data=ultrachat", f"data.path={path}", "tokenizer=char"])
    docs = list(TokenStore(cfg.data, cfg.tokenizer).source.documents("train", str(path)))
    assert "".join(piece for piece, _ in docs[0]) == text  # (text, supervised) segments: assistant-only loss


def test_jsonl_row_missing_field_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "fine " * 50}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    dm = _datamodule(["data=owt", f"data.path={path}", "tokenizer=char"])
    with pytest.raises(DataError, match="row 1 has no field 'text'"):
        dm.prepare()


def test_empty_and_non_utf8_corpora_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="is empty"):
        _datamodule([f"data.path={empty}"]).prepare()
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00abc" * 100)
    with pytest.raises(DataError, match="not UTF-8"):
        _datamodule([f"data.path={binary}"]).prepare()


def test_corpus_shorter_than_one_window(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be " * 3)
    with pytest.raises(DataError, match="fewer than one window"):
        _datamodule([f"data.path={short}", "seq_len=256"]).prepare()
