"""LearniBridge: at CACHED steps only the final block runs, LoRA-calibrated, on the stale cached input.

At a FULL step f the input x^L_f of the final block L is kept. At a CACHED step s = f + k every block
before L is skipped, and a LoRA-adapted copy of block L (the 'bridge', lbridge/calibration/lora.py)
maps x^L_f, with the conditioning of step s (timestep embedding, text, rotary), to an estimate of the
full-compute output y_s; the head then runs at step s. The adapter is fitted by `lbridge calibrate`
on pairs (x^L_f, y_{f+k}) from full-compute trajectories of a few prompts, for the schedule of the
ratio. Options beyond the paper: one adapter per offset k; feeding a Taylor forecast of x^L instead
of the stale x^L_f (`input=forecast`); training along the accelerated trajectory
(`calibration.train_on=accelerated`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerState

from lbridge.calibration import lora
from lbridge.calibration.job import METADATA, CalibrationJob, read_calibration
from lbridge.calibration.trajectories import bind_block_arguments, stream_names
from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.methods.base import CacheMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, SkipBlockHook
from lbridge.runtime.schedule import Schedule

ADAPTERS = ("shared", "per_offset")
INPUTS = ("stale", "forecast")
TRAIN_ON = ("full", "accelerated")
LOSSES = ("block", "normed", "head")


class InputCache:
    """Per-branch memory of the final block's input streams at FULL steps, and what to feed at CACHED steps.

    `stale` feeds x^L_f as it was; `forecast` feeds a Taylor forecast of x^L from the last FULL steps
    (diffusers' TaylorSeerState arithmetic, in float32, driven by lbridge's step index).
    """

    def __init__(self, mode: str, order: int) -> None:
        self.mode, self.order = mode, order
        self.stale: dict[str, tuple[torch.Tensor, ...]] = {}
        self.states: dict[str, TaylorSeerState] = {}

    def store(self, branch: str, step: int, streams: tuple[torch.Tensor, ...]) -> None:
        if self.mode == "stale":
            self.stale[branch] = streams
            return
        state = self.states.get(branch)
        if state is None or (state.last_update_step is not None and step <= state.last_update_step):
            state = self.states[branch] = TaylorSeerState(torch.float32, max_order=self.order)  # a new sample
        state.current_step = step
        state.update(streams)

    def load(self, branch: str, step: int) -> tuple[torch.Tensor, ...]:
        if self.mode == "stale" and branch in self.stale:
            return self.stale[branch]
        state = self.states.get(branch)
        if state is None:
            raise RuntimeError(f"CACHED step {step} on branch '{branch}' before any FULL step")
        state.current_step = step
        return tuple(state.predict())

    def reset(self) -> None:
        self.stale.clear()
        self.states.clear()


class SwitchedBridge:
    """`method.merge=false`: the peft bridge itself, its active adapter switched to the one asked for."""

    def __init__(self, bridge: torch.nn.Module) -> None:
        self.bridge, self.active = bridge, None

    def __call__(self, name: str) -> torch.nn.Module:
        if name != self.active:  # switching walks the bridge's LoRA layers: only on change
            lora.activate(self.bridge, name)
            self.active = name
        return self.bridge

    def prepare(self, names: list[str]) -> None:
        """Nothing to do: peft computes with the adapters' current weights."""

    def modules(self) -> list[torch.nn.Module]:
        return [self.bridge]


@dataclass
class MergedAdapter:
    sources: list[tuple[str, torch.Tensor]]  # the tensors the weights derive from
    state: tuple  # their `lora.tensor_state` when merged
    weights: dict[str, torch.nn.Parameter]  # per LoRA target path


class MergedBridge:
    """`method.merge=true`: one copy of the final block, into which each adapter's merged weights are swapped.

    A CACHED step then costs one plain block (peft's unmerged LoRA adds two small matmuls and a
    scaled add per target, time the FLOPs barely count). The copy shares every tensor with the block
    except the LoRA targets' weights, merged once per adapter and swapped in when the adapter changes
    (attribute assignment, no copy). One module for all adapters, existing from the start, so a
    compiled forward covers every schedule. Merged weights are recomputed when a tensor they derive
    from changes (calibration, loading, the block's own weights): checked at every call against the
    tensors of the last merge (cheap), and by a walk of the bridge in `prepare` (at install), which
    also sees adapters injected since.
    """

    def __init__(self, block: torch.nn.Module, bridge: torch.nn.Module) -> None:
        self.bridge, self.module = bridge, lora.make_bridge(block)
        self.merged: dict[str, MergedAdapter] = {}
        self.active: str | None = None

    def prepare(self, names: list[str]) -> None:
        for name in names:
            known = self.merged.get(name)
            if known is not None and lora.tensor_state(lora.merge_sources(self.bridge, name)) != known.state:
                del self.merged[name]
            self(name)  # merge now, not inside the first timed CACHED step

    def __call__(self, name: str) -> torch.nn.Module:
        known = self.merged.get(name)
        if known is None or lora.tensor_state(known.sources) != known.state:
            sources = lora.merge_sources(self.bridge, name)
            known = MergedAdapter(sources, lora.tensor_state(sources), lora.merged_weights(self.bridge, name))
            self.merged[name], self.active = known, None
        if name != self.active:
            for path, weight in known.weights.items():
                self.module.get_submodule(path).weight = weight
            self.active = name
        return self.module

    def modules(self) -> list[torch.nn.Module]:
        return [self.module]


class BridgeHook(ModelHook):
    """On the final block. FULL: remember its input streams, run it. CACHED: run the bridge instead."""

    def __init__(self, runtime: CacheRuntime, block: torch.nn.Module, runner: SwitchedBridge | MergedBridge,
                 adapter_for_offset, inputs: InputCache) -> None:  # fmt: skip
        super().__init__()
        self.runtime, self.block, self.runner, self.inputs = runtime, block, runner, inputs
        self.adapter_for_offset = adapter_for_offset
        self.hidden_name, self.encoder_name = stream_names(block)

    def _streams(self, arguments: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        hidden = arguments[self.hidden_name]
        return (hidden,) if self.encoder_name is None else (hidden, arguments[self.encoder_name])

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        arguments = bind_block_arguments(self.block, args, kwargs)
        if runtime.is_full:
            self.inputs.store(runtime.branch, runtime.step, self._streams(arguments))
            return self.fn_ref.original_forward(*args, **kwargs)
        streams = self.inputs.load(runtime.branch, runtime.step)
        arguments[self.hidden_name] = streams[0].to(arguments[self.hidden_name].dtype)
        if self.encoder_name is not None:
            arguments[self.encoder_name] = streams[1].to(arguments[self.encoder_name].dtype)
        name = self.adapter_for_offset(runtime.step - runtime.schedule.last_full(runtime.step))
        return self.runner(name)(**arguments)

    def reset(self) -> None:
        self.inputs.reset()


class LearniBridge(CacheMethod):
    name = "learnibridge"
    sampling_options = ("merge",)

    def __init__(
        self,
        rank: int = 16,
        alpha: float = 16,
        adapters: str = "shared",
        targets: list[str] | None = None,
        input: str = "stale",  # noqa: A002 -- the config key users type
        forecast_order: int = 1,
        loss: str = "block",
        merge: bool = True,
        calibration: dict[str, Any] | None = None,
        name: str = "learnibridge",
    ) -> None:
        super().__init__()
        _check_choice("adapters", adapters, ADAPTERS)
        _check_choice("input", input, INPUTS)
        _check_choice("loss", loss, LOSSES)
        for key, value in (("rank", rank), ("forecast_order", forecast_order)):
            if not isinstance(value, int) or value < 1:
                raise LbridgeError(f"method.{key}={value!r} must be an integer >= 1")
        self.rank, self.alpha, self.adapters, self.targets = rank, float(alpha), adapters, targets
        if not isinstance(merge, bool):
            raise LbridgeError(f"method.merge={merge!r} must be true or false")
        self.input, self.forecast_order, self.loss, self.merge = input, forecast_order, loss, merge
        self.calibration = dict(calibration or {})
        _check_choice("calibration.train_on", self.calibration.get("train_on", "full"), TRAIN_ON)
        self._bridges: dict[int, tuple[torch.nn.Module, torch.nn.Module, str]] = {}
        self._runners: dict[int, SwitchedBridge | MergedBridge] = {}  # kept across attach cycles

    # -- runtime -----------------------------------------------------------------------------
    def adapter_name(self, offset: int) -> str:
        return lora.SHARED if self.adapters == "shared" else lora.offset_adapter(offset)

    def adapter_names_for(self, schedule: Schedule) -> list[str]:
        offsets = sorted({s - schedule.last_full(s) for s in range(len(schedule)) if not schedule.is_full(s)})
        return sorted({self.adapter_name(k) for k in offsets})

    def bridge(self, transformer: torch.nn.Module, block: torch.nn.Module) -> tuple[torch.nn.Module, str]:
        """The bridge of this final block (built once: attach/detach cycles keep its adapters)."""
        if id(block) not in self._bridges:
            self._bridges[id(block)] = (block, lora.make_bridge(block), lora.module_path(transformer, block))
        _, bridge, path = self._bridges[id(block)]
        return bridge, path

    def lora_targets(self, block: torch.nn.Module) -> list[str]:
        return list(self.targets) if self.targets else lora.lora_targets(block)

    def prepare_bridge(self, transformer: torch.nn.Module, adapter, schedule: Schedule) -> torch.nn.Module:
        """The final block's bridge with an adapter for every offset of `schedule`.

        Adapters not loaded or trained yet are zero-initialised: the plain final block on the stale input.
        """
        final = adapter.blocks(transformer)[-1]
        bridge, _ = self.bridge(transformer, final)
        present = lora.adapter_names(bridge)
        for name in self.adapter_names_for(schedule):
            if name not in present:
                lora.add_lora(bridge, name, self.rank, self.alpha, self.lora_targets(final))
        return bridge

    def runner(self, block: torch.nn.Module, bridge: torch.nn.Module) -> SwitchedBridge | MergedBridge:
        """What runs the bridge at CACHED steps (built once per block, so a compiled module persists)."""
        if id(block) not in self._runners:
            self._runners[id(block)] = MergedBridge(block, bridge) if self.merge else SwitchedBridge(bridge)
        return self._runners[id(block)]

    def step_modules(self) -> list[torch.nn.Module]:
        """The modules a CACHED step runs in place of the final block (regional compilation's regions)."""
        return [module for runner in self._runners.values() for module in runner.modules()]

    def install(self, transformer, adapter, runtime) -> None:
        blocks = adapter.blocks(transformer)
        bridge = self.prepare_bridge(transformer, adapter, runtime.schedule)
        runner = self.runner(blocks[-1], bridge)
        runner.prepare(self.adapter_names_for(runtime.schedule))
        for block in blocks[:-1]:
            self.add_hook(block, SkipBlockHook(runtime, block), "skip")
        inputs = InputCache(self.input, self.forecast_order)
        self.add_hook(
            blocks[-1], BridgeHook(runtime, blocks[-1], runner, self.adapter_name, inputs), "bridge"
        )
        # The bridge reads the cached streams, not the current text stream.
        self.reuse_block_only_modules(transformer, adapter, runtime)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "adapters": self.adapters,
            "input": self.input,
            "loss": self.loss,
        }

    # -- calibration -------------------------------------------------------------------------
    def calibrate(self, job: CalibrationJob) -> dict[str, Any]:
        from lbridge.calibration.bridge_fit import fit_bridge

        return fit_bridge(self, job)

    def load_calibration(self, directory: Path, transformer: torch.nn.Module, schedule: Schedule) -> None:
        """Load the adapters `lbridge calibrate` wrote for this schedule into the bridge."""
        metadata = read_calibration(directory, self.name, schedule)
        final = _final_block(self, transformer)
        bridge, path = self.bridge(transformer, final)
        for name, file in metadata["adapters"].items():
            lora.load_adapter(bridge, name, directory / file, path, self.rank, self.alpha)

    def save_calibration(
        self, directory: Path, transformer: torch.nn.Module, metadata: dict[str, Any]
    ) -> None:
        final = _final_block(self, transformer)
        bridge, path = self.bridge(transformer, final)
        files = {}
        for name in sorted(lora.adapter_names(bridge)):
            files[name] = f"{name}.safetensors"
            lora.save_adapter(bridge, name, directory / files[name], path, self.rank, self.alpha)
        write_json(directory / METADATA, {**metadata, "adapters": files})


def _final_block(method: LearniBridge, transformer: torch.nn.Module) -> torch.nn.Module:
    for block, _, _ in method._bridges.values():
        if any(m is block for m in transformer.modules()):
            return block
    raise LbridgeError("attach learnibridge to this transformer (plan a schedule) before loading adapters")


def _check_choice(key: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise LbridgeError(f"unknown method.{key} '{value}' (accepted: {', '.join(accepted)})")
