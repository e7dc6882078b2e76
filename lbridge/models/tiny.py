"""The embedded tiny model: a FLUX transformer trained on digits, shipped under lbridge/assets/.

It subclasses the FLUX adapter: same transformer class, same blocks, same hooks; only loading and
the pipeline call differ.
"""

from __future__ import annotations

from typing import Any

from lbridge.models.flux import FluxAdapter
from lbridge.tiny.assets import TINY_PIPELINE
from lbridge.tiny.pipeline import TinyDigitsPipeline


class TinyAdapter(FluxAdapter):
    transformer_class = None  # a FluxTransformer2DModel: `adapter_for` resolves it to FluxAdapter

    def load_pipeline(self) -> TinyDigitsPipeline:
        if self.path is None:
            self.path = str(TINY_PIPELINE)
        pipe = self.from_pretrained(TinyDigitsPipeline)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            **self.call_kwargs,
        }
