"""The packaged Hydra config tree, and the options each config group offers."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"


def group_options(group: str) -> list[str]:
    """Names of the YAML files in a config group, e.g. group_options('model') -> ['flux', 'tiny']."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
