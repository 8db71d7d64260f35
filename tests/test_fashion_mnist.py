"""Fashion-MNIST preparation (timm_ext.fashion_mnist): a stratified validation split held out of
the official training set, a stratified training subset, the official test set beside it, in the
layout torchvision's reader (timm's ``torch/fashion_mnist``) finds; and timm_ext.train evaluating
the images as it trained on them (no centre-crop zoom)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from timm_ext import fashion_mnist as fm


def fake_source(root: Path, n_train: int = 300, n_test: int = 60) -> Path:
    """Four gzipped idx files, each image unique (its index written in its first pixels)."""
    src = root / "src"
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        images[:, 0, 2] = 0 if split == "train" else 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, arr in zip(fm.FILES[split], (images, labels)):
            fm.write_idx(src / name, arr)
            import gzip
            (src / f"{name}.gz").write_bytes(gzip.compress((src / name).read_bytes()))
            (src / name).unlink()
    return src


def test_splits_are_stratified_disjoint_and_readable_by_torchvision(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    out = tmp_path / "fm"
    counts = fm.prepare(out, fake_source(tmp_path), train_size=100, val_size=50, seed=0)
    assert counts == {"train": 100, "validation": 50, "test": 60}
    assert json.loads((out / "split.json").read_text())["train"] == 100
    raw = out / "trainval" / "FashionMNIST" / "raw"
    train_x, train_y = fm.read_idx(raw / fm.FILES["train"][0]), fm.read_idx(raw / fm.FILES["train"][1])
    val_x, val_y = fm.read_idx(raw / fm.FILES["t10k"][0]), fm.read_idx(raw / fm.FILES["t10k"][1])
    ids = lambda x: set((x[:, 0, 0].astype(int) + 256 * x[:, 0, 1].astype(int)).tolist())  # noqa: E731
    assert len(ids(train_x)) == 100 and len(ids(val_x)) == 50 and not ids(train_x) & ids(val_x)
    assert (train_x[:, 0, 2] == 0).all() and (val_x[:, 0, 2] == 0).all()  # both from the official training set
    assert np.bincount(train_y).tolist() == [10] * 10 and np.bincount(val_y).tolist() == [5] * 10
    # labels travel with their images (the fake label is the source index mod 10)
    assert ((train_x[:, 0, 0].astype(int) + 256 * train_x[:, 0, 1].astype(int)) % 10 == train_y).all()
    test = torchvision.datasets.FashionMNIST(str(out / "test"), train=False)
    assert len(test) == 60 and np.asarray(test[0][0])[0, 2] == 255  # the official test set
    assert len(torchvision.datasets.FashionMNIST(str(out / "trainval"), train=True)) == 100
    assert len(torchvision.datasets.FashionMNIST(str(out / "trainval"), train=False)) == 50
    # deterministic, and a second prepare over the first replaces it cleanly
    fm.prepare(out, fake_source(tmp_path), train_size=100, val_size=50, seed=0)
    assert (fm.read_idx(raw / fm.FILES["train"][0]) == train_x).all()


@pytest.mark.parametrize("kw,message", [
    (dict(val_size=0), r"val_size=0 must be in \(0, 300\)"),
    (dict(val_size=50, train_size=251), r"train_size=251 must be in \(0, 250\]"),
])
def test_bad_sizes_are_named(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        fm.prepare(tmp_path / "fm", fake_source(tmp_path), **kw)


def test_a_missing_source_says_how_to_install_it(tmp_path, capsys):
    assert fm.main([str(tmp_path / "fm"), "--source", str(tmp_path / "nowhere")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_train_py_evaluates_the_images_it_trained_on(tmp_path):
    """timm's evaluation transform defaults to a 0.875 centre crop (resize 28 -> 32, crop 28): a
    zoom the training images never had. train.py's --crop-pct defaults to 1.0."""
    pytest.importorskip("timm")
    from timm_ext import train

    fm.prepare(tmp_path / "fm", fake_source(tmp_path), train_size=100, val_size=50)
    args = train.build_parser().parse_args([
        "--data", str(tmp_path / "fm" / "trainval"), "--dataset", "torch/fashion_mnist", "--test-split", "test",
        "--test-data", str(tmp_path / "fm" / "test"), "--model", "cifar_resnet18_w16s2", "--in-chans", "1",
        "--img-size", "28", "--out", str(tmp_path / "run"), "--device", "cpu", "--opt", "sgd"])
    args.mean, args.std = [0.5], [0.5]
    t = train.Trainer(args)
    for loader in (t.train_loader, t.val_loader, t.test_loader):
        x, _ = next(iter(loader))
        assert x.shape[1:] == (1, 28, 28)
    img = fm.read_idx(tmp_path / "fm" / "test" / "FashionMNIST" / "raw" / fm.FILES["t10k"][0])[0]
    x, _ = next(iter(t.test_loader))
    # pixel (0, 2) of the first test image is 255 -> (1 - 0.5) / 0.5 = 1 after normalisation, unmoved
    assert float(x[0, 0, 0, 2]) == pytest.approx((img[0, 2] / 255 - 0.5) / 0.5, abs=1e-6)
    assert train.main(["--data", "x", "--out", str(tmp_path / "r"), "--crop-pct", "1.5"]) == 2
