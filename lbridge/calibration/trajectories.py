"""Full-compute trajectories on disk: one safetensors shard per prompt plus a JSON manifest.

A shard holds, for every step s and CFG branch b, the final block's input and output:
`{b}/{s:03d}/input.hidden`, `input.encoder`, `output.hidden`, `output.encoder`. Shards are written
one prompt at a time, so memory stays bounded by one trajectory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from safetensors.torch import load_file, save_file

from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.runtime.context import CacheRuntime

MANIFEST = "manifest.json"


class RecordFinalBlockHook(ModelHook):
    """Records the final block's input and output streams at every call (FULL steps only)."""

    def __init__(self, runtime: CacheRuntime, block: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.runtime, self.dtype = runtime, dtype
        self.metadata = TransformerBlockRegistry.get(block.__class__)
        self.tensors: dict[str, torch.Tensor] = {}

    def _keep(self, key: str, value: torch.Tensor) -> None:
        prefix = f"{self.runtime.branch}/{self.runtime.step:03d}"
        self.tensors[f"{prefix}/{key}"] = value.detach().to("cpu", self.dtype).contiguous()

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        meta = self.metadata
        self._keep(
            "input.hidden",
            meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs),
        )
        output = self.fn_ref.original_forward(*args, **kwargs)
        if meta.return_encoder_hidden_states_index is None:
            self._keep("output.hidden", output)
            return output
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        self._keep("input.encoder", encoder)
        self._keep("output.hidden", output[meta.return_hidden_states_index])
        self._keep("output.encoder", output[meta.return_encoder_hidden_states_index])
        return output

    def reset(self) -> None:
        self.tensors = {}


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(root / MANIFEST, manifest)


def read_manifest(root: Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a trajectory set; with `expect`, refuse a set collected for another config."""
    path = root / MANIFEST
    if not path.is_file():
        raise LbridgeError(f"no trajectories at {root}: run `lbridge collect` with the same model first")
    manifest = json.loads(path.read_text())
    for key, value in (expect or {}).items():
        if manifest.get(key) != value:
            raise LbridgeError(
                f"trajectories at {root} were collected with {key}={manifest.get(key)!r}, not {value!r}"
            )
    return manifest


def save_shard(root: Path, index: int, tensors: dict[str, torch.Tensor]) -> str:
    name = f"prompt-{index:05d}.safetensors"
    tmp = root / f".{name}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(root / name)
    return name


def load_shard(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / name))
