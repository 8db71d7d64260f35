"""timm plugin: ``train.py --opt fngd`` and ``--opt kfac``, and a CIFAR-style ResNet-18.

Imported automatically right after ``timm`` (see ``fngd_plugin_autoload``), or explicitly with
train.py's ``--device-modules timm_ext``. On import it

* registers ``fngd`` and ``kfac`` in timm's optimizer registry (``timm.optim.list_optimizers()``
  lists them; ``create_optimizer_v2(model, opt="fngd", ...)`` builds them; FNGD's own options come
  through ``--opt-kwargs damping=0.5 coefficients=layer reuse=position ...``);
* makes every *training* loader that ``timm.data.create_loader`` builds tell the live FNGD
  optimizers when a new epoch starts (train.py gives the optimizer no other sign of epochs, and
  builds it before the loader) and log FNGD's epoch line when it ends (collect steps solved,
  reuse steps reweighted, steps not preconditioned by cause), so ``reuse="position"`` needs no ``steps_per_epoch``; a
  ``steps_per_epoch`` given by hand is checked against the real epoch length;
* registers the model ``cifar_resnet18`` (3x3 stride-1 stem, no max-pool: the paper's setting).
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any

import timm.data
import timm.data.loader
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.optim import OptimInfo
from timm.optim._optim_factory import default_registry
from torch import nn

from fngd_plugin import FNGD, KFAC

__all__ = ["TimmFNGD", "TimmKFAC", "register", "cifar_resnet18", "cifar_resnet18_w16"]

_logger = logging.getLogger("fngd_plugin")
_live: weakref.WeakSet[FNGD | KFAC] = weakref.WeakSet()


class TimmFNGD(FNGD):
    """FNGD as timm's factory builds it (``foreach`` accepted and ignored); epochs come from the loader."""

    def __init__(self, params: Any, foreach: bool | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        _live.add(self)


class TimmKFAC(KFAC):
    """KFAC as timm's factory builds it (``foreach`` accepted and ignored)."""

    def __init__(self, params: Any, foreach: bool | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        _live.add(self)  # its epoch line, too


def _signal_new_epoch() -> None:
    for opt in list(_live):
        if isinstance(opt, FNGD):
            opt.begin_epoch()


def _log_epoch() -> None:
    for opt in list(_live):
        opt.log_epoch()  # one line: steps solved / steps in collect (KFAC: its updates), what was not preconditioned


def _wrap_training_loader(loader: Any) -> Any:
    """Give this loader instance a subclass whose __iter__ announces a new epoch first and logs
    FNGD's epoch line when the epoch's batches are exhausted."""
    base = type(loader)
    if getattr(base, "_fngd_epoch_signal", False):
        return loader

    def __iter__(self):  # noqa: N807
        _signal_new_epoch()
        yield from base.__iter__(self)
        _log_epoch()

    loader.__class__ = type(base.__name__, (base,), {"__iter__": __iter__, "_fngd_epoch_signal": True})
    return loader


def _patch_create_loader() -> None:
    original = timm.data.create_loader
    if getattr(original, "_fngd_wrapped", False):
        return

    def create_loader(*args: Any, **kwargs: Any):
        loader = original(*args, **kwargs)
        is_training = kwargs.get("is_training", args[3] if len(args) > 3 else False)
        return _wrap_training_loader(loader) if is_training else loader

    create_loader._fngd_wrapped = True  # type: ignore[attr-defined]
    create_loader.__doc__ = original.__doc__
    timm.data.create_loader = create_loader
    timm.data.loader.create_loader = create_loader
    # --device-modules timm_ext runs after train.py bound the name: rebind it there too
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "create_loader", None) is original:
        main.create_loader = create_loader


def _cifar_resnet(name: str, width: int, pretrained: bool, kwargs: dict, stem_stride: int = 1) -> ResNet:
    """ResNet-18 layout for 32x32 inputs: 3x3 stride-1 stem, no max-pool (as in the FNGD/KFAC papers'
    CIFAR runs); a 64-channel stem, then stage widths width, 2*width, 4*width, 8*width."""
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    channels = (width, 2 * width, 4 * width, 8 * width)
    model = ResNet(block=BasicBlock, layers=(2, 2, 2, 2), channels=channels, **kwargs)
    model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), 64, 3, stride=stem_stride, padding=1,  # timm: 64-wide stem
                            bias=False)
    model.maxpool = nn.Identity()
    model.default_cfg = model.pretrained_cfg = {
        "input_size": (3, 32, 32), "num_classes": model.num_classes, "crop_pct": 1.0, "interpolation": "bilinear",
        "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762), "first_conv": "conv1",
        "classifier": "fc", "architecture": name,
    }
    return model


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 for 32x32 inputs (widths 64-512), the papers' CIFAR model."""
    return _cifar_resnet("cifar_resnet18", 64, pretrained, kwargs)


@register_model
def cifar_resnet18_w16(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The same ResNet-18 at a quarter of the width (16-128): ~16x fewer FLOPs, for CPU sweeps."""
    return _cifar_resnet("cifar_resnet18_w16", 16, pretrained, kwargs)


@register_model
def cifar_resnet18_w16s2(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The quarter-width ResNet-18 with a stride-2 stem: 28x28 inputs (Fashion-MNIST) reach the four
    stages at 14, 7, 4 and 2 pixels; ~3.5x cheaper than the stride-1 stem there, for the CPU sweep."""
    return _cifar_resnet("cifar_resnet18_w16s2", 16, pretrained, kwargs, stem_stride=2)


def register() -> None:
    """Idempotent: add fngd and kfac to timm's optimizer registry."""
    default_registry.register(OptimInfo(
        name="fngd", opt_class=TimmFNGD, has_eps=False, has_momentum=True,
        description="Fast Natural Gradient Descent: damped NGD as a weighted sum of per-sample gradients, "
                    "solved in the first epoch and reused (fngd-plugin)",
    ))
    default_registry.register(OptimInfo(
        name="kfac", opt_class=TimmKFAC, has_eps=False, has_momentum=True,
        description="K-FAC baseline on the same capture machinery (fngd-plugin)",
    ))
    _patch_create_loader()


register()


@register_model
def cifar_resnet18_w32s2(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """The half-width ResNet-18 (32-256) with the stride-2 stem: 4x the quarter width's parameters,
    the second model size on which the Fashion-MNIST recipe is checked (slurm/presets/recipe-fmnist-w32.toml)."""
    return _cifar_resnet("cifar_resnet18_w32s2", 32, pretrained, kwargs, stem_stride=2)
