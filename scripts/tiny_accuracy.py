"""Digit-classifier accuracy of the shipped tiny model: 100 samples per class, 20 steps.

.venv/bin/python scripts/tiny_accuracy.py        # writes results/tiny/accuracy.md (~2 min)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from lbridge.metrics.digit_accuracy import class_accuracy
from lbridge.models import load_adapter

OUT = Path(__file__).resolve().parents[1] / "results" / "tiny" / "accuracy.md"


def main() -> None:
    torch.manual_seed(0)
    pipe = load_adapter("tiny", device="cpu").load_pipeline()
    rows = [{"guidance_scale": g, "accuracy": class_accuracy(pipe, 100, 20, g)} for g in (1.0, 2.0, 3.0)]
    table = pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        "# Tiny model: digit-classifier accuracy\n\n"
        "100 samples per class (seeds 1234 + class*100 + i), 20 FlowMatchEuler steps, full compute.\n"
        "Classifier: lbridge/assets/digit-classifier (scripts/train_classifier.py).\n"
        "Regenerate: `.venv/bin/python scripts/tiny_accuracy.py`\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
