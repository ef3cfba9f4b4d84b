"""DWARF training protocols and evaluation (spec dwarf.md §2, §2.A, §5): OpenWebText on local files, the optimiser
recipes, a few training steps of every condition, the plot command on trained checkpoints, passkey retrieval."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from wavetrain import build_model, compose_config
from wavetrain.analysis import dwarf_plots
from wavetrain.config import ConfigError, group_choices
from wavetrain.data.datamodule import TextDataModule, pad_collate
from wavetrain.data.tokenizers import ByteLevelBPETokenizer
from wavetrain.eval import passkey
from wavetrain.lightning_module import LanguageModelTask
from wavetrain.models.lm import count_parameters
from wavetrain.train import apply_epoch_budget, train

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread beats two on a loaded machine

DWARF_CONDITIONS = [c for c in group_choices("attention") if c.startswith("dwarf_cond")]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
SMALL_BPE = ["tokenizer.vocab_size=400"]  # the DWARF tokenizer configs with a vocabulary a tiny corpus can fill


def _doc(index: int, words: int) -> str:
    """A synthetic document that names its index (so order is checkable) and has ``words`` words."""
    body = " ".join(WORDS[(index * 7 + k * 3) % len(WORDS)] for k in range(words))
    return f"document {index:03d} begins. {body} end."


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def _datamodule(overrides: list[str]) -> TextDataModule:
    cfg = compose_config(["scale=tiny", *overrides])
    data = TextDataModule(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.seed)
    data.prepare()
    return data


def _decoded_docs(data: TextDataModule, split: str, eos: int | None) -> list[str]:
    tokens = data.splits[split]
    pieces = []
    for start, stop in tokens.documents():
        ids = tokens.ids[start:stop].tolist()
        if eos is not None:
            assert ids[-1] == eos and eos not in ids[:-1], "one </s> after every document, nowhere else"
            ids = ids[:-1]
        pieces.append(data.tokenizer.decode(ids))
    return pieces


# ---------------------------------------------------------------------------------------------------------------
# §2: the concatenated stream of the first 100k docs, 95/2.5/2.5, </s> after each doc, 2048-token sequences

def test_owt_stream_protocol_on_local_files(tmp_path: Path) -> None:
    docs = [_doc(i, 2500) for i in range(44)]
    path = _write_jsonl(tmp_path / "owt.jsonl", docs)
    data = _datamodule(["data=owt", f"data.path={path}", "data.source.max_docs=40", "tokenizer=bpe32k_owt",
                        *SMALL_BPE, "seq_len=2047"])
    assert data.tokenizer.eos_id == 3 and data.tokenizer.special_tokens == ["<pad>", "<unk>", "<s>", "</s>"]
    # the first max_docs documents in order: 38 / 1 / 1 (= 95 / 2.5 / 2.5 %), documents 40..43 never read
    expected = {"train": docs[:38], "validation": docs[38:39], "test": docs[39:40]}
    for split, split_docs in expected.items():
        assert _decoded_docs(data, split, eos=3) == split_docs
    # non-overlapping sequences of 2048 tokens, x = seq[:-1]: the model sees N = 2047
    tokens = data.splits["train"]
    spans = data.spans["train"]
    assert len(spans) == len(tokens) // 2048 and spans[:2] == [(0, 2048), (2048, 4096)]
    x, y = tokens.targets(*spans[1])
    assert x.shape == y.shape == (2047,)
    assert torch.equal(x[1:], y[:-1]) and x[0] == int(tokens.ids[2048]) and y[-1] == int(tokens.ids[4095])
    assert data.train_examples_per_epoch() == len(spans)


def test_owt_stream_carves_100k_docs_95_2_5_2_5(tmp_path: Path) -> None:
    from wavetrain.data.sources import HFTextSource

    docs = [f"d{i}" for i in range(200)]
    path = _write_jsonl(tmp_path / "owt.jsonl", docs)
    cfg = compose_config(["data=owt"])
    source = HFTextSource(**{k: v for k, v in OmegaConf.to_container(cfg.data.source).items() if k != "_target_"})
    source.max_docs = 160
    sizes = [len(list(source.documents(split, str(path)))) for split in ("train", "validation", "test")]
    assert sizes == [152, 4, 4]  # 95 / 2.5 / 2.5 % of the first 160 documents
    assert cfg.data.source.max_docs == 100_000 and cfg.data.source.carve == {"train": 0.95, "validation": 0.025,
                                                                             "test": 0.025}


def test_tokenizer_is_trained_on_the_first_train_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [_doc(i, 30) for i in range(40)]
    path = _write_jsonl(tmp_path / "owt.jsonl", docs)
    seen: list[str] = []
    original = ByteLevelBPETokenizer.train

    def recording_train(self, texts):
        texts = list(texts)
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(ByteLevelBPETokenizer, "train", recording_train)
    cfg = compose_config(["scale=tiny", "data=owt", f"data.path={path}", "tokenizer=bpe32k_owt", *SMALL_BPE,
                          "tokenizer.train_docs=5", "seq_len=16"])
    assert compose_config(["tokenizer=bpe32k_owt"]).tokenizer.train_docs == 50_000
    TextDataModule(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.seed).prepare()
    assert seen == docs[:5]


def test_owt_stream_on_the_shared_sample(shared_data: Path) -> None:
    sample = shared_data / "openwebtext" / "openwebtext_sample.txt"
    data = _datamodule(["data=owt", f"data.path={sample}", "tokenizer=bpe32k_owt", "tokenizer.vocab_size=2000",
                        "seq_len=2047"])
    documents = {split: len(data.splits[split].doc_starts) for split in ("train", "validation", "test")}
    total = sum(documents.values())
    assert documents["train"] == round(0.95 * total) and documents["validation"] == round(0.025 * total)
    x, y = data.splits["train"].targets(*data.spans["train"][0])
    assert x.shape == (2047,) and torch.equal(x[1:], y[:-1])
    assert data.tokenizer.decode(data.splits["train"].ids[:40].tolist()).startswith("Port-au-Prince, Haiti")


# ---------------------------------------------------------------------------------------------------------------
# §2.A: strip, keep len > 50, per-document windows, no separator, int(0.95n) / int(0.975n) of the kept docs

def test_owt_documents_protocol_on_local_files(tmp_path: Path) -> None:
    long_docs = [_doc(i, 40 if i % 5 else 2600) for i in range(50)]
    rows = []
    for i, doc in enumerate(long_docs):
        rows.append(f"  \n{doc}\t ")                        # stripped before the length test and training
        if i % 10 == 3:
            rows.append("   too short to keep, 50 chars or less   ")
    rows += [_doc(900 + i, 40) for i in range(5)]              # beyond max_docs rows: never read
    path = _write_jsonl(tmp_path / "owt.jsonl", rows)
    read = len(rows) - 5
    data = _datamodule(["data=owt_docs", f"data.path={path}", f"data.source.max_docs={read}",
                        "tokenizer=bpe32k_owt_docs", *SMALL_BPE, "seq_len=2048"])
    assert data.tokenizer.special_tokens == ["<pad>", "<unk>", "<bos>", "<eos>"]
    # n = 50 kept: train [0, 47), val [47, 48), test [48, 50) (round() would give 48 / 1 / 1)
    expected = {"train": long_docs[:47], "validation": long_docs[47:48], "test": long_docs[48:]}
    for split, split_docs in expected.items():
        assert _decoded_docs(data, split, eos=None) == split_docs
    # every document on its own, no separator: windows at 0, T, 2T, ... of up to T + 1 tokens (N <= 2048)
    tokens = data.splits["train"]
    assert len(tokens) == sum(len(data.tokenizer.encode(doc)) for doc in long_docs[:47])
    spans = data.spans["train"]
    for begin, end in tokens.documents():
        inside = [(s, e) for s, e in spans if begin <= s < end]
        assert [s for s, _ in inside] == list(range(begin, end - 1, 2048))
        assert all(e == min(s + 2049, end) for s, e in inside)
    lengths = sorted({e - s - 1 for s, e in spans})
    assert lengths[-1] == 2048 and lengths[0] < 2048          # full windows N = 2048, short documents shorter
    batch = [tokens.targets(*spans[0]), tokens.targets(*spans[1])]
    x, y = pad_collate(data.tokenizer.pad_id)(batch)
    short = min(len(batch[0][0]), len(batch[1][0]))
    row = 0 if len(batch[0][0]) == short else 1
    assert x.shape[1] == max(len(b[0]) for b in batch)
    assert (x[row, short:] == 0).all() and (y[row, short:] == -100).all()


# ---------------------------------------------------------------------------------------------------------------
# Optimiser recipes (§2, §2.A)

class _Epoch:
    """A data module of ``windows`` training windows per epoch (all apply_epoch_budget reads)."""

    def __init__(self, windows: int) -> None:
        self.windows = windows

    def train_examples_per_epoch(self) -> int:
        return self.windows


def _lr_at(cfg, steps: list[int]) -> list[float]:
    task = LanguageModelTask(OmegaConf.to_container(cfg, resolve=True), vocab_size=64)
    schedule = task.configure_optimizers()["lr_scheduler"]["scheduler"]
    return [float(cfg.optim.lr) * schedule.lr_lambdas[0](step) for step in steps]


def _reference_warmup_cosine(s: int, warmup: int, total: int, lr: float = 3e-4, min_lr: float = 1e-5) -> float:
    """WarmupCosineScheduler of the archive scripts after s scheduler steps (spec §2.A)."""
    if s <= warmup:
        return lr * s / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))


def test_dwarf_recipe_cosine_without_warmup_on_all_parameters() -> None:
    cfg = compose_config(["scale=tiny", "optim=dwarf", "seq_len=16", "data=owt", "trainer.accumulate_grad_batches=4",
                          "run.epochs=10"])
    apply_epoch_budget(cfg, _Epoch(52_716))           # the baseline's train sequences (spec §1)
    # the same 10 x 6590 micro-batches in groups of 4; the reference also steps on each epoch's partial group
    # (1648 steps per epoch, T_max 16,480), here accumulation runs across epoch ends: 16,475 steps
    assert cfg.trainer.max_steps == math.ceil(10 * math.ceil(52_716 / 8) / 4) == 16_475
    T = cfg.trainer.max_steps
    lrs = _lr_at(cfg, [0, 1, T // 2, T - 1])
    assert lrs[0] == pytest.approx(3e-4)
    assert lrs[1] == pytest.approx(1.5e-4 * (1 + math.cos(math.pi / T)))   # CosineAnnealingLR, eta_min 0
    assert lrs[2] == pytest.approx(1.5e-4 * (1 + math.cos(math.pi * (T // 2) / T)))
    assert lrs[3] == pytest.approx(1.5e-4 * (1 + math.cos(math.pi * (T - 1) / T))) and lrs[3] < 1e-11
    task = LanguageModelTask(OmegaConf.to_container(cfg, resolve=True), vocab_size=64)
    optimizer = task.configure_optimizers()["optimizer"]
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(task.model)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and cfg.optim.grad_clip == 1.0


def test_dwarf_ad_recipe_reproduces_the_step_count_mismatch_by_default() -> None:
    cfg = compose_config(["scale=tiny", "optim=dwarf_ad", "seq_len=16", "data=owt_docs",
                          "trainer.accumulate_grad_batches=4", "run.epochs=10"])
    apply_epoch_budget(cfg, _Epoch(1000))
    spe = math.ceil(1000 / 8)                          # 125 micro-batches per epoch
    assert cfg.trainer.max_steps == math.ceil(10 * spe / 4) == 313
    assert cfg.optim.warmup_steps == spe and cfg.optim.schedule_steps == 10 * spe
    steps = [0, 60, 124, 125, 200, 312]
    lrs = _lr_at(cfg, steps)
    for step, lr in zip(steps, lrs):
        # cosine part equal to the reference's lr after `step` scheduler steps; warmup one step ahead
        reference = _reference_warmup_cosine(step + 1 if step < spe else step, spe, 10 * spe)
        assert lr == pytest.approx(reference), step
    assert lrs[-1] == pytest.approx(2.8e-4, abs=2e-6)  # the 10 epochs end at progress ~1/6 (spec §2.A)


def test_dwarf_ad_recipe_intended_schedule_as_a_switch() -> None:
    cfg = compose_config(["scale=tiny", "optim=dwarf_ad", "optim.epoch_steps=optimizer_steps", "seq_len=16",
                          "data=owt_docs", "trainer.accumulate_grad_batches=4", "run.epochs=10"])
    apply_epoch_budget(cfg, _Epoch(1000))
    assert (cfg.trainer.max_steps, cfg.optim.warmup_steps, cfg.optim.schedule_steps) == (313, 32, 313)
    first, peak, last = _lr_at(cfg, [0, 32, 312])
    assert first == pytest.approx(3e-4 / 32) and peak == pytest.approx(3e-4)
    assert last == pytest.approx(1e-5, abs=1e-7)       # cosine reaches min_lr at the end of epoch 10
    with pytest.raises(ValueError, match="epoch_steps"):
        apply_epoch_budget(compose_config(["optim=dwarf_ad", "optim.epoch_steps=tokens"]), _Epoch(1000))


# ---------------------------------------------------------------------------------------------------------------
# The standard baseline preset of the 13M table (spec §1)

def test_dwarf_standard_preset_is_the_baseline_as_run() -> None:
    cfg = compose_config(["attention=dwarf_standard", "scale=13m", "seq_len=2047"])
    model = build_model(cfg, vocab_size=32_000)
    assert count_parameters(model) == 13_455_360
    assert model.position_embedding.weight.shape == (2048, 256)
    assert cfg.attention.attn_dropout == 0.1 and cfg.model.attn_output_dropout is False
    assert cfg.model.ffn_dropout == ["hidden"] and cfg.model.interference is None


# ---------------------------------------------------------------------------------------------------------------
# A few training steps of every condition decrease the loss

def _val_losses(run_dir: Path) -> list[float]:
    rows = csv.DictReader(open(run_dir / "logs" / "metrics.csv"))
    return [float(r["val/loss"]) for r in rows if r.get("val/loss")]


TRAIN_TINY = ["scale=tiny", "seq_len=64", "data.batch_size=4", "data.val_windows=4", "trainer.max_steps=8",
              "optim.warmup_steps=1", "trainer.precision=32-true", "trainer.val_check_interval=4",
              "model.position_rows=null", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
              "+trainer.num_sanity_val_steps=0"]


@pytest.mark.parametrize("attention", DWARF_CONDITIONS)
def test_every_condition_learns_in_a_few_steps(attention: str, tmp_path: Path) -> None:
    train(compose_config([f"attention={attention}", *TRAIN_TINY]), run_dir=tmp_path)
    losses = _val_losses(tmp_path)
    assert len(losses) == 2 and losses[-1] < losses[0], losses


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints of tiny runs (a field and a dyadic condition) on an OWT-like corpus: plots and passkey end to end

def _passkey_corpus(count: int) -> list[str]:
    """Documents that use the filler, the passkey sentences and all 20 words, so BPE gives each word one token."""
    docs = []
    for i in range(count):
        word = passkey.PASSKEY_WORDS[i % len(passkey.PASSKEY_WORDS)]
        docs.append(f"{passkey.INTRO_TEMPLATE.format(word=word)} {passkey.FILLER_SENTENCE * (3 + i % 4)}"
                    f"{passkey.RETRIEVAL_CUE} {word} . " + _doc(i, 60))
    return docs


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dwarf_runs")
    path = _write_jsonl(root / "owt.jsonl", _passkey_corpus(120))
    checkpoints = {}
    for attention in ("dwarf_condA", "dwarf_condK"):
        run_dir = root / attention
        train(compose_config([f"attention={attention}", "data=owt", f"data.path={path}",
                              f"data.cache_dir={root / 'cache'}", "tokenizer=bpe32k_owt", *SMALL_BPE,
                              *TRAIN_TINY]), run_dir=run_dir)
        checkpoints[attention] = run_dir / "checkpoints" / "last.ckpt"
    return checkpoints


@pytest.mark.parametrize("attention,expected", [
    ("dwarf_condA", {"field_kernels.png", "head_coupling.png"}),
    ("dwarf_condK", {"scale_gains.png", "position_bias.png", "offset_weights.png"})])
def test_plot_command_on_a_trained_checkpoint(tiny_checkpoints: dict[str, Path], attention: str, expected: set,
                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert dwarf_plots.main([str(tiny_checkpoints[attention]), "--out", str(tmp_path)]) == 0
    written = {p.name for p in tmp_path.glob("*.png")}
    assert written == expected
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(Path(line).exists() for line in capsys.readouterr().out.split())


def test_passkey_command_on_trained_checkpoints(tiny_checkpoints: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert (tiny_checkpoints["dwarf_condK"].parent.parent / "tokenizer.json").exists()  # copied at training time
    code = passkey.main([str(tiny_checkpoints["dwarf_condK"]), str(tiny_checkpoints["dwarf_condA"]),
                         "--distances", "4,8,16,1000", "--trials", "5", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "chance = 1/10 = 10%" in out and "passkey D=8: accuracy" in out and "D=1000: skipped" in out
    rows = list(csv.DictReader(open(tmp_path / "passkey.csv")))
    assert len(rows) == 2 * 3 and {int(r["trials"]) for r in rows} == {5}
    assert all(float(r["accuracy"]) in {0.0, 0.2, 0.4, 0.6, 0.8, 1.0} for r in rows)
    report = (tmp_path / "passkey.md").read_text()
    assert "chance = 10%" in report and "## All runs (accuracy)" in report and "| D=4 | D=8 | D=16 | mean |" in report
    assert json.loads((tmp_path / "passkey.json").read_text())["chance"] == pytest.approx(0.1)


def test_run_passkey_scores_the_best_checkpoint_into_results(tmp_path: Path) -> None:
    """run.passkey=true: after training, the §5 protocol on the best checkpoint lands in results.json and
    passkey/ (the passkey sweep's metric); a distance beyond seq_len is skipped, not failed."""
    path = _write_jsonl(tmp_path / "owt.jsonl", _passkey_corpus(120))
    run_dir = tmp_path / "run"
    results = train(compose_config(["attention=dwarf_condK", "data=owt", f"data.path={path}",
                                    f"data.cache_dir={tmp_path / 'cache'}", "tokenizer=bpe32k_owt", *SMALL_BPE,
                                    *TRAIN_TINY, "run.passkey=true", "run.passkey_distances=[4,8,1000]",
                                    "run.passkey_trials=5"]), run_dir=run_dir)
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["passkey_distances"] == results["passkey_distances"] == 2  # D=1000 does not fit 64 tokens
    assert saved["passkey_acc"] in {0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}
    assert saved["passkey_baseline"] is None  # 200 filler tokens + cue do not fit 64 positions either
    rows = list(csv.DictReader(open(run_dir / "passkey" / "passkey.csv")))
    assert [int(r["distance"]) for r in rows] == [4, 8] and "best-step" in rows[0]["run"]
    assert math.isclose(sum(float(r["accuracy"]) for r in rows) / 2, saved["passkey_acc"])


@pytest.mark.parametrize("overrides, message", [
    (["tokenizer=char"], "share their first token"),
    (["run.passkey_trials=30"], "run.passkey_trials=30: give 1 to 20"),
    (["run.passkey_distances=[4,-1]"], "run.passkey_distances"),
])
def test_run_passkey_refuses_a_bad_setup_before_training(overrides: list[str], message: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        train(compose_config(["attention=dwarf_condK", *TRAIN_TINY, "run.passkey=true", *overrides]), run_dir=run_dir)
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------------------------
# Passkey protocol (§5) on untrained models and on models with known answers

@pytest.fixture(scope="module")
def passkey_tokenizer() -> ByteLevelBPETokenizer:
    tokenizer = ByteLevelBPETokenizer(600, 2, ["<pad>", "<unk>", "<s>", "</s>"])
    tokenizer.train(_passkey_corpus(200))
    return tokenizer


def test_passkey_prompt_and_candidates(passkey_tokenizer: ByteLevelBPETokenizer) -> None:
    assert len(passkey.DISTANCES) == 37 and passkey.DISTANCES[:4] == (4, 5, 8, 10) and passkey.DISTANCES[-1] == 1850
    prompt = passkey.passkey_prompt(passkey_tokenizer, "tiger", 23, context=2047)
    intro = passkey_tokenizer.encode("the secret word is tiger .")
    cue = passkey_tokenizer.encode("the secret word is")
    assert prompt[:len(intro)] == intro and prompt[-len(cue):] == cue and len(prompt) == len(intro) + 23 + len(cue)
    filler_text = passkey_tokenizer.decode(prompt[len(intro):-len(cue)])
    assert filler_text.startswith("the weather was mild and the air was still . the weather")
    assert passkey.passkey_prompt(passkey_tokenizer, "tiger", 2047 - len(intro) - len(cue), 2047) is None
    assert passkey.distractors("apple") == list(passkey.PASSKEY_WORDS[1:10])
    assert passkey.distractors("grape") == list(passkey.PASSKEY_WORDS[:9])


class _Reader(torch.nn.Module):
    """Known answers: last-position logits ``sign`` at the token at ``position`` (the planted word), 0 elsewhere."""

    def __init__(self, vocab_size: int, position: int, sign: float) -> None:
        super().__init__()
        self.vocab_size, self.position, self.sign = vocab_size, position, sign

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[torch.arange(ids.shape[0]), -1, ids[:, self.position]] = self.sign
        return logits


def test_passkey_scoring_with_known_answers(passkey_tokenizer: ByteLevelBPETokenizer) -> None:
    word_at = len(passkey_tokenizer.encode("the secret word is"))
    assert all(len(passkey_tokenizer.encode(" " + w)) == 1 for w in passkey.PASSKEY_WORDS)
    vocab = passkey_tokenizer.vocab_size
    for sign, accuracy in ((1.0, 1.0), (-1.0, 0.0)):   # reads the planted word / avoids it
        results = passkey.evaluate_passkey(_Reader(vocab, word_at, sign), passkey_tokenizer, context=300,
                                           distances=[4, 50, 200, 290])
        assert [r.distance for r in results] == [4, 50, 200]   # 290 does not fit 300 positions
        assert all(r.accuracy == accuracy and r.trials == 20 for r in results)
    flat = passkey.evaluate_passkey(_Reader(vocab, word_at, 0.0), passkey_tokenizer, context=300, distances=[4])
    assert flat[0].accuracy == 1.0                     # all-equal scores: ties count as correct (§5)


def test_passkey_refuses_a_degenerate_tokenizer() -> None:
    from wavetrain.data.tokenizers import CharTokenizer

    tokenizer = CharTokenizer(sorted(set("".join(passkey.PASSKEY_WORDS) + " .")))
    with pytest.raises(ValueError, match="share their first token"):
        passkey.check_candidates(tokenizer, passkey.PASSKEY_WORDS)


def test_passkey_on_untrained_models_sits_at_chance(passkey_tokenizer: ByteLevelBPETokenizer) -> None:
    accuracies = []
    for seed in range(6):
        torch.manual_seed(seed)
        cfg = compose_config(["attention=dwarf_condK", "scale=tiny", "seq_len=128", "model.position_rows=null"])
        model = build_model(cfg, vocab_size=passkey_tokenizer.vocab_size)
        results = passkey.evaluate_passkey(model, passkey_tokenizer, context=128, distances=passkey.DISTANCES)
        assert [r.distance for r in results] == [d for d in passkey.DISTANCES if d <= 128 - 1 - 12]
        assert all(r.trials == 20 and (r.accuracy * 20).is_integer() for r in results)
        assert all(r.mean_rank >= 1 and r.mean_log_prob < 0 for r in results)
        accuracies += [r.accuracy for r in results]
    mean = sum(accuracies) / len(accuracies)
    assert passkey.CHANCE == 0.1 and abs(mean - passkey.CHANCE) < 0.1, mean
