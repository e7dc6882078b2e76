"""LPIPS (v0.1, AlexNet) of each image against its same-seed full-compute reference, averaged.

LPIPS(x, y) = sum_l mean_hw | w_l * (phi_l(x) - phi_l(y)) |^2 over AlexNet's five ReLU layers, with
channel-normalised features phi_l and the learned linear weights w_l that ship inside the `lpips`
package. The AlexNet backbone (torchvision's ImageNet weights, alexnet-owt-7be5be79.pth) is not in
the package: it comes from `metrics.lpips.alexnet_path`, else the torch.hub cache, else a download.
Images smaller than 64 px on a side are resized bilinearly to 64 first (AlexNet's pooling leaves
nothing of a 16 px image); that is stated in the metric's description.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from lbridge.errors import LbridgeError
from lbridge.metrics.images import Images, as_uint8
from lbridge.metrics.weights import load_state_dict, torch_hub_file

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
MIN_SIDE = 64


def build_lpips(alexnet_path: str | None, pnet_rand: bool, key: str) -> torch.nn.Module:
    """lpips.LPIPS(net='alex') with the backbone loaded by lbridge (local file or torch.hub cache)."""
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    if not pnet_rand:
        file = alexnet_path or torch_hub_file(ALEXNET_URL, key, "AlexNet (LPIPS)")
        load_alexnet(model, load_state_dict(file, key), key)
    return model.eval().requires_grad_(False)


def load_alexnet(model: torch.nn.Module, state: dict[str, torch.Tensor], key: str) -> None:
    """torchvision's `features.<i>.*` tensors into lpips' `net.slice<k>.<i>.*` (same module indices)."""
    target = {}
    for name in model.net.state_dict():
        index, param = re.fullmatch(r"slice\d+\.(\d+)\.(weight|bias)", name).groups()
        source = f"features.{index}.{param}"
        if source not in state:
            raise LbridgeError(f"{key}: not torchvision AlexNet weights (no '{source}')")
        target[name] = state[source]
    model.net.load_state_dict(target)


class LPIPS(Metric):
    """Mean LPIPS over (image, reference) pairs; `update(images, references)`, `compute()` -> scalar."""

    kind = "paired"
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        alexnet_path: str | None = None,
        pnet_rand: bool = False,
        config_key: str = "metrics.lpips",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.net = build_lpips(alexnet_path, pnet_rand, f"{config_key}.alexnet_path")
        self.pnet_rand = pnet_rand
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    @property
    def description(self) -> str:
        backbone = "random AlexNet (pnet_rand)" if self.pnet_rand else "AlexNet (torchvision ImageNet)"
        return (
            f"LPIPS v0.1, {backbone} + lpips linear layers; sides under {MIN_SIDE} px upsampled to {MIN_SIDE}"
        )

    @staticmethod
    def _scaled(images: Images) -> torch.Tensor:
        x = as_uint8(images).float() / 127.5 - 1
        x = x.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) < MIN_SIDE:
            scale = MIN_SIDE / min(x.shape[-2:])
            size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def update(self, images: Images, references: Images) -> None:
        x, y = self._scaled(images), self._scaled(references)
        if x.shape != y.shape:
            raise LbridgeError(f"LPIPS compares same-size images, got {tuple(x.shape)} and {tuple(y.shape)}")
        device = self.total.device
        values = self.net(x.to(device), y.to(device)).flatten()
        self.total += values.double().sum()
        self.count += len(values)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()
