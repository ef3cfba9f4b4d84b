"""Passkey retrieval, the DWARF protocol (spec dwarf.md §5), on trained checkpoints.

Prompt = tokens("the secret word is {word} .") + D filler tokens + tokens("the secret word is"), where the filler is
the token list of "the weather was mild and the air was still . " repeated and cut to exactly D tokens.  One forward
pass per (D, word); at the last position the true word competes with 9 distractors (the first 9 other words of the
20-word list); a word's score is the logit of the first token of encode(" " + word) (encode(word) if that is
empty); the trial is correct iff the true word's score is the maximum (ties count as correct).  Accuracy at D is the
mean over the words; chance is 1/10.  Also recorded per D: the mean log-probability and the mean vocabulary rank of
the true word's first token.  A distance is skipped when the prompt does not fit the model's context (the
reference's rule: D <= context - 1 - len(intro) - len(cue), context = the run's seq_len).  The reference's
no-passkey baseline (200 filler tokens + cue, no word planted) is measured too.

    python -m wavetrain.eval.passkey CKPT [CKPT ...] [--distances 5,20,50] [--trials 20] --out DIR

One checkpoint gives its table (distance, accuracy, mean rank, mean log p, trials, dyadic tap or not); several
give the same per run plus one summary table (a row per run, a column per distance): the passkey table of a sweep,
e.g. of the 13M ablation after it finished:

    python -m wavetrain.eval.passkey multirun/dwarf_13m/<launch time>/*/checkpoints/best-step*.ckpt --out passkey_13m

Written to DIR: ``passkey.md`` (Markdown tables), ``passkey.csv`` (one line per run and distance) and
``passkey.json``.  The tokenizer is the run's own copy (``tokenizer.json`` in the run directory, written at
training time), else the data cache's (``TokenStore(cfg.data, cfg.tokenizer)``), else ``--tokenizer PATH``.
Published: condK 13M, "~10% accuracy at all distances" = chance (spec §4).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

PASSKEY_WORDS: tuple[str, ...] = ("apple", "tiger", "robot", "ocean", "piano", "eagle", "storm", "river", "crown",
                                  "flame", "ghost", "clock", "brick", "frost", "sword", "light", "brush", "stone",
                                  "shelf", "grape")
N_DISTRACTORS = 9                        # the first 9 other words of the list (§5)
CHANCE = 1.0 / (1 + N_DISTRACTORS)       # 10-way choice: 10%
FILLER_SENTENCE = "the weather was mild and the air was still . "
INTRO_TEMPLATE = "the secret word is {word} ."
RETRIEVAL_CUE = "the secret word is"
# §5 distances: round numbers, the D4 tap offsets of condK, and offsets between the taps
ROUND_DISTANCES = (5, 20, 50, 100, 200, 300, 500, 750, 1000, 1250, 1500, 1700, 1850)
DYADIC_DISTANCES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)
NON_DYADIC_DISTANCES = (10, 20, 40, 80, 160, 320, 640, 1280)
DISTANCES: tuple[int, ...] = tuple(sorted({*ROUND_DISTANCES, *DYADIC_DISTANCES, *NON_DYADIC_DISTANCES}))
BASELINE_FILLER = 200                    # filler tokens of the no-passkey baseline (reference passkey_test.py)


@dataclass
class DistanceResult:
    """Passkey accuracy at one distance (fraction of trials won), with the true token's mean rank and log-prob."""
    distance: int
    trials: int
    accuracy: float
    mean_rank: float
    mean_log_prob: float
    dyadic: bool                         # D is one of condK's D4 tap offsets (the reference's "D4 tap" column)


def distractors(word: str) -> list[str]:
    """The 9 distractors of ``word``: the first 9 other words in list order (§5)."""
    return [other for other in PASSKEY_WORDS if other != word][:N_DISTRACTORS]


def answer_token(tokenizer, word: str) -> int:
    """The id a candidate is scored by: the first token of encode(" " + word), or of encode(word) (§5)."""
    ids = tokenizer.encode(" " + word) or tokenizer.encode(word)
    if not ids:
        raise ValueError(f"the tokenizer encodes {word!r} to no token: passkey needs a tokenizer that covers it")
    return ids[0]


def check_candidates(tokenizer, words: Sequence[str]) -> None:
    """Every trial's 10 candidates must have distinct answer tokens, or the 10-way choice is degenerate (ties
    count as correct: a character tokenizer, whose first token is always " ", would score 100%)."""
    for word in words:
        candidates = [word, *distractors(word)]
        tokens = [answer_token(tokenizer, c) for c in candidates]
        if len(set(tokens)) < len(tokens):
            shared = sorted({c for c, t in zip(candidates, tokens) if tokens.count(t) > 1})
            raise ValueError(f"passkey candidates {shared} share their first token under this tokenizer "
                             f"({type(tokenizer).__name__}, {tokenizer.vocab_size} ids), so ties would score the "
                             f"10-way choice as won: evaluate a run whose tokenizer holds the passkey words as "
                             f"single tokens (the DWARF BPE 32k on OpenWebText, tokenizer=bpe32k_owt)")


def filler(tokenizer, distance: int) -> list[int]:
    """Exactly ``distance`` filler tokens: the filler sentence's tokens repeated and cut (§5)."""
    unit = tokenizer.encode(FILLER_SENTENCE)
    return (unit * (distance // len(unit) + 1))[:distance]


def passkey_prompt(tokenizer, word: str, distance: int, context: int) -> list[int] | None:
    """intro + D filler tokens + cue, or None when it does not fit ``context`` positions (the reference's rule)."""
    intro = tokenizer.encode(INTRO_TEMPLATE.format(word=word))
    cue = tokenizer.encode(RETRIEVAL_CUE)
    if distance > context - 1 - len(intro) - len(cue):
        return None
    return intro + filler(tokenizer, distance) + cue


@torch.no_grad()
def last_logits(model: nn.Module, prompts: Sequence[Sequence[int]], device: torch.device,
                autocast: bool = False) -> torch.Tensor:
    """Float32 logits (len(prompts), V) at each prompt's last position.  Prompts of equal length share a forward
    pass; no padding, since field conditions A–D depend on the sequence length."""
    out: list[torch.Tensor | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    for indices in by_length.values():
        ids = torch.tensor([list(prompts[i]) for i in indices], dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=autocast and device.type == "cuda"):
            logits = model(ids)[:, -1].float().cpu()
        for row, index in enumerate(indices):
            out[index] = logits[row]
    return torch.stack(out)


@torch.no_grad()
def evaluate_passkey(model: nn.Module, tokenizer, *, context: int, distances: Sequence[int] = DISTANCES,
                     trials: int = len(PASSKEY_WORDS), device: torch.device | str = "cpu", autocast: bool = False,
                     progress: Callable[[str], None] | None = None) -> list[DistanceResult]:
    """Accuracy of the 10-way passkey choice at every distance that fits ``context`` (§5), ``trials`` words each
    (the first ``trials`` of the 20; each keeps its 9 distractors from the full list)."""
    if not 1 <= trials <= len(PASSKEY_WORDS):
        raise ValueError(f"--trials {trials}: give 1 to {len(PASSKEY_WORDS)} (one trial per passkey word)")
    device = torch.device(device)
    words = PASSKEY_WORDS[:trials]
    check_candidates(tokenizer, words)
    model.eval()
    results = []
    for distance in sorted(set(int(d) for d in distances)):
        prompts = [passkey_prompt(tokenizer, word, distance, context) for word in words]
        if any(prompt is None for prompt in prompts):
            if progress:
                progress(f"passkey D={distance}: skipped (the prompt does not fit the context of {context} tokens)")
            continue
        logits = last_logits(model, prompts, device, autocast)
        wins, ranks, log_probs = [], [], []
        for word, row in zip(words, logits):
            scores = [row[answer_token(tokenizer, c)].item() for c in [word, *distractors(word)]]
            target = answer_token(tokenizer, word)
            wins.append(scores[0] >= max(scores))
            ranks.append(1 + int((row > row[target]).sum()))
            log_probs.append(F.log_softmax(row, dim=-1)[target].item())
        result = DistanceResult(distance, len(words), sum(wins) / len(wins), sum(ranks) / len(ranks),
                                sum(log_probs) / len(log_probs), distance in DYADIC_DISTANCES)
        results.append(result)
        if progress:
            progress(f"passkey D={distance}: accuracy {result.accuracy:.0%} over {result.trials} words, "
                     f"mean rank {result.mean_rank:.0f}, mean log p {result.mean_log_prob:.2f}")
    return results


@torch.no_grad()
def no_passkey_baseline(model: nn.Module, tokenizer, *, context: int, trials: int = len(PASSKEY_WORDS),
                        device: torch.device | str = "cpu", autocast: bool = False) -> float | None:
    """The reference's random baseline: 200 filler tokens + cue with no word planted, scored as a trial of each
    word (a passkey-blind model sits about here); None when that prompt does not fit ``context``."""
    words = PASSKEY_WORDS[:trials]
    prompt = filler(tokenizer, BASELINE_FILLER) + tokenizer.encode(RETRIEVAL_CUE)
    if len(prompt) > context:
        return None
    row = last_logits(model, [prompt], torch.device(device), autocast)[0]
    wins = [row[answer_token(tokenizer, w)].item() >= max(row[answer_token(tokenizer, d)].item()
                                                            for d in distractors(w)) for w in words]
    return sum(wins) / len(wins)


def markdown_table(results: Sequence[DistanceResult]) -> str:
    """One run's passkey table: a row per distance."""
    lines = ["| distance D | accuracy | mean rank | mean log p | trials | D4 tap offset |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for r in results:
        lines.append(f"| {r.distance} | {r.accuracy:.0%} | {r.mean_rank:.0f} | {r.mean_log_prob:.2f} | {r.trials} | "
                     f"{'yes' if r.dyadic else ''} |")
    if results:
        mean = sum(r.accuracy for r in results) / len(results)
        lines.append(f"| **mean** | **{mean:.1%}** | | | | |")
    return "\n".join(lines)


def summary_table(runs: dict[str, list[DistanceResult]]) -> str:
    """Several runs side by side: a row per run, the accuracy at every distance any run reached, and the mean."""
    distances = sorted({r.distance for results in runs.values() for r in results})
    lines = ["| run | " + " | ".join(f"D={d}" for d in distances) + " | mean |",
             "|---|" + "---:|" * (len(distances) + 1)]
    for label, results in runs.items():
        by_distance = {r.distance: r.accuracy for r in results}
        cells = [f"{by_distance[d]:.0%}" if d in by_distance else "—" for d in distances]
        mean = sum(by_distance.values()) / len(by_distance) if by_distance else math.nan
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.1%} |")
    return "\n".join(lines)


def find_tokenizer(checkpoint: Path, cfg: DictConfig, explicit: Path | None = None):
    """The run's tokenizer: ``explicit``, else tokenizer.json in the run directory (beside checkpoints/), else the
    one in the data cache; a clear error when none exists (a new one would not match the trained embeddings)."""
    from wavetrain.data.datamodule import TokenStore
    from wavetrain.data.sources import DataError
    from wavetrain.data.tokenizers import load_tokenizer

    candidates = [explicit] if explicit is not None else [checkpoint.resolve().parent.parent / "tokenizer.json",
                                                          checkpoint.resolve().parent / "tokenizer.json"]
    if explicit is None:
        try:
            candidates.append(TokenStore(cfg.data, cfg.tokenizer).dir / "tokenizer.json")
        except (DataError, OSError):  # data.path of the training machine may not exist here
            pass
    for path in candidates:
        if path is not None and path.exists():
            return load_tokenizer(path), path
    raise FileNotFoundError(f"no tokenizer for {checkpoint}: looked at {[str(p) for p in candidates]}; pass "
                            f"--tokenizer /path/to/the/run's/tokenizer.json")


def run_label(checkpoint: Path, cfg: DictConfig) -> str:
    """attention choice (+ scale) and the run directory, e.g. "dwarf_condK 13m (multirun/dwarf_13m/…/9)"."""
    choices = cfg.get("run", {}).get("choices", {}) or {}
    name = " ".join(str(choices[g]) for g in ("attention", "scale") if choices.get(g)) or checkpoint.stem
    return f"{name} ({checkpoint.resolve().parent.parent.name}/{checkpoint.name})"


def _percent(value: float | None) -> str:
    return "n/a (does not fit the context)" if value is None else f"{value:.0%}"


def write_outputs(out_dir: Path, runs: dict[str, list[DistanceResult]], baselines: dict[str, float | None],
                  trials: int) -> list[Path]:
    """passkey.md (tables), passkey.csv (run, distance, …) and passkey.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"# Passkey retrieval (spec dwarf.md §5)\n\n{trials} passkey words per distance, 10-way choice "
                f"(true word + 9 distractors): chance = {CHANCE:.0%}. Published: condK 13M ~10% at all distances."]
    for label, results in runs.items():
        sections.append(f"## {label}\n\nno-passkey baseline (200 filler tokens + cue): {_percent(baselines[label])}\n\n"
                        f"{markdown_table(results)}")
    if len(runs) > 1:
        sections.append(f"## All runs (accuracy)\n\n{summary_table(runs)}")
    md, table, raw = out_dir / "passkey.md", out_dir / "passkey.csv", out_dir / "passkey.json"
    md.write_text("\n\n".join(sections) + "\n")
    fields = ["run", *DistanceResult.__dataclass_fields__]
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for label, results in runs.items():
            for r in results:
                writer.writerow({"run": label, **asdict(r)})
    raw.write_text(json.dumps({"chance": CHANCE, "trials": trials, "baselines": baselines,
                               "runs": {label: [asdict(r) for r in results] for label, results in runs.items()}},
                              indent=2))
    return [md, table, raw]


def check_run_tokenizer(tokenizer) -> None:
    """run.passkey=true, before training: the run's tokenizer must score the 10-way choice (:func:`check_candidates`);
    raises ValueError naming the fix otherwise."""
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise ValueError("run.passkey=true needs a text tokenizer (this data module has none): set run.passkey=false "
                         "or train on text with tokenizer=bpe32k_owt")
    check_candidates(tokenizer, PASSKEY_WORDS)


def passkey_after_training(checkpoint: Path, tokenizer, out_dir: Path, *, context: int,
                           distances: Sequence[int] | None = None, trials: int = len(PASSKEY_WORDS),
                           device: torch.device | str = "cpu") -> dict[str, float | int | None]:
    """run.passkey=true: the §5 protocol on a run's checkpoint at the end of training.  Writes passkey.md / .csv /
    .json into ``out_dir`` and returns the results.json entries: ``passkey_acc`` (mean accuracy over the distances
    that fit ``context``; None if none fits), ``passkey_baseline`` (the no-passkey baseline) and
    ``passkey_distances`` (how many distances were scored)."""
    from wavetrain import load_model

    model, cfg = load_model(checkpoint)
    model.to(device)
    label = run_label(checkpoint, cfg)
    results = evaluate_passkey(model, tokenizer, context=context, distances=distances or DISTANCES, trials=trials,
                               device=device)
    baseline = no_passkey_baseline(model, tokenizer, context=context, trials=trials, device=device)
    write_outputs(out_dir, {label: results}, {label: baseline}, trials)
    accuracy = sum(r.accuracy for r in results) / len(results) if results else None
    return {"passkey_acc": accuracy, "passkey_baseline": baseline, "passkey_distances": len(results)}


def _distances(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--distances {text!r}: give comma-separated token counts, e.g. 5,20,50") \
            from err
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"--distances {text!r}: give non-negative token counts, e.g. 5,20,50")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wavetrain.eval.passkey", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="wavetrain .ckpt file(s)")
    parser.add_argument("--out", type=Path, required=True, help="directory for passkey.md / .csv / .json")
    parser.add_argument("--distances", type=_distances, default=list(DISTANCES),
                        help="comma-separated filler lengths D (default: the 37 distances of spec §5)")
    parser.add_argument("--trials", type=int, default=len(PASSKEY_WORDS),
                        help=f"passkey words per distance, 1..{len(PASSKEY_WORDS)} (default: all)")
    parser.add_argument("--context", type=int, default=None,
                        help="positions a prompt may use (default: the run's seq_len)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json of the run (default: found)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-autocast", action="store_true",
                        help="fp32 on CUDA (default: fp16 autocast on CUDA as the reference; CPU is always fp32)")
    args = parser.parse_args(argv)
    if not 1 <= args.trials <= len(PASSKEY_WORDS):
        parser.error(f"--trials {args.trials}: give 1 to {len(PASSKEY_WORDS)}")

    from wavetrain import load_model

    runs: dict[str, list[DistanceResult]] = {}
    baselines: dict[str, float | None] = {}
    print(f"passkey: chance = 1/{1 + N_DISTRACTORS} = {CHANCE:.0%} (true word + {N_DISTRACTORS} distractors)",
          flush=True)
    for checkpoint in args.checkpoints:
        model, cfg = load_model(checkpoint)
        tokenizer, tokenizer_path = find_tokenizer(checkpoint, cfg, args.tokenizer)
        model.to(args.device)
        label = run_label(checkpoint, cfg)
        context = args.context or int(cfg.seq_len)
        print(f"passkey: {label}: context {context}, tokenizer {tokenizer_path}", flush=True)
        try:
            results = evaluate_passkey(model, tokenizer, context=context, distances=args.distances,
                                       trials=args.trials, device=args.device, autocast=not args.no_autocast,
                                       progress=lambda line: print(line, flush=True))
        except ValueError as err:
            print(f"passkey: {checkpoint}: {err}", file=sys.stderr)
            return 1
        runs[label] = results
        if not results:
            print(f"passkey: {label}: no distance fits the context of {context} tokens", flush=True)
        baselines[label] = no_passkey_baseline(model, tokenizer, context=context, trials=args.trials,
                                               device=args.device, autocast=not args.no_autocast)
        print(f"\n## {label}\n\nno-passkey baseline: {_percent(baselines[label])}, chance {CHANCE:.0%}\n\n"
              f"{markdown_table(results)}\n", flush=True)
    if len(runs) > 1:
        print(summary_table(runs))
    for path in write_outputs(args.out, runs, baselines, args.trials):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
