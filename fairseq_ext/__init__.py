"""fairseq plugin: ``fairseq-train --optimizer fngd`` and ``--optimizer kfac``.

Imported automatically right after ``fairseq`` (see ``fngd_plugin_autoload``); ``--user-dir``
pointing at this package works too. On import it registers both optimizers (dataclass configs:
every field shows in ``fairseq-train --optimizer fngd --help``) and teaches fairseq's task and
trainer to tell FNGD what it cannot see from parameters alone:

* the sentence ids of each batch (``sample["id"]``; fairseq keeps batch composition across
  epochs, so ``reuse="sample"`` -- the default here -- keys coefficients by sentence);
* epoch starts (``Trainer.begin_epoch``), and dummy batches (``ignore_grad``), which are skipped.

At construction the optimizer finds the fairseq models that own its parameters and
* forces fairseq's MultiheadAttention onto its module path (``skip_embed_dim_check``: the fast
  path calls F.multi_head_attention_forward with the projection weights, bypassing the Linear
  modules' hooks; same loss and gradient),
* declares the time-first layout (T x B x C) of everything inside encoder/decoder layers and the
  final layer norms, so per-sentence statistics never guess the batch dimension from sizes.
fairseq's summed losses and ``multiply_grads(world_size / sample_size)`` need no special care:
FNGD measures the host's gradient scale on every solve.
"""

import gc
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.tasks import FairseqTask
from fairseq.trainer import Trainer
from omegaconf import II
from torch import nn

from fngd_plugin import FNGD, KFAC

logger = logging.getLogger("fngd_plugin")

__all__ = ["FairseqFNGD", "FairseqKFAC", "find_fngd"]


@dataclass
class FairseqFNGDConfig(FairseqDataclass):
    momentum: float = field(default=0.9, metadata={"help": "momentum on the FNGD direction"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay added to the FNGD direction"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum"})
    damping: float = field(default=1.0, metadata={"help": "damping lambda > 0 (see --damping-mode)"})
    damping_mode: ChoiceEnum(["relative", "absolute"]) = field(  # type: ignore[valid-type]
        default="relative", metadata={"help": "relative: n*lambda = damping*trace(K)/n; absolute: lambda as given"})
    coefficients: ChoiceEnum(["network", "layer"]) = field(  # type: ignore[valid-type]
        default="network", metadata={"help": "one coefficient vector for all layers, or one per module"})
    reuse: ChoiceEnum(["sample", "position", "off"]) = field(  # type: ignore[valid-type]
        default="sample", metadata={"help": "after the collect epochs reuse coefficients per sentence id, per batch "
                                            "position, or solve every step"})
    collect_epochs: int = field(default=1, metadata={"help": "epochs that solve for coefficients"})
    normalize: ChoiceEnum(["sum", "none"]) = field(  # type: ignore[valid-type]
        default="sum", metadata={"help": "sum: coefficients of a batch sum to 1 (SGD scale); none: exact NGD step"})
    max_update_norm: Optional[float] = field(default=None, metadata={"help": "clip the global norm of the direction"})
    refresh_every: Optional[int] = field(default=None, metadata={"help": "solve again every this many epochs"})
    lr: List[float] = II("optimization.lr")


@dataclass
class FairseqKFACConfig(FairseqDataclass):
    momentum: float = field(default=0.9, metadata={"help": "momentum on the preconditioned gradient"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    kfac_damping: float = field(default=1e-3, metadata={"help": "Tikhonov damping lambda > 0"})
    factor_decay: float = field(default=0.95, metadata={"help": "running-average decay of the Kronecker factors"})
    factor_update_steps: int = field(default=10, metadata={"help": "update factors every this many steps"})
    inv_update_steps: int = field(default=100, metadata={"help": "update inverses every this many steps"})
    kl_clip: Optional[float] = field(default=1e-3, metadata={"help": "KL clipping threshold (unset: off)"})
    max_factor_dim: Optional[int] = field(default=None, metadata={"help": "leave layers with a larger factor to SGD"})
    lr: List[float] = II("optimization.lr")


def _owning_models(params: list) -> list[nn.Module]:
    """fairseq models holding any of these parameters (the optimizer gets parameters only)."""
    from fairseq.models import BaseFairseqModel

    ids = {id(p) for p in params}
    return [o for o in gc.get_objects()
            if issubclass(type(o), BaseFairseqModel) and any(id(p) in ids for p in o.parameters())]


def prepare_models(opt: Any, params: list) -> None:
    """Module path for attention, time-first layout declared (see module docstring)."""
    from fairseq.modules.multihead_attention import MultiheadAttention

    for model in _owning_models(params):
        for name, module in model.named_modules():
            if isinstance(module, MultiheadAttention):
                module.skip_embed_dim_check = True
            parts = name.split(".")
            time_first = "layers" in parts[:-1] or (len(parts) >= 1 and parts[-1] == "layer_norm"
                                                     and parts[-2:-1] in (["encoder"], ["decoder"]))
            if time_first and next(module.parameters(recurse=False), None) is not None:
                opt.set_batch_dim(module, 1)


class _Wrapped(FairseqOptimizer):
    core: type

    def __init__(self, cfg: Any, params: list):
        super().__init__(cfg)
        params = list(params)
        self._optimizer = self.core(params, **self.optimizer_config)
        if not self._optimizer.coverage["covered"]:
            raise ValueError(
                f"--optimizer {self.core.__name__.lower()}: fairseq handed it parameters that no model module owns "
                "(--fp16 and --memory-efficient-fp16 give the optimizer fp32 copies of the model's parameters); "
                "it needs the model's own parameters: use --amp for mixed precision")
        prepare_models(self._optimizer, params)

    @property
    def supports_flat_params(self) -> bool:
        return False  # the per-sample statistics need the model's own parameters

    def zero_grad(self) -> None:
        self._optimizer.zero_grad()  # also drops what the hooks captured


@register_optimizer("fngd", dataclass=FairseqFNGDConfig)
class FairseqFNGD(_Wrapped):
    """Fast Natural Gradient Descent (fngd_plugin.FNGD) inside fairseq."""

    core = FNGD

    @property
    def optimizer_config(self) -> dict:
        c = self.cfg
        return dict(lr=c.lr[0], momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov,
                    damping=c.damping, damping_mode=str(c.damping_mode), coefficients=str(c.coefficients),
                    reuse=str(c.reuse), collect_epochs=c.collect_epochs, normalize=str(c.normalize),
                    max_update_norm=c.max_update_norm, refresh_every=c.refresh_every)


@register_optimizer("kfac", dataclass=FairseqKFACConfig)
class FairseqKFAC(_Wrapped):
    """K-FAC baseline (fngd_plugin.KFAC) inside fairseq."""

    core = KFAC

    @property
    def optimizer_config(self) -> dict:
        c = self.cfg
        return dict(lr=c.lr[0], momentum=c.momentum, weight_decay=c.weight_decay, damping=c.kfac_damping,
                    factor_decay=c.factor_decay, factor_update_steps=c.factor_update_steps,
                    inv_update_steps=c.inv_update_steps, kl_clip=c.kl_clip, max_factor_dim=c.max_factor_dim)


def find_fngd(optimizer: Any) -> Optional[FNGD]:
    """The FNGD inside fairseq's optimizer wrappers (FP16Optimizer, AMPOptimizer, ...), if any."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, FNGD):
            return optimizer
        optimizer = (getattr(optimizer, "fp32_optimizer", None) or getattr(optimizer, "wrapped_optimizer", None)
                     or getattr(optimizer, "_optimizer", None))
        seen += 1
    return None


def _patch_hosts() -> None:
    if getattr(FairseqTask.train_step, "_fngd", False):
        return
    train_step = FairseqTask.train_step
    begin_epoch = Trainer.begin_epoch

    def task_train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        opt = find_fngd(optimizer)
        if opt is not None:
            if ignore_grad or not sample or "id" not in sample:
                opt.ignore_next_batch()
            else:
                opt.set_sample_ids(sample["id"])
        return train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=ignore_grad)

    def trainer_begin_epoch(self, epoch):
        opt = find_fngd(self.optimizer)
        if opt is not None:
            opt.set_epoch(epoch - 1)  # fairseq counts epochs from 1
        return begin_epoch(self, epoch)

    task_train_step._fngd = True  # type: ignore[attr-defined]
    FairseqTask.train_step = task_train_step
    Trainer.begin_epoch = trainer_begin_epoch

    # fairseq prints --help before it adds the chosen optimizer's options; add ours first so that
    # `fairseq-train --optimizer fngd --help` documents them
    from fairseq import options
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    parse = options.parse_args_and_arch

    def parse_args_and_arch(parser, input_args=None, *args, **kwargs):
        argv = sys.argv[1:] if input_args is None else list(input_args)
        if "-h" in argv or "--help" in argv:
            for name, config in (("fngd", FairseqFNGDConfig), ("kfac", FairseqKFACConfig)):
                if name in argv and "--optimizer" in argv:
                    gen_parser_from_dataclass(parser.add_argument_group(f"optimizer {name}"), config())
        return parse(parser, input_args, *args, **kwargs)

    options.parse_args_and_arch = parse_args_and_arch


def _allow_checkpoint_globals() -> None:
    """torch >= 2.6 loads with weights_only=True; fairseq checkpoints pickle an argparse.Namespace.
    Allow-list exactly what fairseq's own checkpoints contain instead of disabling the check."""
    import argparse

    import torch

    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])


_patch_hosts()
_allow_checkpoint_globals()
