"""Which exact Gram route is fastest, layer by layer, and does FNGD pick it?

    python benchmarks/gram_routes.py                       # CPU: the layer shapes of make bench's models
    python benchmarks/gram_routes.py --device cuda --out results/gram_routes.md

For each layer shape (the Linear and Conv2d layers of the benchmark models at batch 32 and at the
training sizes of collect_profile.py) every exact route of K_ij = <g_i, g_j> is timed on the same
random input and output gradients (median of --repeats calls after one warm-up):
  token        the (nT)^2 token-pair products, a block of samples at a time
  chunked      g_i materialised a block of output rows at a time, K += G G^T
  materialize  (Conv2d) g_i from one grouped weight-gradient convolution
  pixel        (Conv2d) pixel-pair products shifted once per kernel offset (ConvGrads._pixel_gram)
and printed with the route FNGD's cost model (fngd_plugin/samplers/routes.py: _route_costs, constants ROUTE_COST) picks:
"picked / fastest" is the price of a wrong pick. This is the measurement the constants come from.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cost import sync  # noqa: E402

from fngd_plugin import samplers as S  # noqa: E402

# (label, n, T, p, q): Linear layers of the Transformers (d_model 256 / 512, FFN 4x, 8000-word
# untied output projection) at step_cost's 32 x 30 tokens and fairseq's 4080 target tokens
LINEAR = [
    ("attn d256, 32x30", 32, 30, 256, 256),
    ("ffn-in d256, 32x30", 32, 30, 256, 1024),
    ("ffn-out d256, 32x30", 32, 30, 1024, 256),
    ("out-proj d256 V8000, 32x30", 32, 30, 256, 8000),
    ("attn d256, 136x30", 136, 30, 256, 256),
    ("ffn-in d256, 136x30", 136, 30, 256, 1024),
    ("attn d512, 136x30", 136, 30, 512, 512),
    ("ffn-in d512, 136x30", 136, 30, 512, 2048),
    ("out-proj d256 V8000, 136x30", 136, 30, 256, 8000),
    ("out-proj d512 V8000, 136x30", 136, 30, 512, 8000),
    ("out-proj d512 V8000, 64x30", 64, 30, 512, 8000),
    ("classifier 512->100, 128", 128, 1, 512, 100),
]
# (label, n, C_in, C_out, H, kernel, stride): CIFAR ResNet-18 (32x32) and ResNet-50 at 64x64
CONV = [
    ("r18 layer1 3x3 64, b32", 32, 64, 64, 32, 3, 1),
    ("r18 layer2 3x3 128, b32", 32, 128, 128, 16, 3, 1),
    ("r18 layer3 3x3 256, b32", 32, 256, 256, 8, 3, 1),
    ("r18 layer4 3x3 512, b32", 32, 512, 512, 4, 3, 1),
    ("r18 layer2 3x3 128, b128", 128, 128, 128, 16, 3, 1),
    ("r18 layer3 3x3 256, b128", 128, 256, 256, 8, 3, 1),
    ("r18 layer3 down 3x3 s2, b128", 128, 128, 256, 16, 3, 2),
    ("r18 layer4 3x3 512, b128", 128, 512, 512, 4, 3, 1),
    ("r18 layer4 down 3x3 s2, b128", 128, 256, 512, 8, 3, 2),
    ("r50 layer3 3x3 256 @4x4, b128", 128, 256, 256, 4, 3, 1),
    ("r50 layer4 3x3 512 @2x2, b128", 128, 512, 512, 2, 3, 1),
    ("r50 layer2 1x1 128->512 @8x8, b128", 128, 128, 512, 8, 1, 1),
    ("imagenet r18 layer4 3x3 512 @7x7, b128", 128, 512, 512, 7, 3, 1),
]


def timed(fn, repeats: int, device: torch.device) -> float:
    def once() -> float:
        sync(device.type)
        t = time.perf_counter()
        fn()
        sync(device.type)
        return time.perf_counter() - t

    once()
    return statistics.median(once() for _ in range(repeats))


def linear_row(label, n, T, p, q, device, repeats):
    A = torch.randn(n, T, p, device=device)
    D = torch.randn(n, T, q, device=device)
    times = {"token": timed(lambda: S._token_gram(A, D, True), repeats, device),
             "chunked": timed(lambda: S._chunked_gram(A, D, True), repeats, device)}
    return label, times, S.FactoredGrads(A, D, nn.Parameter(torch.empty(q, p)), None)._gram_route()


def conv_row(label, n, c_in, c_out, H, k, stride, device, repeats):
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).to(device)
    a = torch.randn(n, c_in, H, H, device=device)
    Ho = conv(a[:1]).shape[-1]
    delta = torch.randn(n, c_out, Ho, Ho, device=device)
    r = S.ConvGrads(conv, a, delta)
    picked = r._gram_route()
    routes = {"token": lambda: S._token_gram(*r.kron_factors(any_order=True), True),
              "chunked": lambda: S._chunked_gram(*r.kron_factors(any_order=True), True)}
    if n * sum(p.numel() for p in r.params) <= S._ROUTE_MEMORY_LIMIT:
        routes["materialize"] = lambda: S._gram_of(r.materialize())
    if r._pixels() is not None:
        routes["pixel"] = r._pixel_gram
    return label, {name: timed(fn, repeats, device) for name, fn in routes.items()}, picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/gram_routes.md")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    names = ["token", "chunked", "materialize", "pixel"]
    lines = ["# Exact Gram routes, layer by layer", "",
             f"Machine: {platform.processor() or platform.machine()} ({device}), {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Median of {args.repeats} calls "
             f"(after a warm-up), ms; ROUTE_COST[{device.type!r}] = "
             f"{S.ROUTE_COST.get(device.type, S.ROUTE_COST['cuda'])}.", "",
             "| layer | " + " | ".join(names) + " | picked | fastest | picked / fastest |",
             "|---" * (len(names) + 4) + "|"]
    worst = 1.0
    rows = [(linear_row, s) for s in LINEAR] + [(conv_row, s) for s in CONV]
    for i, (fn, shape) in enumerate(rows, 1):
        label, times, picked = fn(*shape, device, args.repeats)
        fastest = min(times, key=times.__getitem__)
        ratio = times[picked] / times[fastest]
        worst = max(worst, ratio)
        cells = [f"{1000 * times[k]:.1f}" if k in times else "" for k in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {picked} | {fastest} | {ratio:.2f}x |")
        print(f"[{i}/{len(rows)}] {lines[-1]}", flush=True)
    lines += ["", f"Worst picked / fastest: {worst:.2f}x. Total time: {time.perf_counter() - start:.0f} s"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
