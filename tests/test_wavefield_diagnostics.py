"""Wave Field diagnostics of spec wavefield.md §6 on a randomly initialised language model: energy flow and gates
(§6.3), per-token interference strengths through the CLI (§6.4), prediction confidence (§6.5), the §6.6 verdicts
(vocabulary pressure included) and the kernel figure (one panel per head, lags in tokens)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib.figure
import pytest
import torch

from wavetrain import build_model, compose_config
from wavetrain.analysis import wavefield_diagnostics as diagnostics
from wavetrain.data.tokenizers import CharTokenizer

TEXT = "the history of the city begins"


@pytest.fixture(scope="module")
def tiny_lm():
    """A 3-layer Wave Field LM (FIM after block 3) over a character vocabulary, randomly initialised."""
    tokenizer = CharTokenizer()
    tokenizer.train(["abcdefghijklmnopqrstuvwxyz ."])
    cfg = compose_config(["attention=wavefield", "scale=tiny", "scale.n_layers=3", "seq_len=32"])
    torch.manual_seed(0)
    return build_model(cfg, tokenizer.vocab_size).eval(), cfg, tokenizer


def test_energy_flow_records_each_layer_input_and_gate(tiny_lm) -> None:
    model, _, tokenizer = tiny_lm
    ids = torch.tensor([tokenizer.encode(TEXT)])
    rows = diagnostics.energy_flow(model, ids)
    assert [r["module"] for r in rows] == [f"blocks.{i}.attention" for i in range(3)]
    block = model.blocks[1]
    with torch.no_grad():  # the input of layer 1's attention is LN1 of the residual stream after block 0
        stream = block.norm1(model.blocks[0](model.embed(ids)))
        gates = torch.sigmoid(block.attention.gate_proj(stream)).mean(-1)[0]
    torch.testing.assert_close(torch.tensor(rows[1]["norms"]), stream[0].norm(dim=-1))
    torch.testing.assert_close(torch.tensor(rows[1]["gates"]), gates)
    assert rows[0]["change_pct"] == 0.0
    assert rows[2]["change_pct"] == pytest.approx(100 * (rows[2]["mean_norm"] / rows[0]["mean_norm"] - 1))
    assert sum(rows[0]["gate_counts"].values()) == len(TEXT)
    assert diagnostics._gate_label(0.61) == "HIGH" and diagnostics._gate_label(0.5) == "MED"
    assert diagnostics._gate_label(0.4) == "LOW"


def test_confidence_is_the_softmax_of_the_logits(tiny_lm) -> None:
    model, _, tokenizer = tiny_lm
    ids = torch.tensor([tokenizer.encode(TEXT)])
    report = diagnostics.confidence_report(model, ids, lambda i: tokenizer.decode([i]))
    with torch.no_grad():
        probabilities = torch.softmax(model(ids)[0], -1)
    torch.testing.assert_close(torch.tensor(report["max_prob"]), probabilities.max(-1).values)
    hits = (probabilities.argmax(-1)[:-1] == ids[0, 1:]).tolist()
    assert report["hit"] == hits + [None] and report["hit_rate"] == pytest.approx(sum(hits) / len(hits))
    assert report["max_entropy"] == pytest.approx(math.log(tokenizer.vocab_size))
    assert all(0 <= h <= report["max_entropy"] + 1e-6 for h in report["entropy"])
    assert report["argmax_text"] == [tokenizer.decode([i]) for i in report["argmax"]]


@pytest.mark.parametrize("experiment,resolution,pressure,ratio", [
    ("wavefield_wt2", "OK", "OK", "OK"),                          # s = 7.99, V/D = 4, G/M = 7.9
    ("wavefield_wt2_bpe8k", "WARNING", "WARNING", "WARNING")])   # s = 3.996, V/D = 31.25, G/M = 3.98
def test_verdicts_of_the_published_configs(experiment: str, resolution: str, pressure: str, ratio: str) -> None:
    """spec §6.6, §8: the BPE-8K model is the one the reference's report warns about (vocab/embedding 31×)."""
    model = build_model(compose_config([f"experiment={experiment}"]))
    rows = {check: (verdict, why) for check, verdict, why in
            diagnostics.verdicts(diagnostics.field_report(model), diagnostics.vocab_pressure(model))}
    assert (rows["resolution"][0], rows["vocabulary pressure"][0], rows["field / sequence"][0]) == (
        resolution, pressure, ratio)
    assert ("8000 / 256 = 31.2" if pressure == "WARNING" else "1024 / 256 = 4") in rows["vocabulary pressure"][1]


def test_kernel_figure_has_one_panel_per_head_with_token_lags(tiny_lm, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = tiny_lm
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: figures.append(fig))
    diagnostics.plot_kernels(model, tmp_path / "kernels.png")
    (figure,) = figures
    panels = [axis for axis in figure.axes if axis.has_data()]
    assert len(panels) == 3 * 2  # layers × heads
    first = model.blocks[0].attention
    assert panels[1].get_title().startswith("L0 h1 ")
    assert all(axis.get_xlabel() == "lag (tokens)" for axis in panels[-2:])
    line, dots = panels[0].get_lines()[:2]
    assert dots.get_xdata().tolist() == list(range(len(dots.get_xdata())))  # a dot at every whole-token lag
    assert line.get_xdata()[1] == pytest.approx(1 / first.field_stride)  # field cells, plotted in tokens
    kernel = first.kernels()[0].detach().double()
    assert dots.get_ydata()[1] == pytest.approx(float(diagnostics._at(kernel, torch.tensor([first.field_stride],
                                                                                           dtype=torch.float64))))


def test_cli_reports_every_section_of_spec_6(tiny_lm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wavetrain

    model, cfg, tokenizer = tiny_lm
    tokenizer.save(tmp_path / "tokenizer.json")
    monkeypatch.setattr(wavetrain, "load_model", lambda path: (model, cfg), raising=False)
    diagnostics.main(["run/checkpoints/last.ckpt", "--out", str(tmp_path / "report"), "--text", TEXT,
                      "--tokenizer", str(tmp_path / "tokenizer.json")])
    report = (tmp_path / "report" / "wavefield_diagnostics.md").read_text()
    for heading in ("## Wave kernels (spec §6.1)", "## Head coupling", "## Energy flow and gates (spec §6.3)",
                    "## Field interference (spec §6.4)", "## Prediction confidence (spec §6.5)",
                    "## The test sentence token by token", f"## Field layout (spec §6.6), N = {len(TEXT)} tokens",
                    "## Verdicts (spec §6.6)", "| vocabulary pressure | OK |"):
        assert heading in report, heading
    strengths = diagnostics.interference_report(model, torch.tensor([tokenizer.encode(TEXT)]))[0]["strengths"]
    assert len(strengths) == len(TEXT)
    per_token = report.split("## The test sentence token by token")[1].split("##")[0]
    row_3 = next(line for line in per_token.splitlines() if line.startswith("| 3 |"))
    assert "s_t blocks.2.interference" in per_token and f"| {strengths[3]:.4g} |" in row_3
    assert (tmp_path / "report" / "wavefield_kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="encodes to 1 token"):
        diagnostics.main(["run/checkpoints/last.ckpt", "--out", str(tmp_path / "r2"), "--text", "a",
                          "--tokenizer", str(tmp_path / "tokenizer.json")])
