"""fairseq plugin: ``fairseq-train --optimizer fngd`` and ``--optimizer kfac``.

Imported automatically right after ``fairseq`` (see ``fngd_plugin_autoload``); ``--user-dir``
pointing at this package works too. On import it registers both optimizers (dataclass configs:
every field shows in ``fairseq-train --optimizer fngd --help``) and teaches fairseq's task and
trainer to tell FNGD what it cannot see from parameters alone:

* the sentence ids of each batch (``sample["id"]``; ``reuse="sample"`` -- the default here -- keys
  coefficients by sentence, so they survive what changes batches: a resumed run builds its batches
  with another seed, and distributed workers get other batches every epoch);
* epoch starts (``Trainer.begin_epoch``), and dummy batches (``ignore_grad``: they teach FNGD nothing
  but still join its all-reduces).

and logs FNGD's phase into fairseq's own metrics (``fngd_collect``: the fraction of the epoch's
batches that solved), so it lands in fairseq's per-epoch JSON stats for runners to read.

Bad option values stop ``fairseq-train`` at argument parsing (argparse's usage error, exit code 2),
before any data or model is loaded; the core optimizer's own checks decide what is valid.

Distributed training (tested on CPU: one process per rank, gloo, ``--ddp-backend legacy_ddp``; the
GPU backends take the same path here, untested): fairseq all-reduces the gradient,
FNGD all-reduces its natural-gradient direction (``fngd_plugin.distributed``), so every replica
takes the same step. fairseq deals the shuffled batches out anew each epoch, so a sentence's batch
lands on another worker than the one that solved its coefficient; with ``reuse="sample"`` the
workers therefore merge what they collected (:func:`share_coefficients`) at every epoch start and
before every checkpoint, and every replica (and rank 0's checkpoint) holds all coefficients.

``--amp``: fairseq's AMPOptimizer unscales the gradients in ``clip_grad_norm`` (``GradScaler.unscale_``
on the inner torch optimizer) and then calls ``GradScaler.step`` on the fairseq wrapper, which
unscales the same gradients a second time (fairseq/optim/amp_optimizer.py: ``step`` after
``clip_grad_norm``): every update would be 1/loss_scale of what it should be. Our wrappers declare
``_step_supports_amp_scaling`` so that GradScaler hands them ``found_inf`` instead of unscaling again.

At construction the optimizer finds the fairseq models that own its parameters and
* forces fairseq's MultiheadAttention onto its module path (``skip_embed_dim_check``: the fast
  path calls F.multi_head_attention_forward with the projection weights, bypassing the Linear
  modules' hooks; same loss and gradient),
* declares the time-first layout (T x B x C) of everything inside encoder/decoder layers and the
  final layer norms, so per-sentence statistics never guess the batch dimension from sizes.
fairseq's summed losses and ``multiply_grads(world_size / sample_size)`` need no special care:
FNGD measures the host's gradient scale on every solve.
"""

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.tasks import FairseqTask
from fairseq.trainer import Trainer
from omegaconf import II

from fngd_plugin import FNGD, KFAC, OptionError
from fngd_plugin.capture import live_modules
from fngd_plugin.distributed import world_size
from fngd_plugin.gram import DAMPING_MODES, NORMALIZE_MODES
from fngd_plugin.options import COEFFICIENT_MODES, REUSE_MODES, UPDATE_MODES

__all__ = ["FairseqFNGD", "FairseqKFAC", "find_fngd", "share_coefficients"]


@dataclass
class FairseqFNGDConfig(FairseqDataclass):
    momentum: float = field(default=0.9, metadata={"help": "momentum on the FNGD direction"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay added to the FNGD direction"})
    nesterov: bool = field(default=False, metadata={"help": "Nesterov momentum"})
    damping: float = field(default=1.0, metadata={"help": "damping lambda > 0 (see --damping-mode)"})
    damping_mode: ChoiceEnum(list(DAMPING_MODES)) = field(  # type: ignore[valid-type]
        default="relative", metadata={"help": "relative: n*lambda = damping*trace(K)/n; absolute: lambda as given; "
                                              "top: n*lambda = damping*lambda_max(K); cosine: the smallest n*lambda "
                                              "at which the direction's cosine with the mean gradient is >= damping"})
    coefficients: ChoiceEnum(list(COEFFICIENT_MODES)) = field(  # type: ignore[valid-type]
        default="network", metadata={"help": "one coefficient vector for all layers, or one per module"})
    reuse: ChoiceEnum(list(REUSE_MODES)) = field(  # type: ignore[valid-type]
        default="sample", metadata={"help": "after the collect epochs reuse coefficients per sentence id, per batch "
                                            "position, or solve every step"})
    collect_epochs: int = field(default=1, metadata={"help": "epochs that solve for coefficients"})
    normalize: ChoiceEnum(list(NORMALIZE_MODES)) = field(  # type: ignore[valid-type]
        default="sum", metadata={"help": "sum: coefficients of a batch sum to 1 (SGD scale); none: exact NGD step"})
    max_update_norm: Optional[float] = field(default=None, metadata={"help": "clip the global norm of the direction"})
    refresh_every: Optional[int] = field(default=None, metadata={"help": "solve again every this many epochs"})
    no_generic_fallback: bool = field(default=False, metadata={
        "help": "leave modules without a sampler (e.g. learned positional embeddings) to the plain gradient "
                "instead of covering them with exact torch.func per-sample gradients"})
    sketch: Optional[int] = field(default=None, metadata={
        "help": "k: Linear layers whose exact Gram costs more than a k x k random sketch per sample (the "
                "vocabulary projection at thousands of tokens) get the sketch's unbiased Gram; unset: all exact"})
    fngd_update: ChoiceEnum(list(UPDATE_MODES)) = field(  # type: ignore[valid-type]
        default="sgd", metadata={"help": "applied to the FNGD direction: sgd (momentum SGD, the paper's) or adamw "
                                         "(AdamW with beta1 = --momentum; decoupled --weight-decay)"})
    fngd_beta2: float = field(default=0.999, metadata={"help": "AdamW's second-moment decay (--fngd-update adamw)"})
    fngd_eps: float = field(default=1e-8, metadata={"help": "AdamW's epsilon (--fngd-update adamw)"})
    fngd_trace: Optional[str] = field(default=None, metadata={
        "help": "JSON-lines file: one line of direction diagnostics per solve (syncs once per solve)"})
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


def prepare_models(opt: Any, params: list) -> None:
    """Module path for attention, time-first layout declared (see module docstring)."""
    from fairseq.models import BaseFairseqModel
    from fairseq.modules.multihead_attention import MultiheadAttention

    for model in live_modules(BaseFairseqModel, params):
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
    # option names (without "--") of the core's keyword arguments where they differ
    options: dict[str, str] = {}
    # see the module docstring (--amp): GradScaler.step() calls our step() with found_inf set
    _step_supports_amp_scaling = True

    @classmethod
    def core_kwargs(cls, c: Any) -> dict:
        """The core optimizer's keyword arguments from a config (or fairseq's argparse Namespace)."""
        raise NotImplementedError

    @classmethod
    def config_error(cls, c: Any) -> Optional[str]:
        """What is wrong with these option values, in argparse's words (None: nothing): the core's
        own checks (``check_options``), reported under the fairseq option's name."""
        try:
            cls.core.check_options(**cls.core_kwargs(c))
        except OptionError as e:
            option = "--" + cls.options.get(e.name, e.name.replace("_", "-"))
            return f"argument {option}: invalid value {e.value!r} ({e.reason})"
        return None

    def __init__(self, cfg: Any, params: list):
        super().__init__(cfg)
        params = list(params)
        error = self.config_error(self.cfg)  # fairseq-hydra-train and in-process builds skip our argparse check
        if error is not None:
            raise ValueError(error)
        self._optimizer = self.core(params, **self.optimizer_config)
        if not self._optimizer.coverage["covered"]:
            raise ValueError(
                f"--optimizer {self.core.__name__.lower()}: fairseq handed it parameters that no model module owns "
                "(--fp16 and --memory-efficient-fp16 give the optimizer fp32 copies of the model's parameters); "
                "it needs the model's own parameters: use --amp for mixed precision")
        prepare_models(self._optimizer, params)

    @property
    def optimizer_config(self) -> dict:
        return self.core_kwargs(self.cfg)

    @property
    def supports_flat_params(self) -> bool:
        return False  # the per-sample statistics need the model's own parameters

    def zero_grad(self) -> None:
        self._unscaled = False
        self._optimizer.zero_grad()  # also drops what the hooks captured

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        # AMPOptimizer calls this right after GradScaler.unscale_(our core optimizer)
        self._unscaled = True
        return super().clip_grad_norm(max_norm, aggregate_norm_fn)

    def step(self, closure=None, scale=1.0, groups=None):
        found_inf = getattr(self, "found_inf", None)  # set by GradScaler.step (AMP), see the module docstring
        if found_inf is not None:
            if float(found_inf) > 0:
                return None  # what GradScaler does: skip, it lowers the scale
            grad_scale = getattr(self, "grad_scale", None)
            if grad_scale is not None and not getattr(self, "_unscaled", False):
                self.multiply_grads(1.0 / grad_scale)  # nobody unscaled this step's gradients yet
        self._unscaled = False
        return super().step(closure, scale, groups)


@register_optimizer("fngd", dataclass=FairseqFNGDConfig)
class FairseqFNGD(_Wrapped):
    """Fast Natural Gradient Descent (fngd_plugin.FNGD) inside fairseq."""

    core = FNGD
    options = {"update": "fngd-update", "beta2": "fngd-beta2", "eps": "fngd-eps", "trace": "fngd-trace"}

    @classmethod
    def core_kwargs(cls, c: Any) -> dict:
        return dict(lr=c.lr[0], momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov,
                    damping=c.damping, damping_mode=str(c.damping_mode), coefficients=str(c.coefficients),
                    reuse=str(c.reuse), collect_epochs=c.collect_epochs, normalize=str(c.normalize),
                    max_update_norm=c.max_update_norm, refresh_every=c.refresh_every,
                    generic_fallback=not c.no_generic_fallback, sketch=getattr(c, "sketch", None),
                    update=str(getattr(c, "fngd_update", "sgd")), beta2=getattr(c, "fngd_beta2", 0.999),
                    eps=getattr(c, "fngd_eps", 1e-8), trace=getattr(c, "fngd_trace", None))


@register_optimizer("kfac", dataclass=FairseqKFACConfig)
class FairseqKFAC(_Wrapped):
    """K-FAC baseline (fngd_plugin.KFAC) inside fairseq."""

    core = KFAC
    options = {"damping": "kfac-damping"}

    def __init__(self, cfg: Any, params: list):
        if world_size() > 1:
            # the core keeps Kronecker factors per process and preconditions with them: replicas
            # would take different steps and drift apart (measured: 0.34 max parameter difference
            # after 2 epochs on 2 CPU workers); refuse rather than train silently wrong
            raise ValueError("--optimizer kfac does not support distributed training (its Kronecker factors are "
                             "per worker, so the replicas would diverge); use one process, or --optimizer fngd")
        super().__init__(cfg, params)

    @classmethod
    def core_kwargs(cls, c: Any) -> dict:
        return dict(lr=c.lr[0], momentum=c.momentum, weight_decay=c.weight_decay, damping=c.kfac_damping,
                    factor_decay=c.factor_decay, factor_update_steps=c.factor_update_steps,
                    inv_update_steps=c.inv_update_steps, kl_clip=c.kl_clip, max_factor_dim=c.max_factor_dim)


def find_fngd(optimizer: Any, kind: type = FNGD) -> Any:
    """The FNGD (or another ``kind``: KFAC) inside fairseq's optimizer wrappers (FP16Optimizer,
    AMPOptimizer, ...), if any."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, kind):
            return optimizer
        optimizer = (getattr(optimizer, "fp32_optimizer", None) or getattr(optimizer, "wrapped_optimizer", None)
                     or getattr(optimizer, "_optimizer", None))
        seen += 1
    return None


# ids of the sentences each FNGD solved for since the workers last merged their coefficients
_collected: "weakref.WeakKeyDictionary[FNGD, list]" = weakref.WeakKeyDictionary()


def share_coefficients(opt: FNGD) -> None:
    """Distributed reuse="sample": give every worker the coefficients that the others solved.

    A collective: every rank calls it at the same points (epoch starts, checkpoint saves). Within a
    collect epoch each sentence is in one batch on one worker, so the entries that changed since
    the last merge are disjoint; each worker exports the entries of the sentences it solved for,
    everybody merges all of them in rank order, and the stores end up identical."""
    if opt.store is None or opt.reuse != "sample" or world_size() == 1:
        return
    ids = _collected.pop(opt, [])
    ids = torch.unique(torch.cat(ids)) if ids else torch.zeros(0, dtype=torch.long)
    gathered: list = [None] * world_size()
    torch.distributed.all_gather_object(gathered, opt.store.export(ids))
    opt.store.merge(gathered)


def _patch_hosts() -> None:
    if getattr(FairseqTask.train_step, "_fngd", False):
        return
    train_step = FairseqTask.train_step
    begin_epoch = Trainer.begin_epoch
    consolidate_optimizer = Trainer.consolidate_optimizer
    lr_step = Trainer.lr_step

    def task_train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        opt = find_fngd(optimizer)
        if opt is not None:
            if ignore_grad or not sample or "id" not in sample:
                opt.ignore_next_batch()
            else:
                collect = opt.in_collect_phase
                if opt.reuse == "sample" and collect and world_size() > 1:
                    _collected.setdefault(opt, []).append(sample["id"].detach().cpu())
                opt.set_sample_ids(sample["id"])
                # the runner's signal: fairseq averages it over the epoch into its own JSON stats
                # ("train_fngd_collect": 1 collect epoch, 0 reuse epoch), which translate.py reads
                metrics.log_scalar("fngd_collect", 1.0 if collect else 0.0, weight=1, round=3)
        return train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=ignore_grad)

    def trainer_begin_epoch(self, epoch):
        opt = find_fngd(self.optimizer)
        if opt is not None:
            share_coefficients(opt)  # all ranks start every epoch
            opt.set_epoch(epoch - 1)  # fairseq counts epochs from 1
        return begin_epoch(self, epoch)

    def trainer_lr_step(self, epoch, val_loss=None):
        opt = find_fngd(self.optimizer, (FNGD, KFAC))
        if opt is not None:  # fairseq_cli.train calls lr_step once at the end of every epoch
            opt.log_epoch()
        return lr_step(self, epoch, val_loss)

    def trainer_consolidate_optimizer(self):
        opt = find_fngd(self.optimizer)
        if opt is not None:
            share_coefficients(opt)  # all ranks call this before rank 0 writes a checkpoint
        return consolidate_optimizer(self)

    task_train_step._fngd = True  # type: ignore[attr-defined]
    FairseqTask.train_step = task_train_step
    Trainer.begin_epoch = trainer_begin_epoch
    Trainer.consolidate_optimizer = trainer_consolidate_optimizer
    Trainer.lr_step = trainer_lr_step

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
        parsed = parse(parser, input_args, *args, **kwargs)
        ns = parsed[0] if isinstance(parsed, tuple) else parsed
        wrapper = {"fngd": FairseqFNGD, "kfac": FairseqKFAC}.get(getattr(ns, "optimizer", None))
        if wrapper is not None:  # before any data or model is loaded
            error = wrapper.config_error(ns)
            if error is not None:
                parser.error(error)
        return parsed

    options.parse_args_and_arch = parse_args_and_arch


def _allow_checkpoint_globals() -> None:
    """torch >= 2.6 loads with weights_only=True; fairseq checkpoints pickle an argparse.Namespace.
    Allow-list exactly what fairseq's own checkpoints contain instead of disabling the check."""
    import argparse

    import torch

    if hasattr(torch.serialization, "add_safe_globals"):
        import numpy as np

        # fairseq pickles its argparse Namespace, and (with --eval-bleu) numpy arrays of BLEU counts
        multiarray = getattr(np, "_core", None) or np.core
        torch.serialization.add_safe_globals([argparse.Namespace, multiarray.multiarray._reconstruct, np.ndarray,
                                              np.dtype, *{type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4")}])


_patch_hosts()
_allow_checkpoint_globals()
