"""SVD variation analysis of fine-tuned weights (arXiv 2409.00055, its singular values and vectors analysis):
how far training moved each adapted weight's singular values (ΔΣ) and singular vectors (ΔD) away from
the pre-trained weight's, per checkpoint, for SORSA, LoRA, PiSSA and full fine-tuning runs; CSV and plots.
"""
from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from pathlib import Path

import torch

from ..methods import METHODS, get_method, method_label
from ..core.fileio import TensorReader, atomic_write_text
from ..train.runs import RunDir
from ..core.targets import ALL_LINEAR, find_target_modules, is_target, targets_of
from ..core.errors import MissingFileError, UserError

CSV_NAME = "analysis.csv"
PNG_NAME = "analysis.png"
CSV_COLUMNS = ("run", "method", "layer", "step", "delta_sigma", "delta_direction")
METHOD_ORDER = tuple(METHODS)  # the paper's figure order: SORSA, PiSSA, LoRA, full FT


# ----------------------------------------------------------------------------- the measure

def svd_factors(weight: torch.Tensor, device: str | torch.device | None = None):
    """Thin SVD of `weight` (out, in) in float32: U (out, k), S (k,) descending, Vh (k, in), k = min(out, in)."""
    w = weight.detach().to(device=device or weight.device, dtype=torch.float32)
    return torch.linalg.svd(w, full_matrices=False)


def variation_from_factors(ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                           cur: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                           top_k: int | None = None) -> tuple[float, float]:
    """(ΔΣ, ΔD) between two thin SVDs (U: (out, k), S: (k,), Vh: (k, in)), triplets paired by rank.

    ΔΣ = mean_i |σ_t,i − σ_0,i|;  ΔD = 1 − mean_i (|⟨u_t,i, u_0,i⟩| + |⟨v_t,i, v_0,i⟩|) / 2,
    over the first `top_k` triplets (all k when None). The absolute values make ΔD blind to the
    sign an SVD routine picks for a pair (u, v). ΔD is 0 for unchanged directions and at most 1.
    """
    U0, S0, Vh0 = ref
    Ut, St, Vht = cur
    k = S0.shape[0] if top_k is None else min(int(top_k), S0.shape[0])
    if k < 1:
        raise UserError(f"top_k={top_k!r} selects no singular triplet; use None (all) or an integer >= 1")
    d_sigma = (St[:k] - S0[:k]).abs().mean()
    cos_u = (Ut[:, :k] * U0[:, :k]).sum(dim=0).abs()  # (k,) |⟨u_t,i, u_0,i⟩|
    cos_v = (Vht[:k] * Vh0[:k]).sum(dim=1).abs()  # (k,) |⟨v_t,i, v_0,i⟩|
    d_dir = 1.0 - ((cos_u + cos_v) / 2).mean()
    return float(d_sigma), float(d_dir)


def svd_variation(W0: torch.Tensor, Wt: torch.Tensor, top_k: int | None = None) -> tuple[float, float]:
    """(ΔΣ, ΔD) of the weight Wt (out, in) relative to the pre-trained W0 (out, in), both SVD'd in float32.

    All min(out, in) singular triplets count by default; `top_k` restricts the measure to the
    principal ones (the part SORSA and PiSSA train). Where W0 has (nearly) repeated singular
    values the pairing by rank is arbitrary inside the cluster, so ΔD there says little.
    """
    if W0.shape != Wt.shape or W0.dim() != 2:
        raise UserError(f"svd_variation needs two matrices of one shape, got {tuple(W0.shape)} and {tuple(Wt.shape)}")
    return variation_from_factors(svd_factors(W0), svd_factors(Wt), top_k)


# ----------------------------------------------------------------------------- one run

def list_checkpoints(run: RunDir, method: str) -> list[tuple[int, Path]]:
    """(step, directory) of every RUN/checkpoints/checkpoint-N, plus the final adapter (or model) at the
    run's last step when no checkpoint was written there (the completion marker gives the step; a converted
    reference checkpoint, whose step is unknown, counts as one step after the last checkpoint, or step 1)."""
    found = run.checkpoints()
    step = run.read_done().get("steps")
    if not isinstance(step, int):
        step = (found[-1][0] if found else 0) + 1
    final = run.trained_dir(get_method(method))
    if final.is_dir() and run.is_done() and step not in {s for s, _ in found}:
        found.append((step, final))
    return sorted(found)


def _full_ft_layers(base: TensorReader, base_dir: Path, config) -> list[str]:
    """The layers a full fine-tuning run is analysed on: the 2-D weights of the modules that the adapter
    methods would adapt (the run's target_modules, else its architecture's defaults; all-linear: every linear
    layer but the head, found on the model's skeleton as training finds them), so runs compare like for like."""
    from .planner import load_model_config

    model_config, _ = load_model_config(str(base_dir), rwkv=config.rwkv)
    targets = targets_of(config, getattr(model_config, "model_type", None))
    if targets == ALL_LINEAR:
        names = [n for n, _ in find_target_modules(_skeleton(model_config, config), ALL_LINEAR)]
        layers = [n for n in names if f"{n}.weight" in base]
    else:
        layers = [k[:-len(".weight")] for k in base.keys()
                  if k.endswith(".weight") and len(base.shape(k)) == 2 and is_target(k[:-len(".weight")], targets)]
    if not layers:
        raise UserError(f"no weight of {base.path} matches target_modules={targets!r}")
    return layers


def _skeleton(model_config, config) -> torch.nn.Module:
    """The run's model (a causal LM, an RWKV6 or a GLUE classifier) on the meta device: its modules, no weights."""
    from ..train.loading import model_class
    from .planner import meta_model

    if config.rwkv:
        return meta_model(model_config, rwkv=True)
    auto_class, extra = model_class(config)
    with torch.device("meta"):
        return auto_class.from_config(model_config, **extra)


def analyze_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                base_model: str | os.PathLike | None = None, progress: bool = True, top_k: int | None = None,
                device: str | None = None, plot: bool = True) -> list[dict]:
    """The SVD variation analysis of one run: for every adapted weight and every checkpoint,
    (ΔΣ, ΔD) of the merged W_t against the pre-trained W_0 (`svd_variation`).

    Reads RUN/config.yaml (method, base model, targets) and RUN/checkpoints/checkpoint-N (plus the final
    adapter or model when no checkpoint holds the last step). One weight at a time: W_0 is read and
    decomposed once, then each checkpoint's W_t is built and decomposed in float32 (on `device`,
    default CUDA when available), so the peak memory is a few copies of one weight.
    Writes OUT/analysis.csv (columns CSV_COLUMNS, ordered by layer then step) and, with `plot`,
    OUT/analysis.png; OUT defaults to the run directory. Returns the rows.
    """
    from tqdm.auto import tqdm

    from ..train.loading import run_base_model_dir

    run = RunDir(run_dir)
    run_dir = run.path
    config = run.read_run_config()
    method = config.peft
    base_dir = Path(base_model) if base_model is not None else run_base_model_dir(config, run_dir)
    base = TensorReader(base_dir)
    checkpoints = list_checkpoints(run, method)
    if not checkpoints:
        raise MissingFileError(f"{run_dir} has no checkpoints (checkpoints/checkpoint-N) and no finished "
                                "adapter to analyse; train it with --save-steps N first")
    trained = get_method(method)
    # a method without targets (full fine-tuning) is compared on the layers the adapter methods would adapt
    full_layers = _full_ft_layers(base, base_dir, config) if trained.trains_all_weights else None
    opened = [(step, trained.weight_reader(path, run, full_layers)) for step, path in checkpoints]
    layers = opened[0][1].layers
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    rows = []
    bar = tqdm(total=len(layers) * len(opened), desc=f"SVD analysis {run_dir.name}", unit="svd",
               disable=not progress)
    for layer in layers:
        W0 = base.get(base.weight_key(layer)).to(device=device, dtype=torch.float32)  # (out, in)
        ref = svd_factors(W0)
        for step, weights in opened:
            d_sigma, d_dir = variation_from_factors(ref, svd_factors(weights.weight(layer, W0)), top_k)
            rows.append({"run": run_dir.name, "method": method, "layer": layer, "step": step,
                         "delta_sigma": d_sigma, "delta_direction": d_dir})
            bar.update(1)
        del W0, ref
    bar.close()

    out = Path(out_dir) if out_dir is not None else run_dir
    write_csv(rows, out / CSV_NAME)
    if plot:
        plot_analysis([out / CSV_NAME], out / PNG_NAME)
    return rows


# ----------------------------------------------------------------------------- files and plots

def write_csv(rows: list[dict], path: Path) -> Path:
    """Write analysis rows to `path` atomically (a crash never leaves half a table)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in CSV_COLUMNS})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of an analysis.csv with step as int and the measures as float."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["step"] = int(r["step"])
        r["delta_sigma"], r["delta_direction"] = float(r["delta_sigma"]), float(r["delta_direction"])
    return rows


def step_means(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(step, mean ΔΣ, mean ΔD) over the layers, per step, in step order."""
    acc = defaultdict(list)
    for r in rows:
        acc[r["step"]].append((r["delta_sigma"], r["delta_direction"]))
    return [(s, sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for s, v in sorted(acc.items())]


def panel_title(run: str, method: str) -> str:
    label = method_label(method)
    return label if run in ("", label, method) else f"{label} ({run})"


def draw_analysis_panel(ax, rows: list[dict], norm, cmap="viridis", title: str | None = None):
    """One method's panel: a point per layer per step (x = ΔΣ, y = ΔD) coloured by step, and the
    per-step mean as a line from (0, 0), as in the paper's figure. Returns the scatter (for a colorbar)."""
    scatter = ax.scatter([r["delta_sigma"] for r in rows], [r["delta_direction"] for r in rows],
                         c=[r["step"] for r in rows], cmap=cmap, norm=norm, s=10, alpha=0.6, linewidths=0)
    means = step_means(rows)
    ax.plot([0.0] + [m[1] for m in means], [0.0] + [m[2] for m in means], "-o", color="crimson", lw=1.5, ms=3,
            label="mean over layers")
    ax.set_xlabel("ΔΣ (mean |σ_t − σ_0|)")
    ax.set_ylabel("ΔD (1 − mean |cos| of u, v)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return scatter


def plot_analysis(csv_paths: list[str | os.PathLike], out_png: str | os.PathLike) -> Path:
    """Side-by-side panels, one per (run, method) found in the CSVs, on shared axes and one step colour
    scale, ordered SORSA, PiSSA, LoRA, full FT (then by run name). Writes and returns `out_png`."""
    from .plotting import pyplot

    plt = pyplot()
    from matplotlib.colors import Normalize

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in csv_paths:
        for r in read_csv(path):
            groups[(r["run"], r["method"])].append(r)
    if not groups:
        raise UserError(f"no analysis rows in {[str(p) for p in csv_paths]}")
    order = sorted(groups, key=lambda k: (METHOD_ORDER.index(k[1]) if k[1] in METHOD_ORDER else 99, k[0]))
    steps = [r["step"] for rows in groups.values() for r in rows]
    norm = Normalize(vmin=0, vmax=max(steps))
    fig, axes = plt.subplots(1, len(order), figsize=(4.2 * len(order) + 1, 3.8), sharex=True, sharey=True,
                             squeeze=False)
    scatter = None
    for ax, key in zip(axes[0], order):
        scatter = draw_analysis_panel(ax, groups[key], norm, title=panel_title(*key))
    for ax in axes[0][1:]:
        ax.set_ylabel("")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.colorbar(scatter, ax=axes[0].tolist(), label="step", fraction=0.03, pad=0.02)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_png


def analyze_main(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None,
                 base_model: str | os.PathLike | None = None, top_k: int | None = None,
                 progress: bool = True) -> list[Path]:
    """The CLI's analysis job. Each run gets RUN/analysis.csv and RUN/analysis.png; with `out_dir`,
    OUT/analysis.csv (all runs' rows) and OUT/analysis.png (the runs side by side, shared axes) are
    written too. Returns the written files."""
    written: list[Path] = []
    all_rows: list[dict] = []
    for run_dir in map(Path, run_dirs):
        all_rows += analyze_run(run_dir, base_model=base_model, progress=progress, top_k=top_k)
        written += [run_dir / CSV_NAME, run_dir / PNG_NAME]
    if out_dir is not None:
        out_dir = Path(out_dir)
        written.append(write_csv(all_rows, out_dir / CSV_NAME))
        written.append(plot_analysis([out_dir / CSV_NAME], out_dir / PNG_NAME))
    return written


def analyze(cfg, names: list[str], out: str | None = None, top_k: int | None = None) -> list[Path]:
    """run.py --analyze: the analysis of the runs named (cfg: the RunConfig of the call, for --name and
    --run-path); several runs also side by side in `out`."""
    from ..train.runs import find_runs

    runs = find_runs(names, cfg)
    files = analyze_main([r.path for r in runs], out_dir=out if len(runs) > 1 else None, top_k=top_k)
    print("[run] analysis written: " + ", ".join(map(str, files)))
    return files
