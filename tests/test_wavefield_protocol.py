"""The Wave Field WikiText-2 protocol (spec wavefield.md §3, §4, §8): WikiText-2 rows and examples, the same protocol
on tiny-shakespeare paragraphs, the paper's evaluation metrics, the published presets with their exact parameter
counts, the nn.TransformerEncoder baseline, the sweep's rows, and the diagnostics command on a trained checkpoint."""
from __future__ import annotations

import gzip
import math
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from causality import assert_causal
from wavetrain import build_model, compose_config, load_model
from wavetrain.data.datamodule import TextDataModule, document_spans, steps_for_epochs
from wavetrain.data.sources import DataError, EmbeddedTextSource, split_documents
from wavetrain.lightning_module import LanguageModelTask
from wavetrain.models.attention.standard import CausalSelfAttention, causal_attention_reference
from wavetrain.models.lm import count_parameters
from wavetrain.sweep import SWEEPS_DIR, list_jobs
from wavetrain.train import train

# local files read lazily: the same rows as the configured Arrow load, without writing into ~/.cache/huggingface
STREAM = "data.source.streaming=true"
SHAKESPEARE_PARAGRAPHS = ["data=shakespeare", "+data.source.document_unit=paragraph", "data.packing=documents",
                          "data.doc_separator=none"]
# spec §3 table: (attention preset, scale preset) -> parameters
PUBLISHED_PARAMETERS = {("wavefield", "6m"): 5_989_522, ("standard_encoder", "6m"): 5_034_240,
                        ("wavefield", "6m_bpe8k"): 7_775_378, ("standard_encoder", "6m_bpe8k"): 6_852_864}
# spec §4 / §8: test PPL and accuracy of the four rows
PUBLISHED_RESULTS = {("standard_encoder", "6m"): (5.9, 0.510), ("wavefield", "6m"): (6.2, 0.505),
                     ("standard_encoder", "6m_bpe8k"): (91.4, 0.262), ("wavefield", "6m_bpe8k"): (170.7, 0.187)}
# the experiment of each published protocol -> the scale preset carrying its tokenizer and T (spec §4, §8)
EXPERIMENT_SCALE = {"wavefield_wt2": "6m", "wavefield_wt2_bpe8k": "6m_bpe8k"}


def _raw_lines(path: Path) -> list[str]:
    """The lines of a shared WikiText file exactly as stored (CRLF line ends, SOURCES.md)."""
    text = gzip.open(path, "rt", encoding="utf-8", newline="").read()
    assert text.count("\r\n") == text.count("\n"), "the shared copy is expected to end every line in CRLF"
    return text.split("\r\n")[:-1]


def _protocol_rows(lines: list[str]) -> list[str]:
    """Spec §4 filter, written out: strip, keep non-empty rows that do not start with '='."""
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("=")]


def _write_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        handle.write("".join(line + "\r\n" for line in lines))


@pytest.fixture
def wikitext_dir(shared_data: Path, tmp_path: Path) -> Path:
    """wiki.{valid,test}.raw.gz = the shared files; wiki.train.raw.gz = the valid file (no train split is here)."""
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    source = shared_data / "wikitext-2-raw"
    for name, target in (("wiki.train.raw.gz", "wiki.valid.raw.gz"), ("wiki.valid.raw.gz", "wiki.valid.raw.gz"),
                         ("wiki.test.raw.gz", "wiki.test.raw.gz")):
        (folder / name).symlink_to(source / target)
    return folder


@pytest.fixture
def small_wikitext_dir(shared_data: Path, tmp_path: Path) -> Path:
    """Real WikiText lines (CRLF, headings included), cut small: train/validation from the valid file, test from
    the test file; plus a one-token line (" . ") in validation, which the protocol drops."""
    folder = tmp_path / "wikitext-2-small"
    folder.mkdir()
    valid = _raw_lines(shared_data / "wikitext-2-raw" / "wiki.valid.raw.gz")
    test = _raw_lines(shared_data / "wikitext-2-raw" / "wiki.test.raw.gz")
    _write_gz(folder / "wiki.train.raw.gz", valid[:700])
    _write_gz(folder / "wiki.valid.raw.gz", valid[700:1000] + [" . "])
    _write_gz(folder / "wiki.test.raw.gz", test[:300])
    return folder


# ------------------------------------------------------------------------------------------------ WikiText-2 rows

@pytest.mark.parametrize("split,filename", [("validation", "wiki.valid.raw.gz"), ("test", "wiki.test.raw.gz")])
def test_wikitext_rows_are_stripped_non_heading_lines(wikitext_dir: Path, shared_data: Path, split: str,
                                                      filename: str) -> None:
    lines = _raw_lines(shared_data / "wikitext-2-raw" / filename)
    assert len(lines) == {"validation": 3760, "test": 4358}[split]  # the HF row counts (SOURCES.md)
    cfg = compose_config(["data=wikitext2", f"data.path={wikitext_dir}", STREAM])
    docs = list(instantiate(cfg.data.source).documents(split, str(wikitext_dir)))
    assert docs == _protocol_rows(lines)
    assert not any("\r" in doc or doc.startswith("=") or not doc for doc in docs)
    empty = sum(not line.strip() for line in lines)
    dropped = sum(line.strip().startswith("=") for line in lines)  # "= Heading =" rows (and, in test, 2 legend
    headings = sum(line.strip().startswith("= ") and line.strip().endswith(" =") for line in lines)  # rows "= ...")
    assert empty > 1000 and headings > 50 and len(docs) == len(lines) - empty - dropped


def test_wikitext_carriage_returns_never_reach_the_text(wikitext_dir: Path) -> None:
    # the text builder of `datasets` reads in universal-newline mode: no "\r" even without the strip
    cfg = compose_config(["data=wikitext2", f"data.path={wikitext_dir}", STREAM,
                          "data.source.strip=false"])
    docs = list(instantiate(cfg.data.source).documents("validation", str(wikitext_dir)))
    assert docs and not any("\r" in doc for doc in docs)
    assert docs[:2] == [" ", " "] and docs[2].startswith(" Homarus gammarus , known as")  # unstripped rows kept,
    assert not any(doc.lstrip().startswith("=") for doc in docs)  # but " = Homarus gammarus = " still dropped


def test_missing_wikitext_split_file_names_the_split_and_the_fix(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "wiki.valid.raw.gz").symlink_to(shared_data / "wikitext-2-raw" / "wiki.valid.raw.gz")
    cfg = compose_config(["data=wikitext2", f"data.path={tmp_path}", STREAM])
    with pytest.raises(DataError, match=r"no file matches 'wiki.train.raw'.*train split.*local_files.train"):
        list(instantiate(cfg.data.source).documents("train", str(tmp_path)))


def test_wikitext_examples_windows_and_padding(small_wikitext_dir: Path) -> None:
    cfg = compose_config(["data=wikitext2", f"data.path={small_wikitext_dir}", STREAM,
                          "scale=6m"])
    assert (cfg.data.packing, cfg.data.doc_separator, cfg.data.batch_size, cfg.seq_len) == ("documents", "none",
                                                                                          32, 128)
    data = TextDataModule(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.seed)
    assert data.prepare() == 1024
    validation = data.splits["validation"]
    lines = list(instantiate(cfg.data.source).documents("validation", str(small_wikitext_dir)))
    documents = validation.documents()
    assert len(documents) == len(lines)  # one document per kept line, nothing between them (no EOS)
    assert not set(validation.ids.tolist()) & {1, 2}  # <BOS>/<EOS> never emitted
    lengths = [end - begin for begin, end in documents]
    assert any(n > 129 for n in lengths) and any(n < 2 for n in lengths)  # both edge cases occur in real lines
    # spec §4: per line, windows start at 0, 128, 256, ... while start < n - 1, each of up to 129 tokens
    assert len(data.spans["validation"]) == sum(len(range(0, n - 1, 128)) for n in lengths)
    assert all(2 <= stop - start <= 129 for start, stop in data.spans["validation"])
    assert data.train_examples_per_epoch() == len(data.spans["train"])
    assert steps_for_epochs(len(data.spans["train"]), 30, 32, 1, 1) == 30 * math.ceil(len(data.spans["train"]) / 32)

    x, y = next(iter(data.val_dataloader()))
    spans = data.spans["validation"][:32]
    assert x.shape == (32, max(stop - start for start, stop in spans) - 1)
    for row, (start, stop) in enumerate(spans):
        n = stop - start - 1
        ids = torch.from_numpy(validation.ids[start:stop].astype("int64"))
        assert torch.equal(x[row, :n], ids[:-1]) and torch.equal(y[row, :n], ids[1:])
        assert (x[row, n:] == data.tokenizer.pad_id).all() and (y[row, n:] == -100).all()


# ------------------------------------------------------------------------------------ tiny-shakespeare paragraphs

def test_split_documents_units() -> None:
    text = "A:\nline one\n\n  \nB:\nline two\n\n\nC:\n"
    assert list(split_documents(text, "text")) == [text]
    assert list(split_documents(text, "paragraph")) == ["A:\nline one", "B:\nline two", "C:"]
    assert list(split_documents(text, "line")) == ["A:", "line one", "B:", "line two", "C:"]
    with pytest.raises(DataError, match="document_unit='page'.*paragraph"):
        EmbeddedTextSource("tinyshakespeare.txt.gz", document_unit="page")


def test_shakespeare_paragraphs_follow_the_protocol() -> None:
    cfg = compose_config(SHAKESPEARE_PARAGRAPHS + ["scale=6m"])
    data = TextDataModule(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.seed)
    assert data.prepare() == 1024
    with resources.files("wavetrain.assets").joinpath("tinyshakespeare.txt.gz").open("rb") as raw:
        text = gzip.decompress(raw.read()).decode("utf-8")
    head = text[:int(len(text) * 0.9)]
    speeches = [p.strip() for p in re.split(r"\n\s*\n", head) if p.strip()]
    assert speeches[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    train = data.splits["train"]
    assert len(train.documents()) == len(speeches)  # one example per speech
    assert data.tokenizer.decode(train.ids[slice(*train.documents()[0])].tolist()).startswith("first citizen:")
    assert data.spans["train"] == document_spans(train.documents(), 128)
    x, y = next(iter(data.val_dataloader()))
    assert x.shape[0] == 32 and (y == -100).any()  # speeches differ in length: right padding is ignored


# ------------------------------------------------------------------------------------------- evaluation metrics

def test_paper_metrics_beside_token_weighted_ones() -> None:
    """val/loss_batch_mean = mean of per-batch mean CE, val/ppl_batch_mean = exp(min(., 20)) and val/acc =
    token-weighted argmax accuracy (spec §4), next to the token-weighted val/loss and val/ppl."""
    # init_std 0.5: token losses spread widely (at the 0.02 init every loss is ≈ ln V and the two averages agree)
    cfg = compose_config(SHAKESPEARE_PARAGRAPHS + ["scale=tiny", "tokenizer=wordchar1024", "data.val_windows=70",
                                                   "model.init_std=0.5", "trainer.precision=32-true"])
    data = TextDataModule(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.seed)
    torch.manual_seed(0)
    task = LanguageModelTask(OmegaConf.to_container(cfg, resolve=True), data.prepare())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    logged = trainer.validate(task, dataloaders=data.val_dataloader(), verbose=False)[0]

    batch_means, loss_sum, hits, count = [], 0.0, 0, 0
    task.model.eval()
    with torch.no_grad():
        for x, y in data.val_dataloader():
            logits = task.model(x).float()
            batch_means.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).item())
            supervised = y != -100
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
            hits += int(((logits.argmax(-1) == y) & supervised).sum())
            count += int(supervised.sum())
    assert len(batch_means) == 3  # 32 + 32 + 6 windows: batches weigh the same, tokens do not
    batch_mean = sum(batch_means) / len(batch_means)
    assert logged["val/loss_batch_mean"] == pytest.approx(batch_mean, rel=1e-5)
    assert logged["val/ppl_batch_mean"] == pytest.approx(math.exp(min(batch_mean, 20.0)), rel=1e-5)
    assert logged["val/loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(loss_sum / count), rel=1e-5)
    assert logged["val/acc"] == pytest.approx(hits / count, rel=1e-6)
    assert logged["val/tokens"] == count
    assert abs(logged["val/loss_batch_mean"] - logged["val/loss"]) > 1e-3  # the two averages really differ


# --------------------------------------------------------------------------------- presets and parameter counts

def _formula_counts(vocab: int, rows: int, d: int = 256, layers: int = 6, heads: int = 8, ffn: int = 1024,
                    interval: int = 3) -> tuple[int, int]:
    """Spec §3 parameter formulas (Wave, Standard)."""
    wave = (vocab * d + 2 * d + layers * (5 * d * d + 5 * d + 3 * heads + heads ** 2 + 2 * d * ffn + ffn + d + 4 * d)
            + (layers // interval) * int(4.5 * d * d + 6.25 * d + 1))
    standard = vocab * d + rows * d + 2 * d + layers * (4 * d * d + 2 * d * ffn + 9 * d + ffn)
    return wave, standard


@pytest.mark.parametrize("attention,scale", sorted(PUBLISHED_PARAMETERS))
def test_published_presets_have_the_exact_parameter_counts(attention: str, scale: str) -> None:
    cfg = compose_config([f"attention={attention}", f"scale={scale}"])
    bpe = scale == "6m_bpe8k"
    assert (cfg.tokenizer.vocab_size, cfg.seq_len, cfg.model.position_rows) == ((8000, 256, 257) if bpe
                                                                               else (1024, 128, 129))
    model = build_model(cfg)
    assert count_parameters(model) == PUBLISHED_PARAMETERS[(attention, scale)]
    wave, standard = _formula_counts(cfg.tokenizer.vocab_size, cfg.model.position_rows)
    assert count_parameters(model) == (wave if attention.startswith("wavefield") else standard)
    if attention == "wavefield":  # the published field G = 1024 is the default where it is causal
        strides = {block.attention.field_stride for block in model.blocks}
        assert strides == {1023 / cfg.seq_len} and model.blocks[0].attention.field_size == 1024
        assert [i for i, block in enumerate(model.blocks) if block.interference is not None] == [2, 5]


def test_plain_mechanisms_at_6m_have_the_same_counts() -> None:
    # the field size changes the stride, not the parameters: the smallest causal field (auto G) counts the same
    wave = build_model(compose_config(["attention=wavefield", "attention.field_size=auto", "scale=6m"]))
    assert count_parameters(wave) == 5_989_522 and wave.blocks[0].attention.field_stride == 1.0
    assert count_parameters(build_model(compose_config(["attention=standard", "scale=6m"]))) == 5_034_240


# ----------------------------------------------------------------------------------- the standard-encoder baseline

def test_standard_encoder_block_equals_pytorch_transformer_encoder_layer() -> None:
    cfg = compose_config(["attention=standard_encoder", "scale=tiny", "scale.dropout=0.1", "seq_len=24"])
    block = build_model(cfg, vocab_size=50).blocks[0].double().eval()
    d, heads, ffn = cfg.scale.d_model, cfg.scale.n_heads, cfg.scale.ffn_dim
    layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.1, activation="gelu", batch_first=True,
                                       norm_first=True).double().eval()
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(block.attention.qkv.weight)
        layer.self_attn.in_proj_bias.copy_(block.attention.qkv.bias)
        for ours, theirs in ((block.attention.out_proj, layer.self_attn.out_proj), (block.ffn.up, layer.linear1),
                             (block.ffn.down, layer.linear2), (block.norm1, layer.norm1), (block.norm2, layer.norm2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    x = torch.randn(3, 24, d, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(24, dtype=torch.float64)
    torch.testing.assert_close(block(x), layer(x, src_mask=mask, is_causal=True), rtol=0, atol=1e-12)
    # the same dropout sites and rates as the encoder layer (dropout, dropout1, dropout2 and the MHA's)
    rates = (block.attention.attn_dropout, block.attn_dropout.p, block.ffn.hidden_dropout.p, block.ffn.output_dropout.p)
    assert rates == (layer.self_attn.dropout, layer.dropout1.p, layer.dropout.p, layer.dropout2.p) == (0.1,) * 4


def test_xavier_shared_qkv_is_identical_across_layers_and_seeded() -> None:
    cfg = compose_config(["attention=standard_encoder", "scale=6m"])
    torch.manual_seed(7)
    model = build_model(cfg)
    weights = [block.attention.qkv.weight for block in model.blocks]
    assert all(torch.equal(weights[0], w) for w in weights[1:])
    bound = math.sqrt(6.0 / (256 + 3 * 256))  # Xavier-uniform over the packed (3D, D) in_proj
    assert weights[0].abs().max() <= bound and weights[0].abs().max() > 0.99 * bound
    assert weights[0].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert all((block.attention.qkv.bias == 0).all() for block in model.blocks)
    for linear in (model.blocks[0].attention.out_proj, model.blocks[0].ffn.up, model.blocks[3].ffn.down):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.02)  # the N(0, 0.02) re-init
    assert not torch.equal(model.blocks[0].ffn.up.weight, model.blocks[1].ffn.up.weight)
    torch.manual_seed(7)
    assert torch.equal(build_model(cfg).blocks[0].attention.qkv.weight, weights[0])  # reproducible from the seed
    torch.manual_seed(8)
    assert not torch.equal(build_model(cfg).blocks[0].attention.qkv.weight, weights[0])
    default = build_model(compose_config(["attention=standard", "scale=6m"]))
    assert not torch.equal(default.blocks[0].attention.qkv.weight, default.blocks[1].attention.qkv.weight)


def test_xavier_shared_attention_is_causal_and_matches_its_reference() -> None:
    module = CausalSelfAttention(32, 4, 40, attn_dropout=0.1, qkv_init="xavier_shared").double().eval()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    torch.testing.assert_close(module(x), causal_attention_reference(module, x), rtol=0, atol=1e-12)
    assert_causal(module, n=40, dim=32)
    with pytest.raises(ValueError, match="qkv_init='orthogonal'.*xavier_shared"):
        CausalSelfAttention(32, 4, 40, qkv_init="orthogonal")


# ----------------------------------------------------------------------------------------------------- the sweep

def test_sweep_rows_are_the_published_models_with_the_published_budget() -> None:
    jobs = list_jobs(["+sweep=wavefield_wikitext2"], validate=False)
    rows = {}
    for job in jobs:
        pairs = dict(item.split("=", 1) for item in job if not item.startswith("+"))
        rows[(pairs["attention"], EXPERIMENT_SCALE[pairs["experiment"]])] = job
    assert sorted(rows) == sorted(PUBLISHED_PARAMETERS) and len(jobs) == 4
    for (attention, scale), job in rows.items():
        cfg = compose_config(list(job))
        assert cfg.run.choices["scale"] == scale
        assert count_parameters(build_model(cfg)) == PUBLISHED_PARAMETERS[(attention, scale)]
        assert cfg.data.name == "wikitext2" and cfg.run.epochs == 30 and cfg.run.test
        optim = cfg.optim
        assert (optim.lr, optim.min_lr, list(optim.betas), optim.eps, optim.weight_decay, optim.decay_all,
                optim.warmup_epochs, optim.schedule, optim.grad_clip) == (3e-4, 1e-5, [0.9, 0.999], 1e-8, 0.01, True,
                                                                         3, "warmup_cosine", 0.5)
        # Lightning validates every int(30·S · fraction) batches: every 5 epochs for any S batches per epoch
        assert all(int(30 * s * cfg.trainer.val_check_interval) == 5 * s for s in range(1, 20_000))
    reference = OmegaConf.load(SWEEPS_DIR / "wavefield_wikitext2.yaml").reference
    published = {}
    for entry in reference:
        row = (entry.match.attention, EXPERIMENT_SCALE[entry.match.experiment])
        published.setdefault(row, {})[entry.metric] = entry.value
    assert published == {row: {"test_ppl_batch_mean": ppl, "test_acc": acc}
                         for row, (ppl, acc) in PUBLISHED_RESULTS.items()}


# ----------------------------------------------------------------------------------------------------- diagnostics

@pytest.mark.slow
def test_diagnostics_command_on_a_trained_checkpoint(tmp_path: Path) -> None:
    tiny_run = ["scale=tiny", "scale.n_layers=3", "seq_len=32", "data.batch_size=8", "data.val_windows=8",
                "optim.warmup_steps=1", "trainer.max_steps=4", "trainer.val_check_interval=2",
                "trainer.precision=32-true", "trainer.enable_progress_bar=false"]
    train(compose_config(["attention=wavefield", *tiny_run]), run_dir=tmp_path / "run")  # FIM after block 3
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model, _ = load_model(checkpoint)
    frequencies = model.blocks[0].attention.wave_frequency
    assert not torch.equal(frequencies, torch.linspace(0.3, 4.0, 2))  # trained, not the init

    out = tmp_path / "diagnostics"
    done = subprocess.run([sys.executable, "-m", "wavetrain.analysis.wavefield_diagnostics", str(checkpoint),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = (out / "wavefield_diagnostics.md").read_text()
    assert report.strip() in done.stdout
    for heading in ("## Wave kernels", "## Head coupling", "## Energy flow", "## Field interference",
                    "## Prediction confidence", "## The test sentence token by token", "## Field layout",
                    "## Verdicts"):
        assert heading in report, heading
    omega = frequencies[0].item()
    assert f"{omega:.4g}" != "0.3" and f"| 0 | 0 | {omega:.4g} |" in report  # the trained ω, not the init
    assert (out / "wavefield_kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    standard = tmp_path / "standard"
    train(compose_config(["attention=standard", *tiny_run]), run_dir=standard)
    refused = subprocess.run([sys.executable, "-m", "wavetrain.analysis.wavefield_diagnostics",
                              str(standard / "checkpoints" / "last.ckpt"), "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "no WaveFieldAttention layers" in refused.stderr
