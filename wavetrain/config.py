"""Config composition (the same as the CLI's) and validation before any work starts."""
from __future__ import annotations

import difflib
import functools
import hashlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

# ${max:a,b} in configs, e.g. DWARF's learned position table: 2050 rows, or seq_len when that is longer
if not OmegaConf.has_resolver("max"):
    OmegaConf.register_new_resolver("max", lambda *values: max(values))
# ${div:a,b} = a // b, e.g. warmup = 10% of trainer.max_steps, so `trainer.max_steps=50` alone is a valid run
if not OmegaConf.has_resolver("div"):
    OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))

# The configs ship inside the package (wavetrain/conf is a link to the repository's top-level conf/, and conf/sweep a
# link to sweeps/; a wheel holds copies of both): a source checkout, an editable install and an installed wheel all
# compose from here. Resolved, so messages name the repository's conf/ in a checkout.
CONF_DIR = (Path(__file__).resolve().parent / "conf").resolve()
GROUPS = ("attention", "scale", "data", "tokenizer", "optim", "trainer", "logger", "experiment")
LOGGER_KINDS = ("csv", "tensorboard", "wandb")
NONFINITE_MODES = ("stop", "skip")
_PROCESS_TOKEN = os.urandom(3).hex()  # one per process: run directories started in the same second stay apart


def _slurm_batch_job() -> str | None:
    """The SLURM job id of a batch job (array-aware), None outside SLURM or in an interactive allocation
    (the same test as Lightning's SLURMEnvironment)."""
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")


def run_stamp(overrides: str = "") -> str:
    """``${wavetrain.run_stamp:${hydra:job.override_dirname}}``: the unique part of a run directory's name.

    ``<date>/<time>-<token>`` (the token differs between processes, so two runs started in the same second never
    share a directory); in a SLURM batch job ``slurm/<job id>-<hash of the overrides>`` instead, which a requeued
    job recomputes identically, so it lands in the same directory and resumes there."""
    job = _slurm_batch_job()
    if job:
        return f"slurm/{job}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"
    return time.strftime("%Y-%m-%d/%H-%M-%S") + f"-{_PROCESS_TOKEN}"


def launch_token() -> str:
    """``${wavetrain.launch_token:}``: a short token distinguishing sweeps launched in the same second (cached in
    the sweep's config, so a submitit job requeued later resolves the same sweep directory)."""
    return _PROCESS_TOKEN


if not OmegaConf.has_resolver("wavetrain.run_stamp"):
    OmegaConf.register_new_resolver("wavetrain.run_stamp", run_stamp, use_cache=True)
if not OmegaConf.has_resolver("wavetrain.launch_token"):
    OmegaConf.register_new_resolver("wavetrain.launch_token", launch_token, use_cache=True)


class ConfigError(ValueError):
    """An invalid setting: the message names the key, the value and the fix."""


def group_choices(group: str) -> list[str]:
    """Every option of a config group (the yaml files of conf/<group>/)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides, exactly as ``python -m wavetrain`` does."""
    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wavetrain"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.run.overrides = overrides
        cfg.run.choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
        del cfg["hydra"]
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _positive(key: str, value, integer: bool = False) -> None:
    if not _is_number(value) or (integer and not isinstance(value, int)) or value <= 0:
        kind, example = ("a positive integer", "a whole number > 0") if integer else ("positive", "a value > 0")
        raise ConfigError(f"{key}={value!r} must be {kind}: set {key} to {example}")


def _non_negative(key: str, value, integer: bool = False) -> None:
    if not _is_number(value) or (integer and not isinstance(value, int)) or value < 0:
        kind = "a non-negative integer" if integer else ">= 0"
        raise ConfigError(f"{key}={value!r} must be {kind}: set {key} to 0 or more")


def _one_of(key: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {key}={close[0]}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is unknown: use one of {list(allowed)}{hint}")


def validate_config(cfg: DictConfig) -> None:
    """Reject settings that would waste a run, before any data or model is built.  Every message names the key,
    the value and the fix.  (Data problems are found by the data module, model-construction problems by
    :func:`check_model_builds`; both run before anything is written.)"""
    check_override_types(cfg)
    for key in ("d_model", "n_layers", "n_heads", "ffn_dim"):
        _positive(f"scale.{key}", cfg.scale[key], integer=True)
    if cfg.scale.d_model % cfg.scale.n_heads:
        raise ConfigError(f"scale.d_model={cfg.scale.d_model} is not divisible by scale.n_heads={cfg.scale.n_heads}: "
                          f"choose n_heads dividing d_model")
    if not _is_number(cfg.scale.dropout) or not 0 <= cfg.scale.dropout < 1:
        raise ConfigError(f"scale.dropout={cfg.scale.dropout!r} must be in [0, 1): e.g. scale.dropout=0.1")
    _positive("seq_len", cfg.seq_len, integer=True)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed!r} must be a non-negative integer (it seeds numpy's generators): e.g. "
                          f"seed=1337")
    _positive("data.batch_size", cfg.data.batch_size, integer=True)
    if cfg.data.get("val_windows") is not None:
        _positive("data.val_windows", cfg.data.val_windows, integer=True)
    _non_negative("data.num_workers", cfg.data.get("num_workers", 0), integer=True)
    path = cfg.data.get("path")
    if path and not any(ch in str(path) for ch in "*?[") and not Path(str(path)).expanduser().exists():
        raise ConfigError(f"data.path={path} does not exist: point data.path at a local copy of the corpus "
                            f"(a file, a folder or a glob), or set data.path=null for the default source")
    source = cfg.data.get("source")
    if isinstance(source, DictConfig) and source.get("formatter"):
        config_callable("data.source.formatter", source.formatter)
    if cfg.data.get("datamodule"):
        config_callable("data.datamodule", cfg.data.datamodule)
    special = cfg.tokenizer.get("special_tokens")
    vocab = cfg.tokenizer.get("vocab_size")
    if vocab is not None and special and isinstance(vocab, int) and vocab <= len(special):
        raise ConfigError(f"tokenizer.vocab_size={vocab} must exceed its {len(special)} special tokens "
                          f"{list(special)}: raise tokenizer.vocab_size")
    _positive("trainer.max_steps", cfg.trainer.max_steps, integer=True)
    accumulation = cfg.trainer.get("accumulate_grad_batches", 1)
    _positive("trainer.accumulate_grad_batches", accumulation, integer=True)
    for key in ("log_every_n_steps", "num_nodes"):
        if key in cfg.trainer:
            _positive(f"trainer.{key}", cfg.trainer[key], integer=True)
    interval = cfg.trainer.get("val_check_interval")
    if interval is not None and not _is_number(interval):
        raise ConfigError(f"trainer.val_check_interval={interval!r} must be a number: a fraction of the run in "
                          f"(0, 1] or a whole number of training batches")
    if isinstance(interval, float) and not 0 < interval <= 1:
        raise ConfigError(f"trainer.val_check_interval={interval} as a fraction must lie in (0, 1] of the run: use "
                          f"a fraction or an integer number of training batches")
    if isinstance(interval, int) and not isinstance(interval, bool):
        _positive("trainer.val_check_interval", interval, integer=True)
        batches = int(cfg.trainer.max_steps) * int(accumulation)
        if interval > batches and cfg.run.get("epochs") is None:
            raise ConfigError(f"trainer.val_check_interval={interval} training batches is longer than the run "
                              f"(trainer.max_steps={cfg.trainer.max_steps} x accumulate_grad_batches={accumulation} "
                              f"= {batches} batches): no validation would run; set "
                              f"trainer.val_check_interval<={batches}")
    _positive("optim.lr", cfg.optim.lr)
    if not _is_number(cfg.optim.min_lr) or cfg.optim.min_lr < 0 or cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} must lie in [0, optim.lr={cfg.optim.lr}]: lower min_lr")
    _non_negative("optim.warmup_steps", cfg.optim.warmup_steps, integer=True)
    if cfg.optim.warmup_steps >= cfg.trainer.max_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must lie in [0, trainer.max_steps="
                          f"{cfg.trainer.max_steps}): shorten the warmup or train longer")
    _non_negative("optim.weight_decay", cfg.optim.get("weight_decay", 0.0))
    _positive("optim.eps", cfg.optim.get("eps", 1e-8))
    betas = cfg.optim.get("betas", [0.9, 0.999])
    betas = list(betas) if OmegaConf.is_list(betas) else [betas]
    if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]")
    if cfg.optim.get("grad_clip") is not None:
        _non_negative("optim.grad_clip", cfg.optim.grad_clip)
    from wavetrain.lightning_module import SCHEDULES

    _one_of("optim.schedule", cfg.optim.get("schedule", "warmup_cosine"), SCHEDULES)
    _one_of("logger.kind", cfg.logger.get("kind"), LOGGER_KINDS)
    if cfg.run.get("epochs") is not None:
        _positive("run.epochs", cfg.run.epochs)
    _positive("run.checkpoint_every_n_steps", cfg.run.get("checkpoint_every_n_steps", 1), integer=True)
    _one_of("run.checkpoint_mode", cfg.run.get("checkpoint_mode", "min"), ("min", "max"))
    metric = str(cfg.run.get("checkpoint_metric", "val/loss"))
    if not metric.startswith("val/"):
        raise ConfigError(f"run.checkpoint_metric={metric} must be a validation metric (val/loss, val/loss_batch_mean, "
                          f"val/ppl, val/acc): the best checkpoint is chosen on held-out data")
    _one_of("run.on_nonfinite", cfg.run.get("on_nonfinite", "stop"), NONFINITE_MODES)
    _non_negative("run.max_nonfinite_skips", cfg.run.get("max_nonfinite_skips", 0), integer=True)
    if cfg.run.get("passkey"):
        trials = cfg.run.get("passkey_trials", 20)
        if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= 20:
            raise ConfigError(f"run.passkey_trials={trials}: give 1 to 20 (one trial per passkey word, spec "
                              f"dwarf.md §5)")
        distances = cfg.run.get("passkey_distances")
        if distances is not None and not (OmegaConf.is_list(distances) and len(distances) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in distances)):
            raise ConfigError(f"run.passkey_distances={distances}: give a list of non-negative token counts, e.g. "
                              f"[4,8,16], or null for the 37 distances of spec dwarf.md §5")


def config_callable(key: str, target: str):
    """A callable that the config names by its dotted path (``data.source.formatter``, ``data.datamodule``),
    resolved under the same policy as Hydra's ``_target_`` (hydra.utils.instantiate: os.system, subprocess, eval,
    file removal, ... are refused), so that a config value can never name something that runs commands."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate({"_target_": str(target), "_partial_": True})
    except InstantiationException as error:
        reason = " ".join(str(error).split("full_key:")[0].split())
        raise ConfigError(f"{key}={target!r} is refused: {reason.rstrip('.')}; name a function or class of a "
                          f"trusted module here (the shipped configs show the ones wavetrain provides)") from None


def _value_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else "a mapping"


@functools.lru_cache(maxsize=16)
def _compose_defaults(overrides: tuple[str, ...]) -> DictConfig:
    """The config composed with ``overrides`` only (group choices, ``+`` additions): the defaults the plain
    ``key=value`` overrides replace (read, never changed).  Inside a running Hydra app its own loader is used."""
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wavetrain"):
        return compose("config", overrides=list(overrides))


def check_override_types(cfg: DictConfig) -> None:
    """Every ``key=value`` of ``run.overrides`` has the type of the key's default: a number where the default is
    a number, true/false where it is a boolean, a list where it is a list (a string default or a null one takes
    anything; trainer.* is left to trainer_settings, whose keys take several types).  ConfigError naming the key,
    the value, the default and the fix."""
    from hydra.core.override_parser.types import OverrideType

    try:
        overrides = _parse_overrides([str(o) for o in cfg.run.get("overrides") or []])
    except Exception:  # noqa: BLE001 - overrides that Hydra itself composed but this parser cannot read: skip
        return
    plain = [o.key_or_group for o in overrides if o.type == OverrideType.CHANGE and o.package is None
             and o.key_or_group not in GROUPS and "/" not in o.key_or_group and not (CONF_DIR / o.key_or_group).is_dir()
             and not o.key_or_group.startswith(("hydra", "trainer.", "run.overrides", "run.choices"))]
    if not plain:
        return
    rest = [o.input_line for o in overrides if o.key_or_group not in plain and not o.key_or_group.startswith("hydra")]
    defaults = _compose_defaults(tuple(rest))
    for key in plain:
        default = OmegaConf.select(defaults, key, default=_ABSENT, throw_on_resolution_failure=False)
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        if default is _ABSENT or value is _ABSENT or default is None or value is None or isinstance(default, str):
            continue
        expected = _value_kind(default)
        if _value_kind(value) != expected:
            shown = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
            example = (str(shown).lower() if isinstance(shown, bool) else
                       f"[{','.join(map(str, shown))}]" if isinstance(shown, list) else str(shown))
            raise ConfigError(f"{key}={value!r} is {_value_kind(value)}, but {key} takes {expected} (its default "
                              f"is {example}): e.g. {key}={example}")


def check_run_dir_override(argv: Sequence[str]) -> None:
    """``hydra.run.dir=X`` on the command line: X (or, when X does not exist yet, the folder Hydra would create it
    in) must be writable, before Hydra creates anything."""
    for arg in argv:
        if not arg.startswith("hydra.run.dir=") or "${" in arg:
            continue
        target = Path(arg.split("=", 1)[1]).expanduser().absolute()
        existing = next(p for p in (target, *target.parents) if p.exists())
        writable = os.access(existing, os.W_OK) and (os.geteuid() != 0 or existing.stat().st_mode & 0o222)
        if existing.is_dir() and not writable:
            raise ConfigError(f"hydra.run.dir={target}: {existing} is read-only: make it writable, or give the run "
                              f"a writable hydra.run.dir")


def _innermost(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def check_model_builds(cfg: DictConfig) -> None:
    """Build the model once without training it, so that construction-time limits (the Wave Field stride rules of
    spec wavefield.md §7 via check_field_causality, learned-position rows, DWARF/WDA option checks, ...) fail
    before any data is tokenised.  On the meta device (no memory) where the modules allow it, else on the CPU."""
    import torch

    from wavetrain.models.lm import build_model

    vocab = cfg.tokenizer.get("vocab_size") or 256  # a char vocabulary comes from the corpus; its size is moot here
    try:
        try:
            with torch.device("meta"):
                build_model(cfg, int(vocab))
        except Exception as error:  # also hydra's InstantiationException wrapping a meta-device NotImplementedError
            if "meta" not in str(_innermost(error)) and not isinstance(_innermost(error), NotImplementedError):
                raise
            build_model(cfg, int(vocab))  # a module computes its layout from tensor values at construction
    except Exception as error:  # ValueError from a module, wrapped by hydra's InstantiationException
        cause = _innermost(error)
        choices = ", ".join(f"{g}={c}" for g, c in (cfg.run.get("choices") or {}).items() if g in ("attention",
                                                                                                   "scale"))
        raise ConfigError(f"the model does not build with seq_len={cfg.seq_len}{', ' + choices if choices else ''}: "
                          f"{_with_config_key(cfg, str(cause))}") from error


def _with_config_key(cfg: DictConfig, message: str) -> str:
    """A module's ``option='x' ...`` message names the option as the config key that sets it (attention.option)."""
    name = re.match(r"(\w+)=", message)
    if name and "attention" in cfg and name.group(1) in cfg.attention:
        return f"attention.{message}"
    return message


def _parse_overrides(argv: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    tokens = [a for a in argv if not a.startswith("-")]
    return OverridesParser.create().parse_overrides(tokens)


def check_cli_overrides(argv: Sequence[str]) -> None:
    """Check a command line's overrides before Hydra creates any directory: every group choice exists (also in a
    sweep list) and every plain ``key=value`` names a key of the composed config (the first job of a sweep), and so
    does every axis of a sweep file's ``hydra.sweeper.params``.  Raises ConfigError naming the override, the valid
    choices or the closest keys, and the fix.  Anything else (``hydra.*``, malformed overrides, type errors) is left
    to Hydra, whose own message names it."""
    from hydra.errors import OverrideParseException

    try:
        _check_cli_overrides(argv)
    except ConfigError:
        raise
    except OverrideParseException as error:
        bad = next((a for a in argv if not a.startswith("-") and "=" not in a), None)
        hint = f"{bad!r} is not an override" if bad else " ".join(str(error).split())
        raise ConfigError(f"{hint}: write overrides as key=value (e.g. trainer.max_steps=100) or group=choice "
                          f"(e.g. attention=wavefield); python -m wavetrain --help lists them") from None
    except Exception:  # noqa: BLE001 - what this pre-check cannot read, Hydra reports with its own message
        return


def _check_cli_overrides(argv: Sequence[str]) -> None:
    from hydra.errors import HydraException

    overrides = _parse_overrides(argv)
    first_job, plain = _check_group_choices(overrides, "")
    if not plain and not any(o.key_or_group == "sweep" for o in overrides):
        return
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wavetrain"):
            cfg = compose("config", overrides=first_job, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    params = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    with open_dict(cfg):
        del cfg["hydra"]
    known = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    axes = [f"{key}={value}" for key, value in params.items() if "${" not in str(value)]
    try:
        _, swept = _check_group_choices(_parse_overrides(axes), " (an axis of the sweep file's "
                                                                 "hydra.sweeper.params)")
    except HydraException:
        swept = []
    swept += [(key, str(value), " (an axis of the sweep file's hydra.sweeper.params)")
              for key, value in params.items() if "${" in str(value) and key not in GROUPS]
    for key, value, origin in plain + swept:
        if key not in known and OmegaConf.select(cfg, key, default=_ABSENT,
                                                 throw_on_resolution_failure=False) is _ABSENT:
            close = difflib.get_close_matches(key, known, n=3)
            raise ConfigError(f"{key}={value}{origin}: the config has no key {key}"
                              + (f" (closest: {', '.join(close)})" if close else "")
                              + f": fix the spelling, or add a new key deliberately with +{key}=...")


def _check_group_choices(overrides, origin: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Raise on an unknown group option; return the first job's group/added overrides and the plain keys."""
    from hydra.core.override_parser.types import OverrideType

    first_job, plain = [], []
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra") or override.package is not None:
            continue
        values = ([str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        if (key in GROUPS or (CONF_DIR / key).is_dir()) and override.type == OverrideType.CHANGE:
            valid = group_choices(key)
            for value in values:
                if value not in valid:
                    close = difflib.get_close_matches(value, valid, n=1)
                    raise ConfigError(f"{key}={value}{origin} is not an option of the {key} group: choose one of "
                                      f"{', '.join(valid)} (the files of conf/{key}/)"
                                      + (f"; did you mean {key}={close[0]}?" if close else ""))
        if key not in GROUPS and override.type == OverrideType.CHANGE and "/" not in key \
                and not (CONF_DIR / key).is_dir():  # another group (wda_ablation=...) is a choice, not a key
            plain.append((key, values[0] if values else "", origin))
        elif override.type in (OverrideType.CHANGE, OverrideType.ADD, OverrideType.FORCE_ADD) and values:
            prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++"}.get(override.type, "")
            first_job.append(f"{prefix}{key}={values[0]}")
    return first_job, plain


_ABSENT = object()


def _dotted_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        keys = []
        for key, value in node.items():
            keys.append(f"{prefix}{key}")
            keys += _dotted_keys(value, f"{prefix}{key}.")
        return keys
    return []
