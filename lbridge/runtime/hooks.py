"""The diffusers `ModelHook`s lbridge registers (under names starting with `lbridge.`).

They wrap module forwards inside an unmodified diffusers pipeline. At a FULL step every hook calls
the original forward unchanged, which is why an all-FULL schedule is bit-identical to the plain
pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, StateManager

from lbridge.runtime.context import CacheRuntime

PREFIX = "lbridge."
CONTEXT_HOOK = PREFIX + "context"


class _BranchOnly(BaseState):
    def reset(self) -> None:
        pass


class StepContextHook(ModelHook):
    """On the transformer, outermost: fixes the `CacheContext` of each call before any block runs.

    It is 'stateful' only so that the pipeline's `transformer.cache_context(name)` reaches its
    StateManager; that is how the CFG branch name arrives. The step comes from the runtime's clock.
    """

    _is_stateful = True

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.branch_state = StateManager(_BranchOnly)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        pipeline_context = self.branch_state._context
        self.runtime.call_timestep = kwargs.get("timestep")
        self.runtime.call_arguments = kwargs
        self.runtime.enter_call(pipeline_context.name if pipeline_context is not None else None)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


class ReuseOutputHook(ModelHook):
    """FULL step: run and remember the output (per CFG branch). CACHED step: return it unrun."""

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.outputs: dict[str, Any] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.runtime.is_full:
            return self.keep(self.fn_ref.original_forward(*args, **kwargs))
        return self.stored()

    def keep(self, output: Any) -> Any:
        """At a FULL step: the output to return at the CACHED steps that follow (per CFG branch)."""
        self.outputs[self.runtime.branch] = output
        return output

    def stored(self) -> Any:
        """The output kept for the current CFG branch."""
        branch = self.runtime.branch
        if branch not in self.outputs:
            raise RuntimeError(f"CACHED step {self.runtime.step} on branch '{branch}' before any FULL step")
        return self.outputs[branch]

    def reset(self) -> None:
        self.outputs.clear()


class VerdictFirstReuseHook(ReuseOutputHook):
    """On a module only the blocks read, for an adaptive method that can give its verdict before
    the call's blocks run: `decide()` gives it, or leaves `runtime.decision` None when it cannot
    yet. With a verdict a CACHED call returns the last FULL output unrun; without one the module
    runs, since the verdict that comes later may be FULL."""

    def __init__(self, runtime: CacheRuntime, decide: Callable[[], None]) -> None:
        super().__init__(runtime)
        self.decide = decide

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.decide()
        if self.runtime.decision is None:
            return self.keep(self.fn_ref.original_forward(*args, **kwargs))
        return super().new_forward(module, *args, **kwargs)


class OutputTapHook(ModelHook):
    """Keeps each call's output of the module (a tuple's first element) in `store[key]`."""

    def __init__(self, store: dict[str, Any], key: str) -> None:
        super().__init__()
        self.store, self.key = store, key

    def post_forward(self, module: torch.nn.Module, output):
        self.store[self.key] = output[0] if isinstance(output, tuple) else output
        return output


class SkipBlockHook(ModelHook):
    """CACHED step: the block is an identity (its inputs are passed on in its output format).

    The output layout comes from diffusers' own `TransformerBlockRegistry`, the table its
    FirstBlockCache uses, so any block class diffusers knows is supported without lbridge code.
    """

    def __init__(self, runtime: CacheRuntime, block: torch.nn.Module) -> None:
        super().__init__()
        self.runtime = runtime
        self.metadata = TransformerBlockRegistry.get(block.__class__)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.runtime.is_full:
            return self.fn_ref.original_forward(*args, **kwargs)
        meta = self.metadata
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
        output = [None, None]
        output[meta.return_hidden_states_index] = hidden
        output[meta.return_encoder_hidden_states_index] = encoder
        return tuple(output)


class CallCounterHook(ModelHook):
    """Counts forward calls of a module (tests and diagnostics: how many blocks really ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.count += 1
        return args, kwargs


def register(module: torch.nn.Module, hook: ModelHook, name: str) -> ModelHook:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return hook


def remove_all(module: torch.nn.Module, names: list[str]) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in names:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    for child in module.modules():
        _drop_restored_forward(child)


def _drop_restored_forward(module: torch.nn.Module) -> None:
    """Undo the instance `forward` that diffusers' `remove_hook` leaves behind.

    Removing a module's last hook sets `module.forward` to the bound method it wrapped, an instance
    attribute the module never had. Harmless in eager mode, but torch.compile guards on it: a block
    compiled while a child carried the leftover recompiles once the child no longer does. A forward
    of any other kind (a user's compiled forward, another library's hook) is left as it is.
    """
    forward = module.__dict__.get("forward")
    if (
        getattr(forward, "__self__", None) is module
        and getattr(forward, "__func__", None) is type(module).forward
    ):
        del module.__dict__["forward"]
