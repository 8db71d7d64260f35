"""KFAC baseline on FNGD's capture machinery (Martens & Grosse 2015; convolutions: Grosse & Martens 2016).

Per covered layer (nn.Linear, nn.Conv2d with groups=1, transformers' Conv1D: a Linear whose
weight is stored transposed) with inputs a (bias column appended) and
per-sample output gradients delta, over n samples and T tokens / spatial positions each:

    A = (1/(nT)) sum_{i,t} a_it a_it^T          G = (1/n) sum_{i,t} delta_it delta_it^T

so that the empirical Fisher of the layer, (1/n) sum_i g_i g_i^T with g_i = sum_t delta_it a_it^T,
is approximated by A (x) G (exact for T = 1; KFC's spatially uncorrelated derivatives for T > 1).
delta is in the same true per-sample units as FNGD's (the host's gradient scale is measured), so
loss scaling and reduction do not change the curvature. Factors are running averages updated
every ``factor_update_steps`` steps; their inverses every ``inv_update_steps`` steps:

  inverse="eigen"     V' = Q_G [(Q_G^T V Q_A) / (d_G d_A^T + damping)] Q_A^T   (exact damping)
  inverse="cholesky"  V' = (G + sqrt(damping)/pi I)^-1 V (A + pi sqrt(damping) I)^-1 (Tikhonov,
                      pi = sqrt((tr A / dim A) / (tr G / dim G)) if pi_correction else 1)

with V the layer's gradient as an (out, in[+1]) matrix. Optional KL clipping scales all
preconditioned gradients by min(1, sqrt(kl_clip / (lr^2 sum_layers <V', V>))). Then momentum SGD
with weight decay. Other parameters keep their gradient (plain SGD), reported at construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .base import CaptureOptimizer
from .capture import MicroBatch
from .hf_samplers import is_conv1d
from .options import check_choice, check_number, check_sgd_args
from .samplers import ConvGrads, unsupported_reason

INVERSE_METHODS = ("eigen", "cholesky")
logger = logging.getLogger("fngd_plugin")


def _eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """eigh, retried in float64 with a tiny jitter: LAPACK can fail to converge on exactly
    degenerate factors (a G of zeros behind a zero-initialised BatchNorm, say)."""
    try:
        return torch.linalg.eigh(M)
    except (torch.linalg.LinAlgError, RuntimeError):
        M64 = M.to(torch.float64)
        jitter = max(1e-10 * float(M64.diagonal().abs().mean()), 1e-30)
        d, Q = torch.linalg.eigh(M64 + jitter * torch.eye(M.shape[0], dtype=torch.float64, device=M.device))
        return (d - jitter).to(M.dtype), Q.to(M.dtype)


def _damped_inverse(M: Tensor, damping: float) -> Tensor:
    """(M + damping I)^-1 by Cholesky: one copy of M with its diagonal raised (no identity built)."""
    Md = M.clone()
    Md.diagonal().add_(damping)
    return torch.cholesky_inverse(torch.linalg.cholesky(Md))


def _all_finite(new: dict[str, Tensor]) -> bool:
    """Whether a layer's new inverses / eigendecompositions are finite, from one pass over each
    (a sum is non-finite if any entry is: eigenvectors are bounded, so their sum cannot overflow)
    and, for the symmetric positive definite inverses, from their diagonals alone: a NaN or Inf
    entry (j, k) of L^-T L^-1 comes from column j or k of L^-1 and so shows on the diagonal."""
    total = sum((v.diagonal().sum() if k.endswith("inv") else v.sum()) for k, v in new.items())
    return bool(torch.isfinite(total))


def _flat_factors(rep, bias: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(Af (nT, p [+1 column of ones]), Df (nT, q), back): a layer's inputs and output gradients as
    matrices. A convolution with fewer patch columns than patches (p < nT: early, wide-spatial
    layers) takes channels-last patches, cheaper to copy, and ``back`` is the index that puts
    Af^T Af back in the weight's column order (a p x p gather, smaller than the n T x p copy saved);
    otherwise back is None."""
    back = None
    if isinstance(rep, ConvGrads):
        order = rep.patch_order()
        use = order is not None and order.numel() < rep.n * rep._tokens()
        A, D = rep.kron_factors(any_order=use)
        if use:
            back = torch.argsort(order)
            if bias:
                back = torch.cat([back, back.new_full((1,), order.numel())])
    else:
        A, D = rep.kron_factors()
    Af = A.reshape(-1, A.shape[-1])
    if bias:
        Af = torch.cat([Af, Af.new_ones(Af.shape[0], 1)], dim=1)
    return Af, D.reshape(-1, D.shape[-1]), back


class KFAC(CaptureOptimizer):
    """K-FAC with momentum SGD.

    Args:
        params: parameters or param groups.
        lr, momentum, weight_decay, nesterov: the SGD step on the preconditioned gradient.
        damping: Tikhonov damping lambda > 0 (see module docstring for how each method applies it).
        factor_decay: running-average decay of A and G, in [0, 1).
        factor_update_steps: recompute A and G every this many steps (>= 1).
        inv_update_steps: recompute the inverses / eigendecompositions every this many steps (>= 1).
        inverse: "eigen" or "cholesky".
        pi_correction: pi-corrected Tikhonov split (cholesky method only).
        kl_clip: KL-clipping threshold (None to disable).
        inverse_dtype: dtype of the eigendecompositions / inverses (default: the factors' dtype).
        max_factor_dim: layers whose A or G would be larger than this stay plain SGD (reported at
            construction); KFAC codebases commonly skip huge output projections this way.
    """

    counter_names = ("skipped", "factor_updates", "factor_failures", "inverse_updates", "inverse_failures")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_steps: int = 10,
        inv_update_steps: int = 100,
        inverse: str = "eigen",
        pi_correction: bool = True,
        kl_clip: float | None = 1e-3,
        inverse_dtype: torch.dtype | None = None,
        max_factor_dim: int | None = None,
    ):
        check_sgd_args(lr, momentum, weight_decay, nesterov)
        check_number("damping", damping, minimum=0.0, strict=True)
        check_number("factor_decay", factor_decay, minimum=0.0, below=1)
        check_number("factor_update_steps", factor_update_steps, minimum=1, integer=True)
        check_number("inv_update_steps", inv_update_steps, minimum=1, integer=True)
        check_choice("inverse", inverse, INVERSE_METHODS)
        check_number("kl_clip", kl_clip, minimum=0.0, strict=True, optional=True)
        check_number("max_factor_dim", max_factor_dim, minimum=1, integer=True, optional=True)
        self.max_factor_dim = max_factor_dim  # read by _unsupported during the coverage report
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))
        self.damping = float(damping)
        self.factor_decay = float(factor_decay)
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.inverse = inverse
        self.pi_correction = pi_correction
        self.kl_clip = kl_clip
        self.inverse_dtype = inverse_dtype
        self._steps = 0
        self._epoch_start: dict[str, int] = {}  # stats() at the last epoch line
        self._layers: dict[int, tuple[Tensor, Tensor | None]] = {}  # weight index -> (weight, bias)

    def _unsupported(self, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.Linear, nn.Conv2d)) and not is_conv1d(module):
            return f"KFAC covers Linear and Conv2d (and transformers' Conv1D), not {type(module).__name__}"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return "grouped convolution"
        if self.max_factor_dim is not None:
            w = module.weight.T if is_conv1d(module) else module.weight
            dims = (w[0].numel() + (module.bias is not None), w.shape[0])
            if max(dims) > self.max_factor_dim:
                return f"factor dimension {max(dims)} > max_factor_dim={self.max_factor_dim}"
        return unsupported_reason(module)

    def _start_batch(self, root: nn.Module, args: tuple) -> MicroBatch:
        factor_step = self._steps % self.factor_update_steps == 0
        return MicroBatch(position=self._steps, epoch=0, collect=False, capture=factor_step)

    def stats(self) -> dict:
        c = {k: int(v) for k, v in self._counters.items()}
        return {"steps": self._steps, "layers": len(self._layers), **c,
                "unpreconditioned": dict(self.unpreconditioned),
                "unpreconditioned_modules": {k: sorted(v) for k, v in self.unpreconditioned_modules.items()},
                "discarded_batches": self.discarded_batches}

    def epoch_line(self) -> str:
        """What KFAC did since the last epoch line: steps, factor and inverse updates with their
        failures (each kept the previous factors / inverse), skipped steps, and what it could not
        precondition, by cause (the hosts log it per epoch, as FNGD's)."""
        now = self._counts()
        d = {k: v - self._epoch_start.get(k, 0) for k, v in now.items()}
        causes = ", ".join(f"{k} {v}" for k, v in sorted(self.unpreconditioned.items())) or "none"
        return (f"KFAC epoch: {d['steps']} steps, {d['factor_updates']} factor updates ({d['factor_failures']} "
                f"non-finite layer factors, previous kept), {d['inverse_updates']} inverse updates "
                f"({d['inverse_failures']} failed layer inverses, previous kept), {d['skipped']} steps skipped "
                f"(non-finite directions); not preconditioned (all epochs): {causes}; batches discarded by the "
                f"host: {self.discarded_batches}")

    def log_epoch(self) -> None:
        """Log :meth:`epoch_line` if a step was taken since the last one (hosts call it when an epoch ends)."""
        if self._steps == self._epoch_start.get("steps", 0):
            return
        logger.info(self.epoch_line())
        self._epoch_start = self._counts()

    def _counts(self) -> dict[str, int]:
        """Steps and counters, what the epoch line counts since the last one."""
        return {"steps": self._steps, **{k: int(v) for k, v in self._counters.items()}}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["kfac"] = {"steps": self._steps, "counters": {k: v.cpu().clone() for k, v in self._counters.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("kfac")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kfac"})
        if extra is not None:
            self._steps = int(extra["steps"])
            # a checkpoint from before a counter existed starts that counter at zero
            self._counters.update({k: v.clone() for k, v in extra["counters"].items()})
            self._epoch_start = self._counts()  # the next epoch line counts from the resumed step
        self._layers = {self._index[id(p)]: (p, None) for p in self._params if "kfac_A" in self.state[p]}
        for p in self._params:  # re-pair each bias with its weight
            bias_of = self.state[p].get("kfac_bias_of")
            if bias_of is not None:
                w = self._params[int(bias_of)]
                self._layers[int(bias_of)] = (w, p)

    def _precondition(self, batches: list[MicroBatch]) -> None:
        if batches:
            self._update_factors(batches)
        if self._steps % self.inv_update_steps == 0:
            self._update_inverses()
        self._apply_inverses()
        self._steps += 1

    # ------------------------------------------------------------------ factors
    def _update_factors(self, batches: list[MicroBatch]) -> None:
        """A <- d A + (1 - d) A_batch and G likewise, the running average folded into the GEMMs that
        build the statistics (one pass over each factor, not the five of scale, decay, add, check and
        select). The new factors are committed only where they are finite, judged from their diagonals:
        a non-finite input or output gradient makes a diagonal entry (a sum of squares) non-finite,
        and |F_jk| <= sqrt(F_jj F_kk) for the positive semi-definite F. One host sync per factor update
        decides which layers commit."""
        per_mb = [self._blocks(self._reps(mb)) for mb in batches]
        per_mb = [b for b in per_mb if b]
        if not per_mb:
            return
        kappa = self._measure_scale(per_mb)
        ns = [next(iter(b.values()))[0].n for b in per_mb]
        N = sum(ns)
        d = self.factor_decay
        transposed: set[int] = set()
        fresh: dict[int, list] = {}  # weight index -> [A, raw G statistic, weight of A_batch], not committed
        for blocks in per_mb:
            for reps in blocks.values():
                for rep in reps:
                    weight, bias = rep.params[0], (rep.params[1] if len(rep.params) > 1 else None)
                    Af, Df, back = _flat_factors(rep, bias is not None)
                    # micro-batch m enters with weight n_m / N: A_m / (n_m T_m) * n_m / N = A_m / (N T_m)
                    alpha = float(rep.n) / (N * Af.shape[0])
                    key = self._index[id(weight)]
                    self._layers[key] = (weight, bias)
                    if getattr(rep, "transposed", False):
                        transposed.add(key)
                    # channels-last patches: the p x p statistic is put back in the weight's order
                    S = None if back is None else torch.mm(Af.T, Af)[back[:, None], back[None, :]]
                    if key in fresh:  # a later micro-batch of this step: add its statistics
                        a_acc, g_acc, w = fresh[key]
                        if S is not None:
                            a_acc.add_(S, alpha=w * alpha)
                        else:
                            a_acc.addmm_(Af.T, Af, alpha=w * alpha)
                        g_acc.addmm_(Df.T, Df)
                        continue
                    old = self.state[weight].get("kfac_A")
                    w = 1.0 if old is None else 1 - d  # the first statistics are the factors
                    if S is not None:
                        a_new = S.mul_(alpha) if old is None else torch.lerp(old, S.mul_(alpha), w)
                    else:
                        a_new = (torch.mm(Af.T, Af).mul_(alpha) if old is None
                                 else torch.addmm(old, Af.T, Af, beta=d, alpha=w * alpha))
                    fresh[key] = [a_new, torch.mm(Df.T, Df), w]
        # G: true per-sample output gradients are N kappa delta, so G_batch = N kappa^2 sum_m D_m^T D_m
        g_scale = (N * kappa * kappa).to(next(iter(fresh.values()))[1].dtype)
        finite = []
        for key, (a_new, g_stat, _) in fresh.items():
            weight, _ = self._layers[key]
            old_g = self.state[weight].get("kfac_G")
            g_new = g_stat.mul_(g_scale) if old_g is None else torch.lerp(old_g, g_stat.mul_(g_scale), 1 - d)
            fresh[key][1] = g_new
            finite.append(torch.isfinite(a_new.diagonal()).all() & torch.isfinite(g_new.diagonal()).all())
        ok = torch.stack(finite).tolist()
        for (key, (a_new, g_new, _)), good in zip(fresh.items(), ok):
            weight, bias = self._layers[key]
            st = self.state[weight]
            if good:
                st["kfac_A"], st["kfac_G"] = a_new, g_new
            else:
                self._add("factor_failures", torch.ones((), dtype=torch.float64))
                self._warn_once("factors", "KFAC: a factor update was non-finite (a NaN or Inf in the inputs or "
                                "output gradients of a layer); that layer keeps its previous factors")
                if "kfac_A" not in st:  # identity factors (a scaled SGD step) until finite statistics arrive
                    st["kfac_A"] = torch.eye(a_new.shape[0], dtype=a_new.dtype, device=a_new.device)
                    st["kfac_G"] = torch.eye(g_new.shape[0], dtype=g_new.dtype, device=g_new.device)
            if bias is not None:
                self.state[bias]["kfac_bias_of"] = key
            if key in transposed:
                st["kfac_transposed"] = True  # weight stored (in, out): preconditioned as its transpose
        self._add("factor_updates", torch.ones((), dtype=torch.float64))

    # ------------------------------------------------------------------ inverses
    def _update_inverses(self) -> None:
        for weight, _ in self._layers.values():
            st = self.state[weight]
            if "kfac_A" not in st:
                continue
            dt = self.inverse_dtype or st["kfac_A"].dtype
            A, G = st["kfac_A"].to(dt), st["kfac_G"].to(dt)
            try:
                if self.inverse == "eigen":
                    dA, QA = _eigh(A)
                    dG, QG = _eigh(G)
                    new = {"kfac_QA": QA, "kfac_dA": dA.clamp_min(0), "kfac_QG": QG, "kfac_dG": dG.clamp_min(0)}
                else:
                    pi = 1.0
                    if self.pi_correction:
                        ta, tg = A.trace() / A.shape[0], G.trace() / G.shape[0]
                        pi = float(torch.sqrt(ta / tg)) if float(tg) > 0 and float(ta) > 0 else 1.0
                    r = math.sqrt(self.damping)
                    new = {"kfac_Ainv": _damped_inverse(A, pi * r), "kfac_Ginv": _damped_inverse(G, r / pi)}
                if not _all_finite(new):
                    raise torch.linalg.LinAlgError("non-finite factors")
            except (torch.linalg.LinAlgError, RuntimeError):
                # keep the previous inverse (or none: plain SGD for this layer); never corrupt parameters
                self._add("inverse_failures", torch.ones((), dtype=torch.float64))
                self._warn_once("inverse", "KFAC: an inverse update failed (non-finite or singular factors); "
                                "the layer keeps its previous inverse (none yet: its plain gradient, counted in "
                                "stats()['unpreconditioned']['no_inverse'])")
                continue
            st.update({k: v.to(weight.dtype) for k, v in new.items()})
        self._add("inverse_updates", torch.ones((), dtype=torch.float64))

    # ------------------------------------------------------------------ preconditioning
    def _apply_inverses(self) -> None:
        vg_sum = None
        done: list[tuple[Tensor, Tensor | None, Tensor, float, bool]] = []
        lr_of = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        missing = 0
        for weight, bias in self._layers.values():
            st = self.state[weight]
            if weight.grad is None:
                continue
            if "kfac_QA" not in st and "kfac_Ainv" not in st:
                missing += 1  # no inverse yet: plain gradient, counted below (CAUSES['no_inverse'])
                continue
            flip = st.get("kfac_transposed", False)
            V = weight.grad.T if flip else weight.grad.reshape(weight.shape[0], -1)
            if bias is not None:
                if bias.grad is None:
                    continue
                V = torch.cat([V, bias.grad.reshape(-1, 1)], dim=1)
            if "kfac_QA" in st:
                QA, QG = st["kfac_QA"], st["kfac_QG"]
                M = QG.T @ V @ QA
                M = M / (st["kfac_dG"][:, None] * st["kfac_dA"][None, :] + self.damping)
                P = QG @ M @ QA.T
            else:
                P = st["kfac_Ginv"] @ V @ st["kfac_Ainv"]
            lr = lr_of[id(weight)]
            term = (P * V).sum() * lr**2
            vg_sum = term if vg_sum is None else vg_sum + term
            done.append((weight, bias, P, lr, flip))
        if missing:
            self._unengaged("no_inverse", f" ({missing} layers)")
        if not done:
            return
        nu = None
        if self.kl_clip is not None and vg_sum is not None:
            nu = torch.sqrt(self.kl_clip / vg_sum.abs().clamp_min(1e-30)).clamp(max=1.0)
        for weight, bias, P, _, flip in done:
            if nu is not None:
                P = P * nu
            W = P[:, :-1] if bias is not None else P
            weight.grad.copy_((W.T if flip else W).reshape(weight.shape))
            if bias is not None:
                bias.grad.copy_(P[:, -1].reshape(bias.shape))
