"""Put Fashion-MNIST where timm's ``torch/fashion_mnist`` dataset (torchvision's reader) finds it,
with a validation split held out of the official training set.

    python -m timm_ext.fashion_mnist DATA_DIR [--source DIR] [--train-size N] [--val-size 6000] [--seed 0]

Source: the four idx files of Zalando's Fashion-MNIST (70,000 real 28x28 grey images of clothing,
10 classes, MIT licence), as Debian's ``dataset-fashion-mnist`` package installs them
(``apt-get install dataset-fashion-mnist``: /usr/share/datasets/fashion-mnist/*.gz, read offline).
Writes two roots in torchvision's layout (``<root>/FashionMNIST/raw/<name>-ubyte``):

* ``DATA_DIR/trainval``: ``train-*`` = the training images (all 60,000 minus the validation
  split, or a class-stratified subset of ``--train-size``), ``t10k-*`` = the validation split
  (``--val-size`` images of the official training set, stratified, disjoint from training);
* ``DATA_DIR/test``: ``t10k-*`` = the official 10,000 test images (``train-*`` link to the
  training files, which torchvision insists on finding).

Then timm reads ``--data DATA_DIR/trainval --dataset torch/fashion_mnist --train-split train
--val-split validation`` (timm maps every non-train split to torchvision's ``train=False``, i.e.
the ``t10k`` files: our validation split), and ``--test-data DATA_DIR/test --test-split test``
evaluates the best validation epoch once on the official test set.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (plain or .gz) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def _find(source: Path, name: str) -> Path:
    for candidate in (source / f"{name}.gz", source / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{source}: no {name}(.gz); install Debian's dataset-fashion-mnist "
                            f"(apt-get install dataset-fashion-mnist) or pass --source")


def _stratified(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices, the classes as evenly represented as the counts allow, in random order."""
    classes = np.unique(labels)
    per = [np.flatnonzero(labels == c) for c in classes]
    for idx in per:
        rng.shuffle(idx)
    take = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
    chosen = np.concatenate([idx[:k] for idx, k in zip(per, take)])
    rng.shuffle(chosen)
    return chosen


def prepare(out: Path, source: Path = SOURCE, train_size: int | None = None, val_size: int = 6000,
            seed: int = 0) -> dict[str, int]:
    images = {k: read_idx(_find(source, v[0])) for k, v in FILES.items()}
    labels = {k: read_idx(_find(source, v[1])) for k, v in FILES.items()}
    n = len(labels["train"])
    if not 0 < val_size < n:
        raise ValueError(f"val_size={val_size} must be in (0, {n})")
    if train_size is not None and not 0 < train_size <= n - val_size:
        raise ValueError(f"train_size={train_size} must be in (0, {n - val_size}] (the official training set "
                         f"has {n} images, {val_size} of them held out for validation)")
    rng = np.random.default_rng(seed)
    val = _stratified(labels["train"], val_size, rng)
    rest = np.setdiff1d(np.arange(n), val)
    train = rest if train_size is None else rest[_stratified(labels["train"][rest], train_size, rng)]
    raw = out / "trainval" / "FashionMNIST" / "raw"
    write_idx(raw / FILES["train"][0], images["train"][train])
    write_idx(raw / FILES["train"][1], labels["train"][train])
    write_idx(raw / FILES["t10k"][0], images["train"][val])
    write_idx(raw / FILES["t10k"][1], labels["train"][val])
    test_raw = out / "test" / "FashionMNIST" / "raw"
    write_idx(test_raw / FILES["t10k"][0], images["t10k"])
    write_idx(test_raw / FILES["t10k"][1], labels["t10k"])
    for name in FILES["train"]:
        link = test_raw / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(raw / name, test_raw))
    counts = {"train": len(train), "validation": len(val), "test": len(labels["t10k"])}
    (out / "split.json").write_text(json.dumps({"source": str(source), "seed": seed, **counts}, indent=1) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--source", type=Path, default=SOURCE, help=f"folder of the four idx files (default {SOURCE})")
    ap.add_argument("--train-size", type=int, default=None,
                    help="a class-stratified training subset of this many images (default: all but validation)")
    ap.add_argument("--val-size", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        counts = prepare(args.out, args.source, args.train_size, args.val_size, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(f'{v} {k}' for k, v in counts.items())} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
