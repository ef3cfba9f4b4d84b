"""Sweep files (sweeps/*.yaml, the config group ``sweep``): the seed-axis resolver and the dry run.

``python -m wavetrain -m +sweep=<name> [overrides] --dry-run`` lists the jobs the sweep would launch, exactly as
Hydra's basic sweeper expands them (``hydra.sweeper.params`` × command-line sweeps), composes and validates the
config of every row, and trains nothing.  The format of the sweep files is documented in sweeps/README.md.
"""
from __future__ import annotations

import copy
import functools
import itertools
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from wavetrain.config import CONF_DIR, ConfigError, validate_config

SWEEPS_DIR = (CONF_DIR / "sweep").resolve()  # sweeps/ in a checkout, the installed copy in a wheel
MULTIRUN_FLAGS = ("-m", "--multirun")


def sweep_values(values: ListConfig | Sequence) -> str:
    """``${wavetrain.sweep_values:${sweep.seeds}}``: a list as a Hydra sweep axis (``[1, 2]`` -> ``"1,2"``)."""
    if isinstance(values, (str, int, float)):
        values = [values]
    values = list(values)
    if not values:
        raise ConfigError("sweep.seeds=[] is empty: give at least one seed, e.g. sweep.seeds=[1337]")
    return ",".join(str(v) for v in values)


if not OmegaConf.has_resolver("wavetrain.sweep_values"):
    OmegaConf.register_new_resolver("wavetrain.sweep_values", sweep_values)


def sweep_names() -> list[str]:
    """The sweep files of sweeps/ (the options of the ``sweep`` config group)."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def list_jobs(overrides: Sequence[str], validate: bool = True) -> list[list[str]]:
    """The override list of every job ``python -m wavetrain -m <overrides>`` would launch, in launch order.

    As Hydra's multirun does: the master config is composed from the overrides that are not sweeps, and the basic
    sweeper expands its ``hydra.sweeper.params`` followed by the command line's overrides (:func:`expand_sweep`).
    With ``validate`` every row's config (one job per row: seeds compose alike) is composed and checked by
    ``validate_config``, so a misspelt option or an invalid row fails here, naming the job.  Hydra's public API only
    (compose and the override parser).
    """
    overrides = [o for o in overrides if o not in MULTIRUN_FLAGS]
    parsed = _parse(overrides, "the command line")
    hydra_overrides = tuple(o.input_line for o in parsed if o.is_hydra_override())
    task = [o for o in parsed if not o.is_hydra_override()]
    try:
        master = _compose(hydra_overrides + tuple(o.input_line for o in task if not o.is_sweep_override()),
                          with_hydra=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"{' '.join(overrides)} does not compose: {error}") from error
    sweeper_target = master.hydra.sweeper.get("_target_", "")
    if not sweeper_target.endswith("BasicSweeper"):
        raise ConfigError(f"hydra.sweeper={sweeper_target} is not Hydra's basic sweeper: the dry run lists "
                          f"basic-sweeper grids only")
    params = master.hydra.sweeper.params  # None or empty for a single run (no sweep file)
    params = OmegaConf.to_container(params, resolve=True) if params else {}
    jobs = expand_sweep([f"{key}={value}" for key, value in params.items()] + [o.input_line for o in task])
    if validate:
        validate_jobs(jobs)
    return jobs


def expand_sweep(arguments: Sequence[str]) -> list[list[str]]:
    """The jobs of Hydra's basic sweeper for ``arguments`` (its ``params`` as ``key=value``, then the task
    overrides): one axis per key, in order of first appearance, a later override of a key replacing the earlier one
    in its place; a comma-separated value (or ``range``/``choice``) is an axis of several values; the jobs are the
    cartesian product of the axes, the last axis varying fastest."""
    axes: dict[str, list[str]] = {}
    for override in _parse(arguments, "the sweep"):
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise ConfigError(f"{override.input_line}: the basic sweeper takes lists of values only (a,b,c, range or "
                              f"choice), not {override.value_type.name.lower()} sweeps")
    return [list(job) for job in itertools.product(*axes.values())]


def _parse(overrides: Sequence[str], where: str) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise ConfigError(f"{where} has an override Hydra cannot parse: {error}") from error


@contextmanager
def _hydra() -> Iterator[None]:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wavetrain"):
            yield
    finally:
        GlobalHydra.instance().clear()


@functools.lru_cache(maxsize=512)
def _compose(overrides: tuple[str, ...], with_hydra: bool = False) -> DictConfig:
    """``compose`` of these overrides; cached, so the rows of a grid over plain keys, and dry runs of one sweep with
    other plain values, compose once (callers copy)."""
    with _hydra():
        return compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def _is_group(override: Override) -> bool:
    """A config group override (``attention=wda``, ``+sweep=mqar``, ``hydra/launcher=slurm``): Hydra composes it
    into the defaults list; every other override sets a key of the composed config."""
    key = override.key_or_group
    return override.package is not None or key.startswith("hydra/") or (CONF_DIR / key).is_dir()


def validate_jobs(jobs: list[list[str]]) -> None:
    """Compose and validate one job per row (seeds compose alike).  As in Hydra, a job's config is the
    composition of its group overrides, then its plain ``key=value`` overrides applied in order; rows sharing their
    group overrides share the composition.  Hydra's own overrides (``hydra/launcher=...``, ``hydra.*``) shape no
    job's config (the master composition above checked that they compose), so they are left out here."""
    rows: dict[tuple, tuple[int, list[str]]] = {}
    for number, job in enumerate(jobs):
        rows.setdefault(tuple(o for o in job if not o.startswith("seed=")), (number, job))
    for number, job in rows.values():
        try:
            parsed = _parse(job, f"job #{number}")
            groups = tuple(o.input_line for o in parsed if _is_group(o))
            job_cfg = copy.deepcopy(_compose(groups))
            for override in parsed:
                if not _is_group(override):
                    apply_override(job_cfg, override)
            validate_config(job_cfg)
        except (HydraException, OmegaConfBaseException, ConfigError, ValueError) as error:
            raise ConfigError(f"job #{number} ({' '.join(job)}) does not compose: {error}") from error


def apply_override(cfg: DictConfig, override: Override) -> None:
    """A plain ``key=value`` / ``+key=value`` / ``++key=value`` / ``~key`` override, with Hydra's rules: a value
    replaces an existing key only, ``+`` adds a new key only, ``++`` does either, ``~`` deletes an existing key."""
    key, value = override.key_or_group, override.value()
    exists = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False,
                               throw_on_resolution_failure=False) is not _ABSENT
    if override.is_delete():
        if not exists:
            raise ConfigError(f"~{key}: the config has no key {key} to delete")
        parent, _, leaf = key.rpartition(".")
        with open_dict(cfg):
            del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
    elif override.is_add():
        if exists and OmegaConf.select(cfg, key, throw_on_resolution_failure=False) is not None \
                and not isinstance(value, (dict, list)):
            raise ConfigError(f"{override.input_line}: {key} exists already: drop the +, or use ++ to add or override")
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    elif override.is_force_add():
        OmegaConf.update(cfg, key, value, merge=True, force_add=True)
    else:
        if not exists:
            raise ConfigError(f"{override.input_line}: the config has no key {key}; to add one use +{override.input_line}")
        OmegaConf.update(cfg, key, value, merge=True)


_ABSENT = object()


def dry_run(argv: Sequence[str]) -> int:
    """Print the jobs of a sweep (``--dry-run`` on the command line) and their count; 0 when all compose."""
    overrides = [a for a in argv if a != "--dry-run"]
    flags = [a for a in overrides if a.startswith("-") and a not in MULTIRUN_FLAGS]
    if flags:
        print(f"wavetrain --dry-run: option(s) {' '.join(flags)} are not supported with --dry-run: "
              f"give only overrides (and -m)", file=sys.stderr)
        return 2
    try:
        jobs = list_jobs(overrides)
    except (ConfigError, HydraException) as error:
        print(f"wavetrain --dry-run: {error}", file=sys.stderr)
        return 1
    for number, job in enumerate(jobs):
        print(f"#{number}: {' '.join(job)}")
    print(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''} (nothing was trained)")
    return 0

