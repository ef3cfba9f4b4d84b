"""WDA runs beyond the module (spec wda.md §3–§5): the 130M preset, the GPT-2 tokenizer, UltraChat chat formatting
with assistant-only loss, the C4 → UltraChat mixture, the WDA optimiser recipe, and short WDA training runs."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from tokenizers import Tokenizer

from wavetrain import build_model, compose_config
from wavetrain.data.datamodule import IGNORE, StreamWindows, TextDataModule
from wavetrain.data.gpt2 import GPT2Tokenizer, GPT2TokenizerError
from wavetrain.data.mixture import CHAT, PRETRAIN, MixtureSchedule, PhasedMixtureDataModule
from wavetrain.data.sources import DataError, chat_segments, format_chat
from wavetrain.data.tokenizers import build_tokenizer, load_tokenizer
from wavetrain.lightning_module import lr_factor, parameter_groups
from wavetrain.models.attention.wda import WaveDensityAttention
from wavetrain.models.lm import count_parameters
from wavetrain.train import build_datamodule, train

ROLE_PREFIX = {"user": "User: ", "assistant": "Assistant: ", "system": "System: "}


def _fixture_rows(shared_data: Path) -> list[dict]:
    folder = shared_data / "ultrachat_200k"
    return [json.loads(line) for name in ("test_gen_sample.jsonl", "test_gen_sample_2.jsonl")
            for line in (folder / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def gpt2_style_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE in GPT-2's layout (ByteLevel pre-tokenizer/decoder, <|endoftext|> as the last id),
    saved as a Hugging Face tokenizer.json: the stand-in for huggingface.co/gpt2's file in offline tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["User: what is the capital of France?\nAssistant: The capital of France is Paris.\n"] * 20
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    backend.save(str(path))
    return path


@pytest.fixture(scope="module")
def local_corpora(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """C4 rows in the exact HF schema (the OLMo sample's ``date`` renamed ``timestamp``, SOURCES.md) and 40
    UltraChat rows of the exact schema cycling the 10 real fixture rows (distinct prompt_ids)."""
    folder = tmp_path_factory.mktemp("corpora")
    c4_rows = [json.loads(line) for line in gzip.open(shared_data / "c4" / "c4-sample.00000-of-00001.json.gz", "rt")]
    c4 = folder / "c4-train.00000-of-00001.json.gz"
    with gzip.open(c4, "wt") as handle:
        for row in c4_rows[:200]:
            handle.write(json.dumps({"url": row["url"], "text": row["text"], "timestamp": row["date"]}) + "\n")
    chat_rows = _fixture_rows(shared_data)
    ultrachat = folder / "train_sft.jsonl"
    with open(ultrachat, "w") as handle:
        for i in range(40):
            row = dict(chat_rows[i % len(chat_rows)], prompt_id=hashlib.sha256(str(i).encode()).hexdigest())
            handle.write(json.dumps(row) + "\n")
    return {"c4": c4, "ultrachat": ultrachat}


# --------------------------------------------------------------------------- the 130M preset (spec §3, §8.6-7)
def test_130m_preset_parameter_and_wave_counts() -> None:
    cfg = compose_config(["attention=wda", "scale=130m"])
    assert cfg.tokenizer.kind == "gpt2" and cfg.tokenizer.vocab_size == 50257 and cfg.seq_len == 256
    model = build_model(cfg)  # no download: the tokenizer config declares its vocabulary size
    waves = sum(p.numel() for m in model.modules() if isinstance(m, WaveDensityAttention)
                for p in m.wave_parameters())
    total = count_parameters(model)
    assert total == 131_508_032 and waves == 16_384
    assert 0.0001245 < waves / total < 0.00013  # 0.0125 %: the paper's "< 0.01 %" is slightly wrong
    del model
    assert count_parameters(build_model(compose_config(["attention=wda", "scale=130m", "model.tie_head=true"]))) \
        == 92_910_656


# --------------------------------------------------------------------------- tokenizer=gpt2 (spec §4)
def test_gpt2_tokenizer_from_a_local_tokenizer_json(gpt2_style_tokenizer_json: Path, tmp_path: Path) -> None:
    cfg = compose_config(["tokenizer=gpt2", f"tokenizer.path={gpt2_style_tokenizer_json}"])
    tok = build_tokenizer(cfg.tokenizer)
    assert isinstance(tok, GPT2Tokenizer) and tok.needs_training is False
    size = Tokenizer.from_file(str(gpt2_style_tokenizer_json)).get_vocab_size()
    assert tok.vocab_size == size and tok.eos_id == size - 1 == tok.pad_id  # <|endoftext|> last, as in GPT-2
    text = "Assistant: The capital of Spain is Madrid.\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eos_id not in ids  # no special token is added
    tok.save(tmp_path / "saved.json")
    again = load_tokenizer(tmp_path / "saved.json")
    assert isinstance(again, GPT2Tokenizer) and again.encode(text) == ids
    assert again.source == str(gpt2_style_tokenizer_json.resolve())


def test_gpt2_tokenizer_offline_without_a_path_names_the_fix() -> None:
    with pytest.raises(GPT2TokenizerError, match="needs network or a local tokenizer.json: set tokenizer.path="):
        build_tokenizer(compose_config(["tokenizer=gpt2"]).tokenizer)


def test_gpt2_tokenizer_bad_local_files(tmp_path: Path) -> None:
    with pytest.raises(GPT2TokenizerError, match="does not exist"):
        build_tokenizer(compose_config(["tokenizer=gpt2", f"tokenizer.path={tmp_path / 'missing.json'}"]).tokenizer)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(GPT2TokenizerError, match="is not a Hugging Face tokenizer.json"):
        build_tokenizer(compose_config(["tokenizer=gpt2", f"tokenizer.path={broken}"]).tokenizer)


# --------------------------------------------------------------------------- UltraChat formatting (spec §4)
def test_chat_segments_on_the_fixture_rows(shared_data: Path) -> None:
    rows = _fixture_rows(shared_data)
    assert len(rows) == 10
    for index, row in enumerate(rows):
        segments = chat_segments(row, index)
        expected = [(ROLE_PREFIX[m["role"]], False) for m in row["messages"]]
        assert [s for s in segments[0::3]] == expected  # prefixes, never supervised (130M run)
        assert [text for text, _ in segments[1::3]] == [m["content"].strip() for m in row["messages"]]
        assert [sup for _, sup in segments[1::3]] == [m["role"] == "assistant" for m in row["messages"]]
        assert segments[2::3] == [("\n", False)] * len(row["messages"])
        assert format_chat(row, index) == "".join(f"{ROLE_PREFIX[m['role']]}{m['content'].strip()}\n"
                                                  for m in row["messages"])
        with_prefix = chat_segments(row, index, include_assistant_prefix_in_loss=True)
        assert [sup for _, sup in with_prefix[0::3]] == [m["role"] == "assistant" for m in row["messages"]]


def test_chat_segments_aliases_stripping_and_empty_turns() -> None:
    row = {"messages": [{"role": "system", "content": " Be brief. "}, {"role": "Human", "content": "hi\n"},
                        {"role": "gpt", "content": "  hello  "}, {"role": "user", "content": "   "},
                        {"role": "bot", "content": "bye"}, {"from": "human", "value": "sharegpt turn"}]}
    assert chat_segments(row, 0) == [
        ("System: ", False), ("Be brief.", False), ("\n", False),
        ("User: ", False), ("hi", False), ("\n", False),
        ("Assistant: ", False), ("hello", True), ("\n", False),
        ("Assistant: ", False), ("bye", True), ("\n", False),
        ("User: ", False), ("sharegpt turn", False), ("\n", False)]
    assert chat_segments({"messages": [{"role": "user", "content": " "}]}, 0) == []
    with pytest.raises(DataError, match="row 7 has no list field 'messages'"):
        chat_segments({"prompt": "x"}, 7)


def test_assistant_only_loss_masks_through_the_token_cache(local_corpora: dict[str, Path],
                                                           gpt2_style_tokenizer_json: Path) -> None:
    path = local_corpora["ultrachat"]  # the fixture rows, cycled to 40 so that the carved splits are not empty
    cfg = compose_config(["data=ultrachat", f"data.path={path}", "tokenizer=gpt2",
                          f"tokenizer.path={gpt2_style_tokenizer_json}", "seq_len=64"])
    assert cfg.data.doc_separator == "none" and cfg.data.min_supervised == 8
    dm = TextDataModule(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.seed)
    assert dm.prepare() == Tokenizer.from_file(str(gpt2_style_tokenizer_json)).get_vocab_size()  # not trained
    tok, train = dm.tokenizer, dm.splits["train"]
    # the cache holds every segment encoded separately, conversations back to back with no EOS (spec §4)
    docs = list(dm.store.source.documents("train", str(path)))
    expected_ids, expected_mask = [], []
    for doc in docs:
        for text, supervised in doc:
            piece = tok.encode(text)
            expected_ids += piece
            expected_mask += [supervised] * len(piece)
    assert train.ids.tolist() == expected_ids and train.mask.astype(bool).tolist() == expected_mask
    # supervised targets decode to assistant content only, never to a role prefix, a newline or a user turn
    supervised_text = tok.decode([i for i, m in zip(expected_ids, expected_mask) if m])
    assistant_text = "".join(text for doc in docs for text, sup in doc if sup)
    assert supervised_text == assistant_text and "User:" not in supervised_text
    windows = StreamWindows(train, 64, seed=0, offset=0, length=20, min_supervised=8)
    for i in range(20):
        x, y = windows[i]
        assert (y != IGNORE).sum() >= 8 and ((y[:-1] == IGNORE) | (y[:-1] == x[1:])).all()


def test_hub_streams_are_requested_as_the_reference_does_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub branch (no network here): load_dataset gets the spec's ids, splits and streaming=True, and an
    endless stream is cut at data.source.max_docs."""
    import itertools

    import datasets

    calls = []

    def endless_stream(hub_id, config=None, split=None, **kwargs):
        calls.append((hub_id, config, split, kwargs["streaming"], sorted(kwargs.get("features") or {})))
        if hub_id == "allenai/c4":
            return ({"url": f"u{i}", "text": f"document {i}", "timestamp": "2019-04-25T12:57:54Z"}
                    for i in itertools.count())
        return ({"prompt": "q", "prompt_id": "0" * 64, "messages": [{"role": "user", "content": f"q{i}"},
                                                                   {"role": "assistant", "content": "a"}]}
                for i in itertools.count())

    monkeypatch.setattr(datasets, "load_dataset", endless_stream)
    c4 = compose_config(["data=c4", "data.source.max_docs=5"]).data
    docs = list(instantiate(c4.source).documents("validation", None))
    assert docs == [f"document {i}" for i in range(5)]
    chat = compose_config(["data=ultrachat", "data.source.max_docs=3"]).data
    conversations = list(instantiate(chat.source).documents("train", None))
    assert len(conversations) == 3 and conversations[2][1] == ("q2", False) and conversations[2][4] == ("a", True)
    assert calls == [("allenai/c4", "en", "validation", True, ["text", "timestamp", "url"]),
                     ("HuggingFaceH4/ultrachat_200k", None, "train_sft", True, [])]


# --------------------------------------------------------------------------- C4 → UltraChat (spec §4)
def _mixture(local_corpora: dict[str, Path], extra: list[str] = ()) -> PhasedMixtureDataModule:
    cfg = compose_config(["data=c4_ultrachat", f"data.c4_path={local_corpora['c4']}",
                          f"data.ultrachat_path={local_corpora['ultrachat']}", "tokenizer=char", "seq_len=64",
                          "data.phase_a_steps=3", "data.phase_b_steps=10", *extra])
    data = build_datamodule(cfg)
    assert isinstance(data, PhasedMixtureDataModule)
    return data


def test_mixture_schedule_phases_and_80_20_rows() -> None:
    schedule = MixtureSchedule(phase_a_steps=3, phase_b_steps=10, mixed_fraction=0.1, mixed_main_share=0.8,
                               rows_per_step=32, seed=7)
    assert [schedule.phase(s) for s in (0, 2, 3, 11, 12, 13, 20)] == \
        ["pretrain", "pretrain", "chat", "chat", "mixed", "mixed", "mixed"]
    corpora = np.array([schedule.corpus(g) for g in range(15 * 32)]).reshape(15, 32)
    assert (corpora[:3] == PRETRAIN).all() and (corpora[3:12] == CHAT).all()
    assert ((corpora[12:] == CHAT).sum(axis=1) == 25).all()  # int(0.8 · 32) UltraChat rows, 7 C4 rows
    assert not (corpora[12] == corpora[13]).all()  # a fresh order every step
    again = MixtureSchedule(3, 10, 0.1, 0.8, 32, seed=7)
    other = MixtureSchedule(3, 10, 0.1, 0.8, 32, seed=8)
    assert [again.corpus(g) for g in range(12 * 32, 15 * 32)] == corpora[12:].ravel().tolist()
    assert [other.corpus(g) for g in range(12 * 32, 15 * 32)] != corpora[12:].ravel().tolist()
    with pytest.raises(DataError, match="must lie in"):
        MixtureSchedule(3, 10, 1.5, 0.8, 32, seed=7)


def test_mixture_rows_are_deterministic_and_resume_exactly(local_corpora: dict[str, Path]) -> None:
    data = _mixture(local_corpora)
    vocab = data.prepare()
    assert vocab == data.tokenizer.vocab_size and data.has_split("validation")
    # the char vocabulary is trained on C4: UltraChat ids live in their own cache folder
    assert data.stores["ultrachat"].dir.name.endswith(data.stores["c4"].dir.parent.name)
    per_step, max_steps = 8, 13
    run = data.training_rows(per_step, max_steps, offset=0, length=max_steps * per_step)
    resumed = data.training_rows(per_step, max_steps, offset=5 * per_step, length=8 * per_step)
    rebuilt = _mixture(local_corpora)
    rebuilt.prepare()
    fresh = rebuilt.training_rows(per_step, max_steps, offset=0, length=max_steps * per_step)
    for i in range(len(resumed)):
        x, y = resumed[i]
        assert torch.equal(x, run[5 * per_step + i][0]) and torch.equal(y, run[5 * per_step + i][1])
    unsupervised_chat_targets = 0
    for g in range(len(run)):
        x, y = run[g]
        assert torch.equal(x, fresh[g][0]) and torch.equal(y, fresh[g][1])
        if run.schedule.corpus(g) == PRETRAIN:
            assert (y != IGNORE).all()  # C4: full loss
        else:
            assert (y != IGNORE).sum() >= 8  # UltraChat: assistant-only, redrawn until 8 supervised targets
            unsupervised_chat_targets += int((y == IGNORE).sum())
    assert unsupervised_chat_targets > 0
    chat_in_last_step = sum(run.schedule.corpus(g) == CHAT for g in range(12 * per_step, 13 * per_step))
    assert chat_in_last_step == int(0.8 * per_step)
    val_x, val_y = next(iter(data.val_dataloader()))
    assert val_x.shape[1] == 64 and (val_y == IGNORE).any()  # UltraChat test split, assistant-only


def test_mixture_trains_end_to_end(local_corpora: dict[str, Path], tmp_path: Path) -> None:
    cfg = compose_config(["data=c4_ultrachat", f"data.c4_path={local_corpora['c4']}",
                          f"data.ultrachat_path={local_corpora['ultrachat']}", "tokenizer=char", "attention=wda",
                          "scale=tiny", "seq_len=32", "data.batch_size=4", "data.val_windows=8",
                          "data.phase_a_steps=2", "optim=wda", "optim.warmup_steps=1", "trainer.max_steps=6",
                          "trainer.val_check_interval=6", "trainer.precision=32-true",
                          "trainer.enable_progress_bar=false"])
    results = train(cfg, run_dir=tmp_path)
    assert results["steps"] == 6 and np.isfinite(results["val_loss"])


def test_mixture_refuses_unknown_eval_corpus(local_corpora: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="data.eval_corpus='owt' is unknown"):
        _mixture(local_corpora, ["data.eval_corpus=owt"])


# --------------------------------------------------------------------------- optim=wda (spec §5)
def test_wda_optimiser_recipe() -> None:
    cfg = compose_config(["optim=wda", "attention=wda", "scale=tiny"])
    opt = cfg.optim
    assert (opt.lr, opt.weight_decay, list(opt.betas), opt.eps, opt.warmup_steps, opt.grad_clip) == \
        (2e-4, 1e-4, [0.9, 0.999], 1e-8, 500, 0.5)
    assert opt.schedule == "warmup_constant" and opt.decay_all and opt.min_lr == pytest.approx(0.1 * opt.lr)
    groups = parameter_groups(build_model(cfg, vocab_size=50), opt.weight_decay, opt.decay_all)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4  # embeddings, norms, waves decayed too
    code = [lr_factor(s, schedule="warmup_constant", warmup_steps=500, max_steps=10_000, lr=opt.lr,
                      min_lr=opt.min_lr) for s in (0, 499, 5000, 9999)]
    paper = [lr_factor(s, schedule="warmup_cosine", warmup_steps=500, max_steps=10_000, lr=opt.lr,
                       min_lr=opt.min_lr) for s in (0, 499, 10_000)]
    assert code == [1 / 500, 1.0, 1.0, 1.0] and paper == pytest.approx([1 / 500, 1.0, 0.1])


# --------------------------------------------------------------------------- short WDA runs learn
TINY = ["attention=wda", "scale=tiny", "seq_len=32", "data.batch_size=8", "data.val_windows=16",
        "optim.warmup_steps=2", "trainer.max_steps=30", "trainer.precision=32-true", "trainer.val_check_interval=30",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


@pytest.mark.parametrize("pooling", ["prefix", "prefix_mixdens"])
def test_tiny_wda_run_decreases_the_loss(pooling: str, tmp_path: Path) -> None:
    results = train(compose_config(TINY + [f"attention.gate_pooling={pooling}"]), run_dir=tmp_path)
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv"))
              if r.get("train/loss")]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert results["steps"] == 30 and np.isfinite(results["val_loss"])
