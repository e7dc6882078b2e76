"""The one interface every method implements, and loading a method from its config."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from lbridge.config import CONF_DIR, group_options, load_option
from lbridge.runtime.hooks import ModelHook, ReuseOutputHook, register, remove_all

if TYPE_CHECKING:
    from lbridge.models.base import ModelAdapter
    from lbridge.runtime.context import CacheRuntime


class CacheMethod(ABC):
    """What a CACHED step computes, expressed as hooks on the transformer and its blocks.

    Subclasses set `name` and implement `install`; `attach`/`detach` manage hook names so several
    methods never collide and removal is exact.
    """

    name: ClassVar[str]
    #: False for the full-compute reference: it never has CACHED steps, whatever the ratio.
    accelerates: ClassVar[bool] = True
    #: Config keys that change how a calibrated method samples, not what `lbridge calibrate` fits:
    #: left out of the calibration artifact's key, so one artifact serves both settings.
    sampling_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._hooks: list[tuple[str, ModelHook]] = []

    @abstractmethod
    def install(self, transformer: torch.nn.Module, adapter: ModelAdapter, runtime: CacheRuntime) -> None:
        """Register this method's hooks with `self.add_hook`."""

    def add_hook(self, module: torch.nn.Module, hook: ModelHook, role: str) -> ModelHook:
        name = f"lbridge.{self.name}.{role}"
        register(module, hook, name)
        self._hooks.append((name, hook))
        return hook

    def reuse_block_only_modules(
        self, transformer: torch.nn.Module, adapter: ModelAdapter, runtime: CacheRuntime
    ) -> None:
        """For a method whose CACHED steps run no block on the current inputs: the modules whose
        outputs only the blocks read (`ModelAdapter.block_only_modules`, the text embedders) return
        their last FULL output there, unrun. Exact, since nothing reads it; it matters because a
        stack method's CACHED call is otherwise little more than them (HunyuanVideo's token refiner
        was 6 of a CACHED call's 8 ms on the CPU's hunyuan-medium; docs/design.md)."""
        for module in adapter.block_only_modules(transformer):
            self.add_hook(module, self.block_only_hook(runtime), "unread")

    def block_only_hook(self, runtime: CacheRuntime) -> ReuseOutputHook:
        """The hook `reuse_block_only_modules` puts on each of those modules (MagCache's also gives
        its verdict there, before they run)."""
        return ReuseOutputHook(runtime)

    def attach(self, transformer: torch.nn.Module, adapter: ModelAdapter, runtime: CacheRuntime) -> None:
        self.install(transformer, adapter, runtime)

    def detach(self, transformer: torch.nn.Module) -> None:
        remove_all(transformer, sorted({name for name, _ in self._hooks}))
        self._hooks.clear()

    def hooks(self) -> list[ModelHook]:
        """Every hook this method has installed, those of a method it wraps included (what it holds)."""
        return [hook for _, hook in self._hooks]

    def reset(self) -> None:
        """Forget cached features (between samples); FULL steps refill them."""
        for _, hook in self._hooks:
            if hasattr(hook, "reset"):
                hook.reset()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def is_calibrated(method: CacheMethod | type[CacheMethod]) -> bool:
    """Whether a method (or its class) is fitted by `lbridge calibrate`: it defines `calibrate(job)`.

    Callable, not merely present: FoCa has a boolean `calibrate` option of its own."""
    return callable(getattr(method, "calibrate", None))


def available_methods() -> list[str]:
    return group_options("method")


def method_class(name: str) -> type[CacheMethod]:
    """The class `conf/method/<name>.yaml` names, without instantiating it."""
    return get_class(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")["_target_"])


def load_method(name: str, **params: Any) -> CacheMethod:
    """Instantiate `conf/method/<name>.yaml`, with `params` overriding its values."""
    return load_option("method", name, **params)
