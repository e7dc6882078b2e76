"""Train the digit classifier shipped with lbridge (lbridge/assets/digit-classifier).

    .venv/bin/python scripts/train_classifier.py

Fixed seed, CPU, well under a minute. Held-out accuracy is printed; the split is by index parity of a
seeded permutation, so the number is reproducible.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lbridge.tiny.classifier import DigitClassifier
from lbridge.tiny.data import digits_16, random_shift

ASSET = Path(__file__).resolve().parents[1] / "lbridge" / "assets" / "digit-classifier"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSET)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = digits_16()
    perm = torch.randperm(len(images), generator=gen)
    train, test = perm[: int(0.8 * len(perm))], perm[int(0.8 * len(perm)) :]

    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for batch in order.split(64):
            # Noise augmentation makes the classifier judge shapes, not the exact pixel statistics
            # of the training set, so it also reads slightly noisy generated digits.
            x = random_shift(images[batch], gen) + 0.1 * torch.randn(len(batch), 1, 16, 16, generator=gen)
            loss = F.cross_entropy(model(x), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  held-out accuracy {acc:.4f}")
    print(f"trained in {time.perf_counter() - start:.1f}s; held-out accuracy {acc:.4f} on {len(test)} digits")
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
