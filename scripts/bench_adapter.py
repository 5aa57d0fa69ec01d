"""Forward+backward time and peak memory of one adapted linear layer: SORSA vs PEFT LoRA vs the
reference's dense-delta SORSA forward, interleaved in one run; and full vs randomized SVD init time.

    python scripts/bench_adapter.py                  # 4096x4096, rank 128, batch 4x256, fp32
    python scripts/bench_adapter.py --dim 1024 --rank 32 --repeats 5
    python scripts/bench_adapter.py --quantize          # QSORSA vs PEFT QLoRA on a 4-bit NF4 layer (and unquantized)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

from reference_forward import DenseDelta  # scripts/
from sorsa import SORSALinear
from sorsa.core import functional as SF

METHODS = ("sorsa", "lora", "dense", "frozen")
QUANT_METHODS = ("qsorsa", "qlora", "qfrozen", "sorsa", "lora", "frozen")  # --quantize: 4-bit NF4 and the same unquantized


def build(method: str, dim: int, rank: int) -> nn.Module:
    """One adapted layer; "q…" methods over a 4-bit NF4 base (bitsandbytes): QSORSA's residual, QLoRA's W."""
    torch.manual_seed(0)
    base = nn.Linear(dim, dim, bias=False)
    base.weight.requires_grad_(False)
    spec = None
    if method.startswith("q"):
        from sorsa.core.quant import QuantSpec, quantize_linear

        spec = QuantSpec("nf4", compute_dtype=torch.float32)
        if method != "qsorsa":
            base = quantize_linear(base.weight, None, spec)
    if method in ("frozen", "qfrozen"):
        return base
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        holder = nn.Sequential()
        holder.add_module("proj", base)
        return get_peft_model(holder, LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"])).base_model.model.proj
    layer = SORSALinear(base, rank)
    # the factors' values do not change the timing: a cheap randomized SVD
    layer.set_factors(*SF.initial_adapter(*SF.svd_top(base.weight, rank, "randomized", niter=1)), quant=spec)
    return layer if method in ("sorsa", "qsorsa") else DenseDelta(layer)


def step(module: nn.Module, x: torch.Tensor):
    out = module(x)
    if out.requires_grad:  # the frozen layer on a leaf input has nothing to differentiate
        out.backward(torch.ones_like(out))  # gradients to the adapter (and to x when x requires them)
    for p in module.parameters():
        p.grad = None
    x.grad = None


def peak_rss_bytes_of(method: str, args) -> int | None:
    """Peak resident memory added by one forward+backward, measured in a fresh process (Linux)."""
    cmd = [sys.executable, __file__, "--memory-of", method, "--dim", str(args.dim), "--rank", str(args.rank),
           "--batch", str(args.batch), "--seq", str(args.seq)] + (["--input-grad"] if args.input_grad else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    except (IndexError, ValueError, KeyError):
        return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory(method: str, args):
    module = build(method, args.dim, args.rank)
    x = torch.randn(args.batch, args.seq, args.dim, requires_grad=args.input_grad)
    step(module, x)  # warm-up: allocator pools and thread buffers
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    before = _status_kb("VmRSS")
    step(module, x)
    print(json.dumps({"peak_bytes": (_status_kb("VmHWM") - before) * 1024}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-svd", action="store_true", help="skip the SVD init timing")
    ap.add_argument("--quantize", action="store_true", help="4-bit NF4 bases: QSORSA vs QLoRA (bitsandbytes)")
    ap.add_argument("--memory-of", choices=QUANT_METHODS + ("dense",), help=argparse.SUPPRESS)
    ap.add_argument("--input-grad", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        return measure_memory(args.memory_of, args)

    print(f"layer {args.dim}x{args.dim}, rank {args.rank}, batch {args.batch}x{args.seq}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    methods = QUANT_METHODS if args.quantize else METHODS
    modules = {m: build(m, args.dim, args.rank) for m in methods}
    # A leaf input (no gradient to x) is the setting of the first adapted layer and of the brief's
    # measurement; inside a network x also needs its gradient, which adds the same W_res^T g to all.
    inputs = {grad: torch.randn(args.batch, args.seq, args.dim, requires_grad=grad) for grad in (False, True)}
    times = {(m, grad): [] for m in methods for grad in inputs}
    for (m, grad) in times:  # warm-up
        step(modules[m], inputs[grad])
    for _ in range(args.repeats):  # interleaved, so drifts of the machine hit every method alike
        for (m, grad) in times:
            t0 = time.perf_counter()
            step(modules[m], inputs[grad])
            times[(m, grad)].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    for grad in inputs:
        args.input_grad = grad
        print(f"-- input {'requires grad (inside a network)' if grad else 'is a leaf (no input grad)'}")
        for m in methods:
            mem = peak_rss_bytes_of(m, args)
            mem_s = f"{mem / 2**20:8.1f} MiB" if mem is not None else "     n/a"
            print(f"{m:7s} fwd+bwd median {med[(m, grad)]:8.1f} ms (min {min(times[(m, grad)]) * 1e3:7.1f})"
                  f"  peak extra RSS {mem_s}")
        if args.quantize:
            print(f"ratio QSORSA/QLoRA = {med[('qsorsa', grad)] / med[('qlora', grad)]:.3f}   "
                  f"QSORSA/SORSA = {med[('qsorsa', grad)] / med[('sorsa', grad)]:.2f}   "
                  f"QLoRA/LoRA = {med[('qlora', grad)] / med[('lora', grad)]:.2f}")
        else:
            print(f"ratio SORSA/LoRA = {med[('sorsa', grad)] / med[('lora', grad)]:.3f}   "
                  f"dense/SORSA = {med[('dense', grad)] / med[('sorsa', grad)]:.2f}")

    if not args.no_svd:
        W = torch.randn(args.dim, args.dim)
        for method, kw in (("full", {}), ("randomized", {"niter": 4, "seed": 0})):
            t0 = time.perf_counter()
            SF.svd_top(W, args.rank, method, **kw)
            print(f"SVD init {method:10s} {time.perf_counter() - t0:7.2f} s" + (" (niter 4)" if kw else ""))


if __name__ == "__main__":
    main()
