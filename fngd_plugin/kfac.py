"""KFAC baseline on FNGD's capture machinery (Martens & Grosse 2015; convolutions: Grosse & Martens 2016).

Per covered layer (nn.Linear, nn.Conv2d with groups=1) with inputs a (bias column appended) and
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

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .base import CaptureOptimizer
from .capture import MicroBatch
from .options import check_choice, check_number, check_sgd_args
from .samplers import unsupported_reason

INVERSE_METHODS = ("eigen", "cholesky")


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

    counter_names = ("skipped", "factor_updates", "inverse_updates", "inverse_failures")

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
        self._layers: dict[int, tuple[Tensor, Tensor | None]] = {}  # weight index -> (weight, bias)

    def _unsupported(self, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return f"KFAC covers Linear and Conv2d, not {type(module).__name__}"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return "grouped convolution"
        if self.max_factor_dim is not None:
            w = module.weight
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
                "unpreconditioned": dict(self.unpreconditioned), "discarded_batches": self.discarded_batches}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["kfac"] = {"steps": self._steps, "counters": {k: v.cpu().clone() for k, v in self._counters.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        extra = state_dict.get("kfac")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kfac"})
        if extra is not None:
            self._steps = int(extra["steps"])
            self._counters = {k: v.clone() for k, v in extra["counters"].items()}
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
        per_mb = [self._blocks(self._reps(mb)) for mb in batches]
        per_mb = [b for b in per_mb if b]
        if not per_mb:
            return
        kappa = self._measure_scale(per_mb)
        ns = [next(iter(b.values()))[0].n for b in per_mb]
        N = sum(ns)
        new: dict[int, list[Tensor]] = {}
        for blocks, n in zip(per_mb, ns):
            for reps in blocks.values():
                for rep in reps:
                    A, D = rep.kron_factors()  # type: ignore[attr-defined]
                    weight, bias = rep.params[0], (rep.params[1] if len(rep.params) > 1 else None)
                    T = A.shape[1]
                    Af = A.reshape(-1, A.shape[-1])
                    if bias is not None:
                        Af = torch.cat([Af, Af.new_ones(Af.shape[0], 1)], dim=1)
                    Df = D.reshape(-1, D.shape[-1]) * (N * kappa).to(D.dtype)
                    # micro-batches are averaged with weights n_m / N
                    a_cov = (Af.T @ Af) / (n * T) * (n / N)
                    g_cov = (Df.T @ Df) / n * (n / N)
                    key = self._index[id(weight)]
                    self._layers[key] = (weight, bias)
                    if key in new:
                        new[key][0] += a_cov
                        new[key][1] += g_cov
                    else:
                        new[key] = [a_cov, g_cov]
        for key, (a_cov, g_cov) in new.items():
            weight, bias = self._layers[key]
            st = self.state[weight]
            ok = torch.isfinite(a_cov).all() & torch.isfinite(g_cov).all()
            if "kfac_A" not in st:
                st["kfac_A"] = torch.where(ok, a_cov, torch.eye(a_cov.shape[0], dtype=a_cov.dtype,
                                                                 device=a_cov.device))
                st["kfac_G"] = torch.where(ok, g_cov, torch.eye(g_cov.shape[0], dtype=g_cov.dtype,
                                                                 device=g_cov.device))
            else:
                d = self.factor_decay
                st["kfac_A"] = torch.where(ok, d * st["kfac_A"] + (1 - d) * a_cov, st["kfac_A"])
                st["kfac_G"] = torch.where(ok, d * st["kfac_G"] + (1 - d) * g_cov, st["kfac_G"])
            if bias is not None:
                self.state[bias]["kfac_bias_of"] = key
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
                    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
                    new = {"kfac_Ainv": torch.cholesky_inverse(torch.linalg.cholesky(A + pi * r * eye_a)),
                           "kfac_Ginv": torch.cholesky_inverse(torch.linalg.cholesky(G + r / pi * eye_g))}
                if not all(bool(torch.isfinite(v).all()) for v in new.values()):
                    raise torch.linalg.LinAlgError("non-finite factors")
            except (torch.linalg.LinAlgError, RuntimeError):
                # keep the previous inverse (or none: plain SGD for this layer); never corrupt parameters
                self._add("inverse_failures", torch.ones((), dtype=torch.float64))
                self._warn_once("inverse", "KFAC: an inverse update failed (non-finite or singular factors); "
                                "the layer keeps its previous inverse")
                continue
            st.update({k: v.to(weight.dtype) for k, v in new.items()})
        self._add("inverse_updates", torch.ones((), dtype=torch.float64))

    # ------------------------------------------------------------------ preconditioning
    def _apply_inverses(self) -> None:
        vg_sum = None
        done: list[tuple[Tensor, Tensor | None, Tensor, float]] = []
        lr_of = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        for weight, bias in self._layers.values():
            st = self.state[weight]
            if weight.grad is None or ("kfac_QA" not in st and "kfac_Ainv" not in st):
                continue
            V = weight.grad.reshape(weight.shape[0], -1)
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
            done.append((weight, bias, P, lr))
        if not done:
            return
        nu = None
        if self.kl_clip is not None and vg_sum is not None:
            nu = torch.sqrt(self.kl_clip / vg_sum.abs().clamp_min(1e-30)).clamp(max=1.0)
        for weight, bias, P, _ in done:
            if nu is not None:
                P = P * nu
            if bias is not None:
                weight.grad.copy_(P[:, :-1].reshape(weight.shape))
                bias.grad.copy_(P[:, -1].reshape(bias.shape))
            else:
                weight.grad.copy_(P.reshape(weight.shape))
