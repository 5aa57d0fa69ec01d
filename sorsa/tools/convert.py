"""Checkpoints of the authors' SORSA package (`sorsa==1.0.1`, their repository's `sorsalib/`) as this project's
adapter, so run.py can merge, export, analyse and test them:

    python -m sorsa.convert from-reference REF_DIR --base BASE_DIR --out ADAPTER_DIR

The reference's `SORSAModel.save_pretrained` writes the wrapped model under `model.` and, per adapted layer,
`weight` = W_res, `sorsa_A` (r x in) = Vh_p, `sorsa_S` = S_p and `sorsa_B` (out x r) = U_p, with its config
(rank, alpha, dropout, target_modules) in config.json. Its initialisation keeps S_p = sigma and
W_res = W - scale * U sigma Vh (our alpha_init="reference"), so W - W_res = scale * U_0 diag(S_0) Vh_0 is of rank
r, and its SVD gives the initial factors that this project's adapter file stores. Nothing is unpickled:
safetensors, or torch.load(weights_only=True) for a .bin.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from ..core.options import SORSAConfig
from ..core.fileio import TensorReader, checkpoint_files
from ..core.errors import MissingFileError, UserError

REFERENCE_PREFIX = "model."  # SORSAModel keeps the wrapped model in `self.model`
# The reference's W - W_res must be of rank r: sigma_{r+1} / sigma_r at most this (a W_res rounded to bf16
# leaves ~1e-3; a checkpoint made from another base leaves ~1).
RANK_TOLERANCE = 1e-2


def read_reference(ref_dir: Path) -> tuple[dict, TensorReader | dict[str, torch.Tensor]]:
    """(config.json of a reference checkpoint, its tensors by name: safetensors read one tensor at a time when
    asked for, a pytorch_model.bin loaded whole)."""
    cfg_file = ref_dir / "config.json"
    if not cfg_file.is_file():
        raise MissingFileError(f"{ref_dir} has no config.json: give the directory the reference's "
                                "SORSAModel.save_pretrained wrote")
    config = json.loads(cfg_file.read_text())
    if config.get("model_type") != "sorsa" or "rank" not in config:
        raise UserError(f"{cfg_file} is not a reference SORSA config (model_type={config.get('model_type')!r}); "
                         "give the directory the reference's SORSAModel.save_pretrained wrote")
    if checkpoint_files(ref_dir, "model.safetensors"):
        tensors = TensorReader(ref_dir)  # a 7B checkpoint is not held in memory at once
    else:
        tensors = {}
        for f in checkpoint_files(ref_dir, "pytorch_model.bin"):
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    if not any(k.endswith(".sorsa_A") for k in tensors.keys()):
        raise UserError(f"{ref_dir} holds no sorsa_A / sorsa_S / sorsa_B tensors: not a SORSA checkpoint")
    return config, tensors


def initial_factors(W: torch.Tensor, W_res: torch.Tensor, rank: int, scale: float,
                    layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_0, S_0, Vh_0) with scale * U_0 diag(S_0) Vh_0 = W - W_res (W, W_res: (out, in)); float32.

    W - W_res is of rank r by construction, so a seeded randomized SVD with a few extra columns recovers it
    to float64 precision (float64 throughout). A larger rank means another base model: refused.
    """
    D = W.to(torch.float64) - W_res.to(torch.float64)  # (out, in)
    if rank > min(D.shape):
        raise UserError(f"layer {layer}: rank {rank} is larger than min(out, in) = {min(D.shape)} of its weight "
                         f"{tuple(D.shape)}: the checkpoint does not fit this base model")
    q = min(rank + 8, *D.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(D, q=q, niter=2)  # (out, q), (q,), (in, q)
    if S[rank - 1] <= 0 or (q > rank and S[rank] > RANK_TOLERANCE * S[rank - 1]):
        ratio = (S[rank] / S[rank - 1]).item() if S[rank - 1] > 0 else float("inf")
        raise UserError(f"layer {layer}: W - W_res is not of rank {rank} (sigma_{rank + 1} / sigma_{rank} = "
                         f"{ratio:.3g}): the checkpoint was not made from this base model; pass the --base it was "
                         "trained from")
    return (U[:, :rank].float().contiguous(), (S[:rank] / scale).float().contiguous(),
            V[:, :rank].T.float().contiguous())


def from_reference(ref_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert the reference checkpoint `ref_dir`, trained from the base model `base_dir`, into an adapter
    directory `out_dir` that `sorsa.load_adapter(base, out_dir)` puts onto that base. Nothing is written
    when any layer fails its checks."""
    from ..core.adapter_io import write_adapter

    ref_dir, base_dir, out_dir = Path(ref_dir), Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise UserError(f"{out_dir} exists; choose a new --out directory")
    ref_config, tensors = read_reference(ref_dir)
    base = TensorReader(base_dir)
    rank, alpha = int(ref_config["rank"]), ref_config.get("alpha")
    layers = sorted(k[len(REFERENCE_PREFIX):-len(".sorsa_A")] for k in tensors.keys() if k.endswith(".sorsa_A"))
    scale = 1.0 if alpha is None else float(alpha) / rank
    factors, residual_dtype = {}, None
    for layer in layers:
        key = f"{REFERENCE_PREFIX}{layer}"
        W_res = tensors[f"{key}.weight"]
        residual_dtype = W_res.dtype
        U_0, S_0, Vh_0 = initial_factors(base.get(base.weight_key(layer)), W_res, rank, scale, layer)
        factors.update({f"{layer}.U_0": U_0, f"{layer}.S_0": S_0, f"{layer}.Vh_0": Vh_0,
                        f"{layer}.U_p": tensors[f"{key}.sorsa_B"].float(), f"{layer}.S_p": tensors[f"{key}.sorsa_S"].float(),
                        f"{layer}.Vh_p": tensors[f"{key}.sorsa_A"].float()})
    config = SORSAConfig(rank=rank, alpha=alpha, dropout=float(ref_config.get("dropout", 0.0)), target_modules=layers,
                         residual_dtype=residual_dtype, alpha_init="reference")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(tmp, config, factors, layers, metadata={"base_model": str(base_dir), "converted_from": str(ref_dir)})
    tmp.rename(out_dir)
    return out_dir


def as_run(adapter_dir: Path, run_path: str, name: str) -> Path:
    """Make the converted adapter a finished run RUN_PATH/NAME (its settings from the adapter), so that
    `run.py -n NAME --merge / --test / --analyze / --export-lora` work on it as on a run trained here."""
    from ..core.adapter_io import read_adapter_config
    from ..train.settings import RunConfig
    from ..core.dtypes import precision_name

    config, info = read_adapter_config(adapter_dir)
    precision = precision_name(config.residual_dtype)
    cfg = RunConfig(name=name, run_path=run_path, model=info["base_model"], peft="sorsa", rank=config.rank,
                    alpha=config.alpha, alpha_init=config.alpha_init, dropout=config.dropout,
                    target_modules=list(config.target_modules), mix_precision=[precision])
    run = _check_new_run(run_path, name)
    run.path.mkdir(parents=True)
    shutil.move(str(adapter_dir), run.adapter_dir)
    run.write_records(cfg.to_dict())
    run.mark_done({"steps": None, "converted_from": info.get("converted_from")}, cfg.training_settings())
    return run.path


def _check_new_run(run_path: str, name: str):
    """The RunDir of a new run RUN_PATH/NAME; a ValueError when it exists."""
    from ..train.runs import run_dir

    run = run_dir(run_path, name)
    if run.path.exists():
        raise UserError(f"run {name!r} exists in {run_path}; choose another name")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sorsa.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("from-reference", help="a checkpoint of the authors' SORSA package -> an adapter folder")
    ref.add_argument("ref_dir", help="the directory SORSAModel.save_pretrained wrote")
    ref.add_argument("--base", required=True, help="the base model directory it was trained from (safetensors)")
    ref.add_argument("--out", help="the adapter directory to write (must not exist)")
    ref.add_argument("--as-run", metavar="NAME", help="instead of --out: a finished run RUN_PATH/NAME that "
                     "run.py can merge, export, analyse and test")
    ref.add_argument("--run-path", default="./runs", help="with --as-run (default ./runs)")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.as_run):
        parser.error("give one of --out ADAPTER_DIR or --as-run NAME")
    try:
        if args.as_run:  # before the conversion, which would otherwise be left behind
            _check_new_run(args.run_path, args.as_run)
        out = args.out or Path(args.run_path) / f".{args.as_run}.converting"
        out = from_reference(args.ref_dir, args.base, out)
        if args.as_run:
            out = as_run(out, args.run_path, args.as_run)
    except UserError as err:  # bad input is one line; anything else is a bug with its traceback
        print(f"error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    hint = (f"python run.py -n {args.as_run} --run-path {args.run_path} --merge --test" if args.as_run
            else f"sorsa.load_adapter(base, {str(out)!r})")
    print(f"[convert] wrote {out}; next: {hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
