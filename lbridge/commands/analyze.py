"""`lbridge analyze`: the low-rank claim behind LearniBridge, measured on trajectories.

Per prompt (calibration prompts and held-out ones), the optimal correction of the final block at
CACHED steps (lbridge/calibration/correction.py): effective rank, ranks holding 90% / 99% of its
energy, and the subspace overlap of its top-r directions with every other prompt. Writes a table
(csv/md) and a plot (spectra + overlap matrix).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lbridge.calibration import correction  # noqa: E402
from lbridge.calibration.lora import training_pairs  # noqa: E402
from lbridge.calibration.trajectories import load_trajectories  # noqa: E402
from lbridge.commands.collect import collect_trajectories  # noqa: E402
from lbridge.commands.setup import build_adapter, build_method, plan  # noqa: E402
from lbridge.prompts import load_prompts  # noqa: E402
from lbridge.report.tables import write_csv  # noqa: E402
from lbridge.runs import command_line  # noqa: E402


def run(cfg: DictConfig) -> Path:
    adapter = build_adapter(cfg)
    method = build_method(cfg.method)
    calibration = cfg.method.get("calibration", {})
    train = load_prompts(cfg.prompts, calibration.get("num_prompts", 5), calibration.get("seed", 1000))
    held_out = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    pipe = adapter.load_pipeline()
    schedule = plan(pipe, adapter, method, cfg, train[0].text).schedule
    block = adapter.blocks(adapter.transformer(pipe))[-1]
    rank = int(cfg.subspace_rank)

    rows, subspaces, spectra = [], [], []
    for role, prompts, seed in (
        ("train", train, calibration.get("seed", 1000)),
        ("held-out", held_out, cfg.seed),
    ):
        root = collect_trajectories(cfg, adapter, pipe, prompts, seed, calibration.get("dtype", "auto"))
        for prompt, trajectory in zip(
            prompts, load_trajectories(root, [p.index for p in prompts]), strict=True
        ):
            matrix = correction.correction_matrix(block, training_pairs([trajectory], schedule))
            values, directions = correction.top_subspace(matrix, rank)
            subspaces.append(directions)
            spectra.append((f"{role} {prompt.seed}", values))
            rows.append({
                "role": role, "prompt": prompt.text, "seed": prompt.seed, "width": matrix.shape[1],
                "effective_rank": correction.effective_rank(values),
                "rank_90": correction.energy_rank(values, 0.90),
                "rank_99": correction.energy_rank(values, 0.99),
                f"energy_top{rank}": float((values[:rank] ** 2).sum() / (values**2).sum()),
            })  # fmt: skip
    overlap = torch.tensor([[correction.subspace_overlap(a, b) for b in subspaces] for a in subspaces])
    table = pd.DataFrame(rows)
    is_train = torch.tensor([r["role"] == "train" for r in rows])
    off_diagonal = ~torch.eye(len(rows), dtype=torch.bool)
    table[f"overlap_train_top{rank}"] = [
        float(overlap[i][is_train & off_diagonal[i]].mean()) for i in range(len(rows))
    ]

    out = Path(cfg.out) if cfg.out else Path(cfg.output_root) / "analyze" / cfg.model.name
    out.mkdir(parents=True, exist_ok=True)
    regenerate = command_line("analyze")
    write_csv(table, out / "low_rank.csv", regenerate)
    chance = rank / rows[0]["width"]
    caption = (
        f"Optimal final-block correction y_s - B_L(x^L_f; cond_s) at the CACHED steps of schedule {schedule} "
        f"({cfg.model.name}, width {rows[0]['width']}). overlap = mean cos^2 of the principal angles between "
        f"top-{rank} singular subspaces, averaged over the calibration prompts (itself excluded); "
        f"random {rank}-dim subspaces give {chance:.3f}. Regenerate: `{regenerate}`\n\n"
    )
    markdown = table.drop(columns="prompt").to_markdown(index=False, floatfmt=".3f")
    (out / "low_rank.md").write_text(caption + markdown + "\n")
    _plot(spectra, overlap, [f"{r['role'][0]}{r['seed']}" for r in rows], rank, out / "low_rank.png")
    print(caption + markdown)
    print(f"\nwritten: {out / 'low_rank.csv'}, {out / 'low_rank.md'}, {out / 'low_rank.png'}")
    return out


def _plot(spectra, overlap: torch.Tensor, labels: list[str], rank: int, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, values in spectra:
        energy = torch.cumsum(values**2, 0) / (values**2).sum()
        left.plot(range(1, len(energy) + 1), energy, alpha=0.8, label=label,
                  linestyle="-" if label.startswith("train") else "--")  # fmt: skip
    left.set(xlabel="singular directions", ylabel="cumulative energy", title="correction spectrum")
    left.legend(fontsize=6)
    image = right.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    right.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    right.set_yticks(range(len(labels)), labels, fontsize=6)
    right.set_title(f"top-{rank} subspace overlap (t = train, h = held-out)")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
