"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans) as an image folder timm reads.

    python -m timm_ext.digits DATA_DIR [--size 32] [--val-fraction 0.2] [--test-fraction 0.2] [--seed 0]

Creates DATA_DIR/{train,validation,test}/<class>/<i>.png (grey digits upscaled to size x size, as
RGB), a deterministic split stratified by class: validation to choose on (a tuning trial, the best
epoch), test to report on, never seen before the end (``--test-fraction 0``: no test split). Then:

    python train.py --data-dir DATA_DIR --train-split train --val-split validation \\
        --model cifar_resnet18 --num-classes 10 --input-size 3 32 32 --opt fngd ...
    python -m timm_ext.train --data DATA_DIR --test-split test --out RUN_DIR ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def write_digits(out: Path, size: int = 32, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 seed: int = 0) -> dict[str, int]:
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1) and leave training images "
                         f"(val_fraction + test_fraction = {val_fraction + test_fraction:g} must be < 1)")
    if size < 8:
        raise ValueError(f"size={size} must be >= 8 (the digits are 8x8)")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "validation": 0, **({"test": 0} if test_fraction else {})}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        n_test = int(round(len(idx) * test_fraction))
        parts = [("validation", idx[:n_val]), ("test", idx[n_val:n_val + n_test]), ("train", idx[n_val + n_test:])]
        for split, chosen in parts:
            if split not in counts:
                continue
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
                img.save(folder / f"{i}.png")
            counts[split] += len(chosen)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--test-fraction", type=float, default=0.2, help="0: no test split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        counts = write_digits(args.out, args.size, args.val_fraction, args.test_fraction, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'{v} {k}' for k, v in counts.items())} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
