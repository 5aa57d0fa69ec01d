"""The quantization error at initialisation, measured as PiSSA's paper does (arXiv 2404.02948, Sec. 4.3): the
nuclear norm ‖W − (deq(W_q) + adapter)‖_* per layer and in total, for QLoRA (‖W − deq(Q(W))‖_*, its adapter
starts at zero) and for QPiSSA / QSORSA with T = 1 and T rounds of the alternating initialisation (the two
methods split the same way when alpha is unset), and the reduction against QLoRA; a table and a bar chart.

    python -m sorsa.tools.quant_error --model DIR -r 128 --quantize nf4 --quant-iters 5 --out OUT
    python -m sorsa.tools.quant_error --synthetic 4096x4096 11008x4096 -r 128 --quantize nf4 --out OUT
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

import torch

from ..core import functional as SF
from ..core.fileio import atomic_write_text
from ..core.quant import QUANT_TYPES, QuantSpec, quantizer
from ..core.errors import UserError


def nuclear_norm(E: torch.Tensor) -> float:
    """‖E‖_*: the sum of the singular values (float32 SVD values summed in float64)."""
    return torch.linalg.svdvals(E.to(torch.float32)).double().sum().item()


def layer_errors(W: torch.Tensor, rank: int, spec: QuantSpec, iters: int, svd: str = "full") -> dict[str, float]:
    """{"qlora", "t1", "tN"}: ‖W − (deq(W_q) + adapter)‖_* of one weight (out, in) under each initialisation."""
    Q, deq = quantizer(spec)
    W = W.to(torch.float32)
    errors = {"qlora": nuclear_norm(W - deq(Q(W)))}
    rounds: list = []  # T = 1 is the first round of T = iters: one run of the rounds gives both
    SF.quantized_split(W, rank, Q, deq, iters, method=svd, rounds=rounds)
    for key, (U, S, Vh) in (("t1", rounds[0]), ("tN", rounds[-1])):
        approx = deq(Q(SF.split_weight(W, U, S, Vh, 1.0, torch.float32))) + SF.adapter_delta(U, S, Vh)
        errors[key] = nuclear_norm(W - approx)
    return errors


def model_weights(model_dir: str, targets):
    """(layer name, float32 weight) of every target linear layer of a safetensors checkpoint, one at a time;
    the targets (none: the architecture's defaults; all-linear) matched on the model's meta skeleton, as
    training matches them."""
    from ..core.fileio import TensorReader
    from .planner import load_model_config, meta_model
    from ..core.targets import ALL_LINEAR, default_targets, find_target_modules

    config, _ = load_model_config(model_dir)
    if targets == [ALL_LINEAR]:
        targets = ALL_LINEAR
    targets = targets or default_targets(getattr(config, "model_type", None))
    reader = TensorReader(model_dir)
    for name, _ in find_target_modules(meta_model(config), targets):
        yield name, reader.get(reader.weight_key(name)).to(torch.float32)


def synthetic_weights(shapes: list[str]):
    from .synthetic import llm_like_weight

    for i, shape in enumerate(shapes):
        out_f, in_f = map(int, shape.lower().split("x"))
        yield f"synthetic{i}_{out_f}x{in_f}", llm_like_weight(out_f, in_f, seed=i)


def measure(weights, rank: int, spec: QuantSpec, iters: int, svd: str = "full", progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []  # the weights arrive one at a time (a generator): one float32 weight in memory at once
    for name, W in tqdm(weights, desc="quantization error", unit="layer", disable=not progress):
        rows.append({"layer": name, **layer_errors(W, rank, spec, iters, svd)})
    if not rows:
        raise UserError("no weight to measure: the target modules matched no 2-D weight of the checkpoint")
    return rows


def summary(rows: list[dict]) -> dict[str, float]:
    total = {k: sum(r[k] for r in rows) for k in ("qlora", "t1", "tN")}
    return {**total, "reduction_t1": 1 - total["t1"] / total["qlora"], "reduction_tN": 1 - total["tN"] / total["qlora"]}


def markdown(rows: list[dict], iters: int, spec: QuantSpec, rank: int) -> str:
    """Per layer type (the last part of the name, averaged over blocks) and in total."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["layer"].rsplit(".", 1)[-1]].append(r)
    head = (f"Nuclear-norm error ‖W − (deq(W_q) + adapter)‖_* at initialisation, {spec.quant_type}, blocksize "
            f"{spec.blocksize}, rank {rank}; QPiSSA = QSORSA (alpha unset).\n\n"
            f"| layers | n | QLoRA | QPiSSA/QSORSA T=1 | T={iters} | reduction T=1 | reduction T={iters} |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for kind, members in list(groups.items()) + [("**total**", rows)]:
        s = summary(members)
        lines.append(f"| {kind} | {len(members)} | {s['qlora']:.1f} | {s['t1']:.1f} | {s['tN']:.1f} | "
                     f"{100 * s['reduction_t1']:.1f} % | {100 * s['reduction_tN']:.1f} % |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], out_png: Path, iters: int) -> Path:
    from .plotting import pyplot

    plt = pyplot()
    groups = defaultdict(list)
    for r in rows:
        groups[r["layer"].rsplit(".", 1)[-1]].append(r)
    kinds = list(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(kinds) + 2), 3.6))
    width = 0.26
    for j, (key, label) in enumerate((("qlora", "QLoRA"), ("t1", "QPiSSA/QSORSA T=1"), ("tN", f"T={iters}"))):
        means = [sum(r[key] for r in groups[k]) / len(groups[k]) for k in kinds]
        ax.bar([i + (j - 1) * width for i in range(len(kinds))], means, width, label=label)
    ax.set_xticks(range(len(kinds)), kinds, rotation=20)
    ax.set_ylabel("‖W − (deq(W_q) + adapter)‖_* (mean per layer)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sorsa.tools.quant_error", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local safetensors model directory")
    source.add_argument("--synthetic", nargs="+", metavar="OUTxIN", help="LLM-like synthetic matrices of these shapes")
    p.add_argument("-r", "--rank", type=int, default=128)
    p.add_argument("--quantize", choices=QUANT_TYPES, default="nf4")
    p.add_argument("--quant-iters", type=int, default=5, help="T of the alternating initialisation (PiSSA: 5)")
    p.add_argument("--quant-blocksize", type=int, default=64)
    p.add_argument("--target-modules", nargs="+", help="default: the architecture's (sorsa/core/targets.py)")
    p.add_argument("--svd", default="full", choices=SF.SVD_METHODS)
    p.add_argument("--out", help="write quant_error.md, quant_error.csv and quant_error.png here")
    args = p.parse_args(argv)
    try:
        spec = QuantSpec(args.quantize, args.quant_blocksize, compute_dtype=torch.float32)
        weights = (synthetic_weights(args.synthetic) if args.synthetic
                   else model_weights(args.model, args.target_modules))
        rows = measure(weights, args.rank, spec, args.quant_iters, args.svd)
    except UserError as err:  # bad input is one line; anything else is a bug with its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = markdown(rows, args.quant_iters, spec, args.rank)
    print(text)
    if args.out:
        out = Path(args.out)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["layer", "qlora", "t1", "tN"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / "quant_error.csv", buffer.getvalue())
        atomic_write_text(out / "quant_error.md", text)
        plot(rows, out / "quant_error.png", args.quant_iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
