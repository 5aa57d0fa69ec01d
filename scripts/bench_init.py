"""Time SORSA's initialisation for Llama-2-7B's weight shapes: full vs randomized SVD, one layer per shape.

    python scripts/bench_init.py                       # CPU, rank 128, both methods, markdown table
    python scripts/bench_init.py --device cuda         # on a GPU
    python scripts/bench_init.py --methods randomized --niter 1 2 4

Each shape (4096x4096: q/k/v/o; 11008x4096: gate/up; 4096x11008: down) is initialised once through
`apply_sorsa` on a single bf16 nn.Linear with random weights (the SVD time barely depends on the values),
so a row is the real per-layer cost: the float32 copy, the SVD, the residual W_res and its bf16 cast.
The whole-model time is extrapolated: 32 layers x (4 + 2 + 1) projections. It prints a markdown table.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sorsa import SORSAConfig, apply_sorsa  # noqa: E402

# Llama-2-7B (configs/models/Llama-2-7b-hf.json): (out, in) -> projections per block; 32 blocks.
LLAMA2_7B = {(4096, 4096): ("q/k/v/o_proj", 4), (11008, 4096): ("gate/up_proj", 2), (4096, 11008): ("down_proj", 1)}
LAYERS = 32


def time_layer(out_f: int, in_f: int, method: str, rank: int, niter: int, device: str) -> float:
    """Seconds to initialise one bf16 (out_f x in_f) layer with apply_sorsa (after a warm-up)."""
    torch.manual_seed(0)
    layer = nn.ModuleList([nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=device)])
    config = SORSAConfig(rank=rank, target_modules=r"0", svd=method, niter=niter, residual_dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    apply_sorsa(layer, config, progress=False)
    sync()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["full", "randomized"], choices=["full", "randomized"])
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--niter", type=int, nargs="+", default=[4], help="randomized SVD subspace iterations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # warm-up: LAPACK / cuSOLVER initialisation is not part of any row
    for method in args.methods:
        time_layer(256, 256, method, 16, args.niter[0], args.device)

    columns = [(m, n) for m in args.methods for n in (args.niter if m == "randomized" else [None])]
    per_layer = {}
    for (o, i), (names, _) in LLAMA2_7B.items():
        for method, niter in columns:
            per_layer[(o, i), method, niter] = time_layer(o, i, method, args.rank, niter or 0, args.device)
            print(f"  {o}x{i} {method}{'' if niter is None else f' niter={niter}'}: "
                  f"{per_layer[(o, i), method, niter]:.2f} s", file=sys.stderr)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    head = [f"{m} SVD" if n is None else f"randomized SVD (niter {n})" for m, n in columns]
    print(f"\nSORSA initialisation, Llama-2-7B shapes, rank {args.rank}, bf16 weights decomposed in float32; "
          f"{device}; torch {torch.__version__}.\nPer layer: measured on one layer of each shape. Whole model: "
          f"extrapolated as {LAYERS} blocks x the projections per block (not measured end to end).\n")
    print("| weight (out x in) | per block | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(columns))
    total = {c: 0.0 for c in columns}
    for (o, i), (names, count) in LLAMA2_7B.items():
        cells = []
        for c in columns:
            t = per_layer[(o, i), *c]
            total[c] += LAYERS * count * t
            cells.append(f"{t:.2f} s")
        print(f"| {o} x {i} ({names}) | {count} | " + " | ".join(cells) + " |")
    n_layers = LAYERS * sum(c for _, c in LLAMA2_7B.values())
    print(f"| **whole model, extrapolated** | {n_layers} layers | "
          + " | ".join(f"**{total[c]:.0f} s ({total[c] / 60:.1f} min)**" for c in columns) + " |")


if __name__ == "__main__":
    main()
