"""What the coverage routes cost per layer: per-sample gradients + Gram, against the layer's own
forward + backward (its share of an SGD step), measured side by side in one process.

    python benchmarks/fallback_cost.py [--batch 32] [--rounds 15] [--device cpu] [--out FILE]

For each layer: t_sgd = forward + backward of the layer on a batch; t_route = what FNGD adds in a
collect step for it (per-sample gradients of its parameters from the recorded input and output
gradient, by the route FNGD takes, then their n x n Gram). Rounds interleave all layers; medians.
Routes: "sampler" (registered, factored), "subclass" (the parent's sampler after pulling the
output gradient back through drop/act), "generic" (torch.func vmap of a vjp: generic.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from fngd_plugin.generic import generic_grads
from fngd_plugin.samplers import find_sampler, override_base, sampler_meta, subclass_grads


def cases(n: int) -> list[tuple[str, nn.Module, tuple]]:
    from timm.layers import BatchNormAct2d, LayerNorm2d, LayerScale2d, RmsNorm2d
    from timm.models.convnext import ConvNeXtBlock

    img = (n, 64, 16, 16)
    seq = (n, 32, 64)
    return [
        ("BatchNorm2d (sampler)", nn.BatchNorm2d(64), img),
        ("BatchNormAct2d (subclass)", BatchNormAct2d(64, act_layer=nn.SiLU), img),
        ("LayerNorm over C, channels-last (sampler)", nn.LayerNorm(64), (n, 16, 16, 64)),
        ("LayerNorm2d (generic)", LayerNorm2d(64), img),
        ("RmsNorm2d (generic)", RmsNorm2d(64), img),
        ("LayerScale2d (generic)", LayerScale2d(64, init_values=0.5), img),
        ("ConvNeXtBlock gamma (generic)", ConvNeXtBlock(64, ls_init_value=0.5), img),
        ("Conv2d 1x3 (sampler)", nn.Conv2d(64, 64, (1, 3), padding=(0, 1)), (n, 64, 1, 128)),
        ("Conv1d k3 (generic)", nn.Conv1d(64, 64, 3, padding=1), (n, 64, 128)),
        ("Linear per token (sampler)", nn.Linear(64, 192), seq),
        ("MultiheadAttention (generic)", nn.MultiheadAttention(64, 4, batch_first=True), seq),
    ]


def call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    return module(x)


def route_cost(name: str, module: nn.Module, x: torch.Tensor, delta: torch.Tensor, meta: dict):
    if "(sampler)" in name:
        return find_sampler(module)(module, x, delta, 0, meta).gram()  # type: ignore[misc]
    if "(subclass)" in name:
        return subclass_grads(module, override_base(module), x, delta, 0, meta, None).gram()  # type: ignore[arg-type]
    args = (x, x, x) if isinstance(module, nn.MultiheadAttention) else (x,)
    kwargs = {"need_weights": False} if isinstance(module, nn.MultiheadAttention) else {}
    return generic_grads(module, args, kwargs, delta, 0).gram()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = ap.parse_args()
    if a.batch < 1 or a.rounds < 3:
        ap.error(f"--batch must be >= 1 and --rounds >= 3 (got {a.batch}, {a.rounds})")
    torch.manual_seed(0)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    prepared = []
    for name, module, shape in cases(a.batch):
        module = module.to(dev).train()
        x = torch.randn(shape, device=dev)
        out = call(module, x)
        delta = torch.randn_like(out)
        prepared.append((name, module, x, delta, sampler_meta(module)))
    times: dict[str, dict[str, list[float]]] = {p[0]: {"sgd": [], "route": []} for p in prepared}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, module, x, delta, meta in prepared:
            sync()
            t = time.perf_counter()
            call(module, x.requires_grad_(False)).backward(delta)
            sync()
            t_sgd = time.perf_counter() - t
            module.zero_grad(set_to_none=True)
            with torch.no_grad():
                t = time.perf_counter()
                route_cost(name, module, x, delta, meta)
                sync()
                t_route = time.perf_counter() - t
            if r:
                times[name]["sgd"].append(t_sgd)
                times[name]["route"].append(t_route)
    rows = ["| layer (route) | fwd+bwd ms | per-sample grads + Gram ms | ratio |", "|---|---|---|---|"]
    for name, t in times.items():
        s, q = statistics.median(t["sgd"]) * 1e3, statistics.median(t["route"]) * 1e3
        rows.append(f"| {name} | {s:.2f} | {q:.2f} | {q / s:.2f}x |")
    head = (f"batch {a.batch}, {a.rounds} rounds, medians; {a.device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    text = head + "\n\n" + "\n".join(rows)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
