"""The LearniBridge claims on the tiny model -> results/tiny/learnibridge_*.{csv,md}.

Every run samples the same 20 held-out prompts (seeds 0..19); calibrated methods are fitted on
prompts with seeds 1000+ (method.calibration). Quality is PSNR/SSIM against the same-seed
full-compute reference. Run with `make learnibridge-results` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lbridge.cli import quiet_libraries
from lbridge.experiment import run_row, write_table
from lbridge.runs import calibration_dir

OUT = Path("results/tiny")
BASE = ["model=tiny", "num_prompts=20", "output_root=outputs"]
UNCALIBRATED = "method.calibration.steps=0"  # zero-initialised LoRA: the plain final block on the stale input
BASELINES = [
    ("fora", []),
    ("taylorseer", []),
    ("learnibridge (uncalibrated)", ["method=learnibridge", UNCALIBRATED]),
]
LEARNIBRIDGE = ("learnibridge", ["method=learnibridge"])


def run(label: str, overrides: list[str]) -> dict:
    if not any(o.startswith("method=") for o in overrides):
        overrides = [f"method={label}", *overrides]
    row, cfg = run_row(label, [*BASE, *overrides])
    row["overrides"] = " ".join(o for o in overrides if not o.startswith("method="))
    if cfg.method.name == "learnibridge" and "note" not in row:
        last = json.loads((calibration_dir(cfg) / "calibration.json").read_text())["fit"]["rounds"][-1]
        pairs = sum(f["pairs"] for f in last.values())
        row["train_mse_before"] = sum(f["mse_before"] * f["pairs"] for f in last.values()) / pairs
        row["train_mse_after"] = sum(f["mse_after"] * f["pairs"] for f in last.values()) / pairs
    return row


def write(name: str, rows: list[dict], caption: str) -> None:
    regenerate = "`make learnibridge-results` (scripts/learnibridge_results.py)."
    write_table(OUT, name, rows, caption, regenerate)


def quality() -> None:
    rows = []
    for ratio in (2, 3, 4, 5, 6):  # FLOPs-matched: each method's own schedule for the ratio
        for label, extra in (*BASELINES, LEARNIBRIDGE):
            rows.append({"comparison": f"ratio>={ratio}", **run(label, [*extra, f"ratio={ratio}"])})
    for interval in (3, 5):  # schedule-matched: every method gets the same FULL steps
        for label, extra in (*BASELINES, LEARNIBRIDGE):
            overrides = [*extra, "ratio=1", f"schedule.interval={interval}"]
            rows.append({"comparison": f"interval={interval}", **run(label, overrides)})
    caption = (
        "LearniBridge vs reuse (FORA) and forecast (TaylorSeer, order 2) on the tiny model, 20 held-out "
        "seeds; calibration on 5 prompts with seeds 1000-1004. `ratio>=R`: each method at the schedule "
        "reaching FLOPs ratio R; `interval=N`: the same schedule for all."
    )
    write("learnibridge_quality", rows, caption)


def few_shot() -> None:
    rows = [run(*LEARNIBRIDGE[:1], ["method=learnibridge", "ratio=1", "schedule.interval=3",
                                   f"method.calibration.num_prompts={n}"]) | {"calibration_prompts": n}
            for n in (1, 3, 5, 10, 20)]  # fmt: skip
    write(
        "learnibridge_fewshot", rows, "LearniBridge vs number of calibration prompts (interval 3, rank 16)."
    )


def rank() -> None:
    rows = []
    for adapters in ("shared", "per_offset"):
        for r in (4, 8, 16, 32):
            overrides = ["method=learnibridge", "ratio=1", "schedule.interval=3", f"method.rank={r}",
                         f"method.alpha={r}", f"method.adapters={adapters}"]  # fmt: skip
            rows.append(run("learnibridge", overrides) | {"rank": r, "adapters": adapters})
    write("learnibridge_rank", rows, "LearniBridge vs LoRA rank, shared vs per-offset adapters (interval 3).")


def options() -> None:
    variants = [[], ["method.loss=block"], ["method.loss=normed"], ["method.input=forecast"],
                ["method.calibration.train_on=accelerated"]]  # fmt: skip
    rows = [
        run("learnibridge", ["method=learnibridge", "ratio=1", "schedule.interval=3", *v]) for v in variants
    ]
    write("learnibridge_options", rows, "LearniBridge options (interval 3): loss space (default head; block "
          "is the paper's), forecast input, training along the accelerated trajectory.")  # fmt: skip


if __name__ == "__main__":
    quiet_libraries()
    OUT.mkdir(parents=True, exist_ok=True)
    for part in sys.argv[1:] or ["quality", "few_shot", "rank", "options"]:
        globals()[part]()
