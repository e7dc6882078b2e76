"""FID and KID (torchmetrics) on InceptionV3 pool features or on the tiny model's digit classifier.

FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2)) between Gaussians fitted to the features of
the real and generated sets (float64). KID = unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, mean and std over random subsets of `subset_size` samples.

`feature: inception` is the standard extractor: torch-fidelity's InceptionV3 port of the TF FID
graph, 2048-d pool features, images resized to 299x299 (`antialias: false` keeps torch-fidelity's
TF1-compatible bilinear resize, as pytorch-fid/ADM-style evaluations do). Its weights are
`weights-inception-2015-12-05-6726825d.pth` from `metrics.<name>.inception_path`, else the torch.hub
cache, else downloaded. `feature: digit_classifier` uses the penultimate (128-d) features of the
digit classifier shipped with lbridge (lbridge/assets/digit-classifier): meaningful offline on the
tiny model, and reported as `digit_fid`/`digit_kid`, never as FID.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lbridge.errors import LbridgeError
from lbridge.metrics.digit_accuracy import images_to_tensor
from lbridge.metrics.images import Images, as_pil, as_uint8
from lbridge.metrics.weights import load_state_dict, torch_hub_file
from lbridge.tiny.assets import DIGIT_CLASSIFIER, load_digit_classifier

FEATURES = ("inception", "digit_classifier")
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


class DigitFeatures(nn.Module):
    """uint8 images (N, C, H, W) -> the shipped digit classifier's pooled penultimate features."""

    def __init__(self, path: str | None = None):
        super().__init__()
        self.classifier = load_digit_classifier(path or DIGIT_CLASSIFIER)
        self.num_features = self.classifier.head.in_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same grayscale 16x16 conversion as digit_accuracy, so both read an image identically.
        return self.classifier.features(images_to_tensor(as_pil(images)).to(images.device))


def inception_weights(path: str | None, key: str) -> str:
    """A local copy of torch-fidelity's Inception weights, checked to hold only tensors."""
    file = torch_hub_file(INCEPTION_URL, key, "InceptionV3 (FID)") if path is None else path
    load_state_dict(file, key)  # torch-fidelity unpickles the file itself: refuse anything but tensors first
    return str(file)


def feature_extractor(feature: str, node: str, inception_path: str | None, classifier_path: str | None):
    """What torchmetrics' `feature=` gets: 2048 (its InceptionV3) or the digit classifier module."""
    if feature == "digit_classifier":
        return DigitFeatures(classifier_path), {}
    if feature == "inception":
        return 2048, {
            "feature_extractor_weights_path": inception_weights(inception_path, f"{node}.inception_path")
        }
    raise LbridgeError(f"unknown {node}.feature '{feature}' (accepted: {', '.join(FEATURES)})")


class _FeatureSet:
    """Shared by FID and KID: PIL or uint8 input, grayscale widened to RGB, a line for table headers."""

    kind = "set"
    feature_name: str

    def update(self, images: Images, real: bool) -> None:  # type: ignore[override]
        batch = as_uint8(images).to(self.device)  # type: ignore[attr-defined]
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        super().update(batch, real=real)  # type: ignore[misc]

    def update_images(self, images: list[Image.Image], real: bool, batch_size: int = 64) -> None:
        for start in range(0, len(images), batch_size):
            self.update(images[start : start + batch_size], real=real)


class FID(_FeatureSet, FrechetInceptionDistance):
    """torchmetrics' FrechetInceptionDistance with lbridge's extractors and weight handling."""

    def __init__(
        self,
        feature: str = "inception",
        inception_path: str | None = None,
        classifier_path: str | None = None,
        antialias: bool = False,
        config_key: str = "metrics.fid",
        **kwargs: Any,
    ):
        extractor, extra = feature_extractor(feature, config_key, inception_path, classifier_path)
        super().__init__(feature=extractor, antialias=antialias, **extra, **kwargs)
        self.feature_name = feature

    @property
    def description(self) -> str:
        return f"FID (Frechet distance of Gaussian fits) on {_feature_text(self.feature_name)} features"

    def compute(self) -> torch.Tensor:
        if min(int(self.real_features_num_samples), int(self.fake_features_num_samples)) < 2:
            raise LbridgeError("FID needs at least 2 real and 2 generated images (num_prompts >= 2)")
        return super().compute()


class KID(_FeatureSet, KernelInceptionDistance):
    """torchmetrics' KernelInceptionDistance; compute() gives (mean, std) over the subsets."""

    def __init__(
        self,
        feature: str = "inception",
        inception_path: str | None = None,
        classifier_path: str | None = None,
        subsets: int = 100,
        subset_size: int = 1000,
        config_key: str = "metrics.kid",
        **kwargs: Any,
    ):
        extractor, extra = feature_extractor(feature, config_key, inception_path, classifier_path)
        if extra:  # KernelInceptionDistance has no weights-path argument: build the same Inception here
            extractor = FrechetInceptionDistance(feature=2048, antialias=False, **extra).inception
        with warnings.catch_warnings():  # "KID keeps all features in memory": known, and small here
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=extractor, subsets=subsets, subset_size=subset_size, **kwargs)
        self.feature_name, self.config_key = feature, config_key

    @property
    def description(self) -> str:
        return (
            f"KID (cubic polynomial kernel MMD^2, {self.subsets} subsets of {self.subset_size}) "
            f"on {_feature_text(self.feature_name)} features"
        )

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = min(sum(len(f) for f in self.real_features), sum(len(f) for f in self.fake_features))
        if count < self.subset_size:
            raise LbridgeError(
                f"{self.config_key}.subset_size={self.subset_size} is more than the {count} images of a set"
            )
        return super().compute()


def _feature_text(feature: str) -> str:
    if feature == "inception":
        return "InceptionV3 2048-d pool (torch-fidelity weights)"
    return "the lbridge digit classifier's 128-d penultimate"
