"""SORSA's initialisation on Llama-2-7B's weight shapes: full vs fast vs randomized SVD, time and accuracy.

    python scripts/bench_init.py                          # CPU, rank 128, markdown table
    python scripts/bench_init.py --device cuda --json out.json
    python scripts/bench_init.py --shapes 1024x1024 --rank 32   # a quick look

Each shape (4096x4096: q/k/v/o; 11008x4096: gate/up; 4096x11008: down) is an LLM-like synthetic matrix
(sorsa.synthetic.llm_like_weight: a few large singular values over a random bulk, outlier input channels),
decomposed by `sorsa.functional.svd_top` with each method in turn (interleaved, after a warm-up). Accuracy
against the full SVD: the excess of the rank-r residual ‖W − U S Vh‖_F over the optimal one (relative), the
largest error of the top-r singular values (relative to σ₁), and the orthonormality of U. The whole-model
time is extrapolated: 32 blocks x (4 + 2 + 1) projections (not measured end to end).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sorsa.core import functional as SF
from sorsa.tools.synthetic import llm_like_weight

# Llama-2-7B (configs/models/Llama-2-7b-hf.json): (out, in) -> projections per block; 32 blocks.
LLAMA2_7B = {(4096, 4096): ("q/k/v/o_proj", 4), (11008, 4096): ("gate/up_proj", 2), (4096, 11008): ("down_proj", 1)}
LAYERS = 32
METHODS = ("full", "randomized", "fast")


def measure(W: torch.Tensor, rank: int, method: str, options: dict, sync) -> tuple[float, tuple, dict]:
    info: dict = {}
    sync()
    start = time.perf_counter()
    factors = SF.svd_top(W, rank, method, info=info, **options)
    sync()
    return time.perf_counter() - start, factors, info


def accuracy(W: torch.Tensor, factors, S_full: torch.Tensor, rank: int) -> dict:
    """Excess residual over the optimal rank-r one, top-r singular value error (/ σ₁), ‖UᵀU − I‖_max."""
    U, S, Vh = factors
    optimal = S_full[rank:].double().pow(2).sum().sqrt()
    residual = (W.double() - (U.double() * S.double()) @ Vh.double()).norm()
    eye = torch.eye(rank, device=W.device)
    return {"excess": (residual / optimal - 1).item(),
            "sigma_error": ((S - S_full[:rank]).abs().max() / S_full[0]).item(),
            "orthonormality": (U.T @ U - eye).abs().max().item()}


def run(shapes, rank: int, device: str, tol: float, oversample: int, max_iter: int) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    options = dict(zip(METHODS, ({}, {"niter": 4}, {"tol": tol, "oversample": oversample, "max_iter": max_iter})))
    small = llm_like_weight(256, 256, seed=1).to(device)
    for method in options:  # warm-up: LAPACK / cuSOLVER initialisation is not part of any row
        SF.svd_top(small, 16, method, **options[method])
    rows = {}
    for (o, i) in shapes:
        W = llm_like_weight(o, i, seed=0).to(device)
        row = {}
        for method in options:
            seconds, factors, info = measure(W, rank, method, options[method], sync)
            row[method] = {"seconds": seconds, **info}
            if method == "full":
                S_full = torch.linalg.svdvals(W)  # all of them, for the optimal residual
            row[method].update(accuracy(W, factors, S_full, rank))
            print(f"  {o}x{i} {method}: {seconds:.2f} s {info}", file=sys.stderr)
        rows[f"{o}x{i}"] = row
    return rows


def table(rows: dict, rank: int, device_name: str, settings: str) -> str:
    lines = [f"SORSA initialisation, rank {rank}, LLM-like synthetic float32 matrices; {device_name}; torch "
             f"{torch.__version__}; {settings}. Whole model: extrapolated (32 blocks x projections per block).", "",
             "| weight (out x in) | method | time | vs full | iterations | residual excess | top-σ error / σ₁ "
             "| ‖UᵀU − I‖ |", "|---|---|---|---|---|---|---|---|"]
    totals = {m: 0.0 for m in METHODS}
    for shape, row in rows.items():
        o, i = map(int, shape.split("x"))
        count = LLAMA2_7B.get((o, i), ("", 1))[1]
        for method, r in row.items():
            totals[method] += LAYERS * count * r["seconds"]
            lines.append(f"| {shape} | {method} | {r['seconds']:.2f} s | {row['full']['seconds'] / r['seconds']:.1f}x "
                         f"| {r.get('iterations', '–')} | {r['excess']:.1e} | {r['sigma_error']:.1e} "
                         f"| {r['orthonormality']:.0e} |")
    lines.append("| **whole model (224 layers), extrapolated** | | " + ", ".join(
        f"{m} {t:.0f} s ({t / 60:.1f} min)" for m, t in totals.items()) + " | | | | | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in LLAMA2_7B], help="OUTxIN ...")
    p.add_argument("--tol", type=float, default=SF.FAST_TOL, help="fast: energy change tolerance")
    p.add_argument("--oversample", type=int, default=SF.FAST_OVERSAMPLE)
    p.add_argument("--max-iter", type=int, default=SF.FAST_MAX_ITER)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write the measurements here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes]
    rows = run(shapes, args.rank, args.device, args.tol, args.oversample, args.max_iter)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    settings = f"fast: oversample {args.oversample}, tol {args.tol:g}, at most {args.max_iter} iterations; " \
               "randomized: q = r, niter 4"
    print(table(rows, args.rank, device_name, settings))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
