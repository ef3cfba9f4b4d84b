"""Sweep files (sweeps/*.yaml, the config group ``sweep``): the seed-axis resolver and the dry run.

``python -m wavetrain -m +sweep=<name> [overrides] --dry-run`` lists the jobs the sweep would launch, exactly as
Hydra's basic sweeper expands them (``hydra.sweeper.params`` × command-line sweeps), composes and validates the
config of every row, and trains nothing.  The format of the sweep files is documented in sweeps/README.md.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

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

    Uses Hydra's own expansion (the basic sweeper's parser and product); with ``validate`` every row's config (one
    job per row: seeds compose alike) is composed and checked by ``validate_config``, so a misspelt option or an
    invalid row fails here, naming the job.
    """
    overrides = [o for o in overrides if o not in MULTIRUN_FLAGS]
    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(task_name="wavetrain", config_search_path=create_config_search_path(
        str(CONF_DIR)))
    try:
        try:
            master = hydra.compose_config("config", list(overrides), run_mode=RunMode.MULTIRUN,
                                          with_log_configuration=False)
        except HydraException as error:
            raise ConfigError(f"{' '.join(overrides)} does not compose: {error}") from error
        sweeper_target = master.hydra.sweeper.get("_target_", "")
        if not sweeper_target.endswith("BasicSweeper"):
            raise ConfigError(f"hydra.sweeper={sweeper_target} is not Hydra's basic sweeper: the dry run lists "
                              f"basic-sweeper grids only")
        params = master.hydra.sweeper.params  # None or empty for a single run (no sweep file)
        params = OmegaConf.to_container(params, resolve=True) if params else {}
        arguments = [f"{key}={value}" for key, value in params.items()]
        arguments += OmegaConf.to_container(master.hydra.overrides.task, resolve=False)
        parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(arguments)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        if validate:
            _validate_rows(hydra, master, jobs)
        return jobs
    finally:
        GlobalHydra.instance().clear()


def _validate_rows(hydra: Hydra, master: DictConfig, jobs: list[list[str]]) -> None:
    """Compose and validate one job per row (seeds compose alike).  As in Hydra, a job's config is the merge of
    the group options its group overrides select, then its plain ``key=value`` overrides applied in order; rows
    sharing their group overrides share the merge, so a grid over plain keys costs one composition per option."""
    loader = hydra.config_loader
    parser = OverridesParser.create(config_loader=loader)
    rows: dict[tuple, tuple[int, list[str]]] = {}
    for number, job in enumerate(jobs):
        rows.setdefault(tuple(o for o in job if not o.startswith("seed=")), (number, job))
    merged: dict[tuple, DictConfig] = {}
    for number, job in rows.values():
        try:
            parsed = parser.parse_overrides(list(job))
            plain = [o for o in parsed if not o.is_delete() and o.package is None
                     and not loader.repository.group_exists(o.key_or_group)]
            groups = tuple(o.input_line for o in parsed if o not in plain)
            if groups not in merged:
                merged[groups] = loader.load_sweep_config(master, list(groups))
            job_cfg = copy.deepcopy(merged[groups])
            ConfigLoaderImpl._apply_overrides_to_config(plain, job_cfg)
            with open_dict(job_cfg):
                del job_cfg["hydra"]
            validate_config(job_cfg)
        except (HydraException, ConfigError, ValueError) as error:
            raise ConfigError(f"job #{number} ({' '.join(job)}) does not compose: {error}") from error


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

