"""`lbridge <command> [hydra overrides]`: compose lbridge/conf/<command>.yaml and run the command.

Config mistakes are caught before Hydra runs anything and reported in one line that names the bad
value and the accepted ones; Hydra's multirun (`-m`) and sweeps work as usual.
"""

from __future__ import annotations

import importlib
import itertools
import re
import sys
import warnings
from functools import partial

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from lbridge.config import CONF_DIR, group_options
from lbridge.errors import LbridgeError
from lbridge.runs import record_failure

COMMANDS = {
    "collect": "full-compute trajectories (final-block input/output per step) for calibration",
    "calibrate": "fit a calibrated method's parameters on collected trajectories",
    "sample": "generate images with a method and its same-seed full-compute reference",
    "eval": "metrics of a sampled run (PSNR/SSIM vs reference, model-specific metrics)",
    "report": "gather evaluated runs of a model into a table",
    "analyze": "is the optimal final-block correction low-rank and shared across prompts? (LearniBridge)",
    "reproduce": "every row of a results table (table=tiny|table1_flux|...): run, tabulate, plot",
}
GROUPS = ("model", "method", "prompts", "table")
MAX_CHECKED_COMBINATIONS = 64

USAGE = (
    "usage: lbridge <command> [-m] [key=value ...]\n\ncommands:\n"
    + "\n".join(f"  {name:<10} {text}" for name, text in COMMANDS.items())
    + (
        "\n\nconfig groups: "
        + "; ".join(f"{g}=" + "|".join(group_options(g)) for g in GROUPS)
        + "\nexamples:\n  lbridge sample model=tiny method=fora ratio=3\n"
        "  lbridge sample -m model=tiny method=none,fora ratio=2,3\n"
        "  lbridge sample --cfg job        # print the composed config"
    )
)


def fail(message: str) -> int:
    print(f"lbridge: error: {message}", file=sys.stderr)
    return 2


def _value_error(key: str, value: str) -> str | None:
    group = key.lstrip("+~")
    if group in GROUPS and value not in group_options(group):
        return f"unknown {group} '{value}' (accepted: {', '.join(group_options(group))})"
    return None


def check_overrides(command: str, overrides: list[str], multirun: bool = True) -> str | None:
    """Compose every combination a sweep would run; return a one-line error or None."""
    parser, parsed = OverridesParser.create(), []
    for text in overrides:  # one at a time, so the message names the one that does not parse
        try:
            parsed.extend(parser.parse_overrides([text]))
        except HydraException as err:
            reason = str(err).splitlines()[0]
            return f"cannot parse override '{text}': {reason} (overrides are key=value, e.g. ratio=3)"
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        key = override.get_key_element()
        if not key.lstrip("+~"):
            return f"'{text}' has no key (overrides are key=value)"
        if override.is_sweep_override():
            if not multirun:
                return f"{text} is a sweep: add -m to run one job per value"
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        for value in values:
            if (error := _value_error(key, value)) is not None:
                return error
        # A single value is composed as typed (Hydra's re-rendering escapes `${` as `$\{`).
        choices.append([f"{key}={v}" for v in values] if override.is_sweep_override() else [text])
    combos = itertools.islice(itertools.product(*choices), MAX_CHECKED_COMBINATIONS)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # Only a `~key` override deletes: the default config is composed for it alone.
        needed = list(compose(config_name=command)) if any(o.is_delete() for o in parsed) else []
        for combo in combos:
            try:
                # Resolving finds a broken interpolation (`ratio=${oops}`) now, not inside the job.
                cfg = compose(config_name=command, overrides=list(combo))
                OmegaConf.to_container(cfg, resolve=True)
            except (HydraException, OmegaConfBaseException, ValueError) as err:
                return _explain(command, combo, err)
            if deleted := [key for key in needed if key not in cfg]:
                return _deleted_key(command, combo, deleted[0])
    return None


def _deleted_key(command: str, combo: tuple[str, ...], key: str) -> str:
    """Hydra lets `~key` delete a top-level key of the command's schema, which the command then reads
    (a traceback inside the job); its nested schemas refuse deletion themselves."""
    override = next((o for o in combo if o.startswith("~") and o[1:].split("=")[0] == key), f"~{key}")
    return f"{override}: `lbridge {command}` needs '{key}': set it ({key}=...) instead of deleting it"


def _explain(command: str, combo: tuple[str, ...], err: Exception) -> str:
    first = str(err).strip().splitlines()[0]
    if isinstance(
        err, InterpolationResolutionError
    ):  # e.g. "ratio=${oops}: Interpolation key 'oops' not found"
        key = getattr(err, "full_key", None) or ""
        override = next((o for o in combo if o.lstrip("+~").startswith(f"{key}=")), key)
        return f"{override}: {first}" if override else first
    if first.startswith("Error merging override") and err.__cause__ is not None:
        # e.g. "num_prompts=abc: Value 'abc' of type 'str' could not be converted to Integer"
        return f"{first.removeprefix('Error merging override ')}: {str(err.__cause__).splitlines()[0]}"
    if first.startswith("Could not override"):
        key = first.split("'")[1]
        known = ", ".join(k for k in compose(config_name=command) if k != "hydra")
        return (
            f"unknown config key '{key}' for `lbridge {command}` (accepted: {known}; '+{key}=...' adds one)"
        )
    return first


def quiet_libraries() -> None:
    """Library chatter (hub retries, loading bars) would bury lbridge's own one-line messages."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


#: Jobs of this multirun that stopped with an LbridgeError (the sweep goes on without them).
FAILED_JOBS: list[str] = []


def _run_command(command: str, cfg: DictConfig) -> None:
    module = importlib.import_module(f"lbridge.commands.{command}")
    try:
        module.run(cfg)
    except LbridgeError as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            # SystemExit is not an Exception, so Hydra passes it through without a traceback.
            sys.exit(fail(str(err)))
        # One unreachable ratio must not cost the rest of a sweep: report, record, go on.
        overrides = list(HydraConfig.get().overrides.task)
        fail(f"{' '.join(overrides)}: {err}")
        FAILED_JOBS.append(" ".join(overrides))
        record_failure(cfg, command, overrides, str(err))


# Hydra's own flags that take a value (`--cfg job`): that value is not an override.
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}  # fmt: skip


# Hydra flags that would swap lbridge's config tree for another: each command composes its own.
CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}


# What argparse (Hydra's command line) takes for a positional argument, so an override, though it
# starts with '-': a lone '-', a negative number, or anything with a space in it.
NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def _is_flag(arg: str) -> bool:
    return arg.startswith("-") and arg != "-" and " " not in arg and not NEGATIVE_NUMBER.match(arg)


def overrides_of(args: list[str]) -> list[str]:
    overrides, skip_next, flags_end = [], False, False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg == "--" and not flags_end:
            flags_end = True  # argparse's convention, which Hydra follows: all that follows is an override
        elif _is_flag(arg) and not flags_end:
            skip_next = arg in VALUE_FLAGS
        else:
            overrides.append(arg)
    return overrides


# conf/hydra/launcher/submitit_slurm.yaml shares its name with the submitit plugin's schema, so Hydra
# checks lbridge's defaults against it (what we want) and warns that this matching is deprecated. The
# yaml is complete on its own (_target_ and every key): it keeps working where Hydra drops the matching.
SCHEMA_MATCHING = r"(?s).*validated against ConfigStore schema with the same name"


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=SCHEMA_MATCHING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail(f"unknown command '{command}' (accepted: {', '.join(COMMANDS)})")
    if foreign := [a for a in rest if a.split("=")[0] in CONFIG_FLAGS]:
        own = f"lbridge/conf/{command}.yaml"
        return fail(f"{foreign[0]}: each command composes its own config ({own}); pass key=value overrides")
    multirun = any(a in ("-m", "--multirun") for a in rest)
    if multirun and any(a in ("-c", "--cfg", "--info", "-i") or a.startswith("--info=") for a in rest):
        return fail("-m runs the sweep; --cfg/--info print one config: drop one of them")
    overrides = overrides_of(rest)
    if (error := check_overrides(command, overrides, multirun)) is not None:
        return fail(error)
    quiet_libraries()
    sys.argv = [f"lbridge {command}", *rest]
    hydra.main(config_path=str(CONF_DIR), config_name=command, version_base=None)(
        partial(_run_command, command)
    )()
    if FAILED_JOBS:
        return fail(f"{len(FAILED_JOBS)} job(s) of the sweep failed (listed above): {'; '.join(FAILED_JOBS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
