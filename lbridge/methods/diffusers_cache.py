"""diffusers' own block-cache hooks (FirstBlockCache, MagCache) driven as lbridge adaptive methods.

diffusers' hooks decide and skip by themselves; lbridge puts one observer outermost on the first
block that (1) hands them lbridge's CFG branch as their cache context (pipelines that never call
`transformer.cache_context` work too), (2) forces FULL at the steps the schedule forces (threshold
-inf there), and (3) reads their verdict back into `CacheRuntime.decide`, so FLOPs, realised
schedules and the threshold solve work exactly as for lbridge's own adaptive methods.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState, StateManager

from lbridge.methods.adaptive import AdaptiveMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook


class VerdictObserverHook(ModelHook):
    """Outermost on the first block: context and threshold in, FULL/CACHED verdict out."""

    def __init__(self, runtime: CacheRuntime, method: DiffusersBlockCache, states: StateManager) -> None:
        super().__init__()
        self.runtime, self.method, self.states = runtime, method, states

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        runtime = self.runtime
        self.states.set_context(runtime.context)
        self.method.prepare_call(self.states.get_state(), runtime, self.method.threshold_now(runtime))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        runtime = self.runtime
        full = bool(self.states.get_state().should_compute) or runtime.schedule.is_full(runtime.step)
        if runtime.decision is not None and runtime.decision != full:
            # A verdict taken before the call (MagCache's) left modules unrun on it: it must hold.
            raise RuntimeError(
                f"{self.method.name}: diffusers' verdict (FULL={full}) at step {runtime.step} differs "
                f"from the one taken before the blocks (FULL={runtime.decision})"
            )
        runtime.decide(full)
        return output


class DiffusersBlockCache(AdaptiveMethod):
    """Installs diffusers' head / middle / tail block hooks on the adapter's blocks, plus the observer."""

    def install(self, transformer, adapter, runtime) -> None:
        blocks = adapter.blocks(transformer)
        self.states = StateManager(self.state_class())
        head, *middle, tail = blocks
        self.add_hook(head, self.head_hook(self.states, runtime), "head")
        for block in middle:
            self.add_hook(block, self.block_hook(self.states, runtime, tail=False), "block")
        self.add_hook(tail, self.block_hook(self.states, runtime, tail=True), "tail")
        self.add_hook(head, VerdictObserverHook(runtime, self, self.states), "observer")

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "states"):
            self.states.reset()  # drops every branch's state: the next sample starts clean

    @abstractmethod
    def state_class(self) -> type[BaseState]: ...

    @abstractmethod
    def head_hook(self, states: StateManager, runtime: CacheRuntime) -> ModelHook: ...

    @abstractmethod
    def block_hook(self, states: StateManager, runtime: CacheRuntime, tail: bool) -> ModelHook: ...

    @abstractmethod
    def prepare_call(self, state: BaseState, runtime: CacheRuntime, threshold: float) -> None:
        """Set what diffusers' hooks read for this call (the threshold in effect, the step)."""

    def load_fitted(self, values: dict[str, Any]) -> None:
        pass
