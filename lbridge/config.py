"""The packaged Hydra config tree: its groups' options, and instantiating a config node."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lbridge.errors import LbridgeError

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class ScheduleConfig:
    warmup: int = 1
    spacing: str = "even"
    interval: int | None = None


@dataclass
class RuntimeConfig:
    """How the transformer runs, not what it computes (lbridge/runtime/compile.py, modulation.py)."""

    compile: bool = False
    compile_backend: str = "inductor"
    modulation: str = "per_step"


@dataclass
class CommonSchema:
    """Types of the keys every command shares: Hydra rejects `num_prompts=abc` while composing.

    The model/method/prompts nodes stay free-form; their constructors check their own keys.
    """

    model: Any = None
    method: Any = None
    prompts: Any = None
    ratio: float = 2.0
    num_prompts: int = 10
    seed: int = 0
    output_root: str = "outputs"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@dataclass
class TimingConfig:
    warmup_runs: int = 1


@dataclass
class SampleSchema(CommonSchema):
    timing: TimingConfig = field(default_factory=TimingConfig)


@dataclass
class CollectSchema(CommonSchema):
    dtype: str = "auto"


@dataclass
class EvalSchema(CommonSchema):
    """`metrics` holds one node per metric (conf/metrics/*.yaml); model.metrics picks which run."""

    metrics: Any = None


@dataclass
class ReportSchema(CommonSchema):
    out: str | None = None
    name: str = "table"
    regenerate: str | None = None


@dataclass
class AnalyzeSchema(CommonSchema):
    subspace_rank: int = 8
    out: str | None = None


@dataclass
class ReproduceSchema:
    """`lbridge reproduce`: the table spec (conf/table/*.yaml) stays free-form; its runner checks it."""

    table: Any = None
    dry_run: bool = False
    overrides: list[str] = field(default_factory=list)
    output_root: str = "outputs"
    out: str | None = None


# Each command's YAML names its schema first in its defaults list (conf/<command>.yaml).
for _name, _schema in {
    "common_schema": CommonSchema,
    "sample_schema": SampleSchema,
    "collect_schema": CollectSchema,
    "eval_schema": EvalSchema,
    "report_schema": ReportSchema,
    "analyze_schema": AnalyzeSchema,
    "reproduce_schema": ReproduceSchema,
}.items():
    ConfigStore.instance().store(name=_name, node=_schema)


def group_options(group: str) -> list[str]:
    """Names of the YAML files in a config group, e.g. group_options('model') -> ['flux', 'tiny']."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def instantiate_node(node: DictConfig, group: str, label: str | None = None) -> Any:
    """hydra.utils.instantiate, with the constructor's own error surfaced as a one-line LbridgeError.

    `label` names the node in that error when it has no `name` key (metric nodes are named by their key).
    """
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, LbridgeError):
            raise cause from None
        detail = str(cause or err).strip().splitlines()[0]
        raise LbridgeError(f"bad {group} config '{label or node.get('name')}': {detail}") from None


def load_option(group: str, name: str, **overrides: Any) -> Any:
    """Instantiate `conf/<group>/<name>.yaml` (its `_target_`), `overrides` replacing its values."""
    options = group_options(group)
    if name not in options:
        raise LbridgeError(f"unknown {group} '{name}' (accepted: {', '.join(options)})")
    node = OmegaConf.merge(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), overrides)
    return instantiate_node(node, group)
