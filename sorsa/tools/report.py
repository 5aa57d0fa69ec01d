"""The results table of a set of runs next to the paper's published numbers (sorsa/paper_results.csv),
and their training curves (loss, gradient norm, orthonormal loss per step) on shared axes.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

from ..eval import measurement
from ..methods import get_method, method_label
from ..core.fileio import atomic_write_text
from ..train.runs import RunDir
from ..core.errors import UserError

PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
BENCHMARKS = (("gsm8k", "gsm-8k", "GSM-8K"), ("math", "math", "MATH"), ("humaneval", "humaneval", "HumanEval"))
# A run's model id (hub id or local directory, matched on its last path component) -> the paper's model.
MODEL_PATTERNS = ((r"llama-?2-7b", "Llama 2 7B"), (r"mistral-7b-v0\.1", "Mistral 7B v0.1"),
                  (r"gemma-7b", "Gemma 7B"), (r"(rwkv|finch).*7b|7b.*(rwkv|finch)", "RWKV6 7B"),
                  (r"llama-?3-70b", "LLaMA 3 70B"), (r"llama-?3\.2-3b", "Llama 3.2 3B"))
# The GLUE table (sequence-classification runs): task folder, column title, the results.json keys shown (in %).
# Headline metrics as the LoRA paper and PiSSA report them; MRPC and QQP also F1, STS-B also Spearman.
GLUE_TABLE = (("glue-mnli", "MNLI-m", ("score",)), ("glue-mnli-mm", "MNLI-mm", ("score",)),
              ("glue-sst2", "SST-2", ("score",)), ("glue-mrpc", "MRPC acc/F1", ("accuracy", "f1")),
              ("glue-cola", "CoLA MCC", ("score",)), ("glue-qnli", "QNLI", ("score",)),
              ("glue-qqp", "QQP acc/F1", ("accuracy", "f1")), ("glue-rte", "RTE", ("score",)),
              ("glue-stsb", "STS-B Pearson/Spearman", ("pearson", "spearman")))
REPORT_COLUMNS = (["run", "model", "method", "rank", "trainable_params", "paper_model", "paper_trainable_params"]
                  + [f"{c}{s}" for key, _, _ in BENCHMARKS for c, s in ((key, ""), (key, "_paper"), (key, "_diff"))]
                  + ["paper_source"])


# ----------------------------------------------------------------------------- the paper's table

def parse_params(text: str | None) -> int | None:
    """'320M' -> 320_000_000, '6.7B' -> 6_700_000_000, '' -> None."""
    if not text:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMB]?)\s*", str(text), flags=re.I)
    if not m:
        raise UserError(f"trainable_params {text!r} is not a count like '320M'")
    return round(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2).upper()])


def load_paper_results(path: str | os.PathLike = PAPER_RESULTS) -> list[dict]:
    """Rows of the paper's table: model, method, trainable_params (int or None), gsm8k/math/humaneval
    (float % or None), source."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["trainable_params"] = parse_params(r["trainable_params"])
        for key, _, _ in BENCHMARKS:
            r[key] = float(r[key]) if r[key] else None
    return rows


def paper_model_name(model_id: str, rwkv: bool = False) -> str | None:
    """The paper's model name for a run's model id, e.g. meta-llama/Llama-2-7b-hf -> 'Llama 2 7B'."""
    last = Path(str(model_id).rstrip("/")).name.lower()
    for pattern, name in MODEL_PATTERNS:
        if re.search(pattern, last) and (name != "RWKV6 7B" or rwkv or "rwkv" in last or "finch" in last):
            return name
    return None


def find_paper_row(paper: list[dict], model_id: str, method: str, rwkv: bool = False,
                   quantize: str | None = None) -> dict | None:
    """The paper's row for a run's model id and peft method, or None when the paper has no such cell."""
    name = paper_model_name(model_id, rwkv)
    label = method_label(method, quantize)
    return next((r for r in paper if r["model"] == name and r["method"] == label), None)


# ----------------------------------------------------------------------------- one run

def _safetensors_numel(path: Path, keep=lambda key: True) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            if keep(key):
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def count_trainable_params(run_dir: Path, method: str) -> int | None:
    """Trainable parameters of a run: the completion marker's "trainable_params" when recorded, else counted from
    its saved tensors (the method's `trainable_files`: SORSA's U_p, S_p, Vh_p; LoRA's lora_A, lora_B; PiSSA's rank-r
    initial adapter, since the saved one is converted to rank 2r; full FT: every tensor of the model)."""
    run = RunDir(run_dir)
    recorded = run.read_done().get("trainable_params")
    if isinstance(recorded, int):
        return recorded
    found = [(p, keep) for p, keep in get_method(method).trainable_files(run) if p.is_file()]
    if not found:
        return None
    return sum(_safetensors_numel(p, keep) for p, keep in found)


def measurements(run_dir: Path) -> list[dict]:
    """Every scored measurement of a run (RUN/eval/*/results.json) as {"eval_dir", "dataset", "test_file",
    "limit", "accuracy" (in %), "total"}."""
    rows = []
    for r in RunDir(run_dir).eval_results():
        rows.append({"eval_dir": r["eval_dir"], "dataset": r.get("dataset", r["eval_dir"]),
                     "test_file": r.get("test_file"), "limit": r.get("limit"),
                     "accuracy": 100.0 * float(r["accuracy"]), "total": r.get("total")})
    return rows


def read_accuracy(run_dir: Path, dataset: str) -> float | None:
    """Accuracy in % of the run on `dataset`: its measurement on the benchmark's own whole test set (no test file,
    no limit) when there is one, else its first measurement (RUN/eval/<dataset>/); None when the run was not
    tested on it. Every measurement (other test files, an experiment's validation rows) is in `measurements`."""
    shown = pick_measurement(measurements(run_dir), dataset)
    return None if shown is None else shown["accuracy"]


def pick_measurement(found: list[dict], dataset: str) -> dict | None:
    """Of a run's measurements, the one of `dataset` that a table shows (sorsa.eval.measurement.pick)."""
    return measurement.pick(found, dataset)


def run_row(run_dir: str | os.PathLike, paper: list[dict] | None = None) -> dict:
    """One report row (REPORT_COLUMNS) for a run directory."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    method = cfg.get("peft", "sorsa")
    paper_row = find_paper_row(load_paper_results() if paper is None else paper, cfg.get("model", ""), method,
                               bool(cfg.get("rwkv")), cfg.get("quantize"))
    row = {"run": run.name, "model": cfg.get("model"), "method": method_label(method, cfg.get("quantize")),
           "rank": None if get_method(method).trains_all_weights else cfg.get("rank"),
           "trainable_params": count_trainable_params(run.path, method),
           "paper_model": paper_row["model"] if paper_row else None,
           "paper_trainable_params": paper_row["trainable_params"] if paper_row else None,
           "paper_source": paper_row["source"] if paper_row else None}
    for key, dataset, _ in BENCHMARKS:
        ours = read_accuracy(run.path, dataset)
        theirs = paper_row[key] if paper_row else None
        row[key], row[f"{key}_paper"] = ours, theirs
        row[f"{key}_diff"] = None if ours is None or theirs is None else ours - theirs
    return row


# ----------------------------------------------------------------------------- table files

def format_params(n: int | None) -> str:
    if n is None:
        return "–"
    if n >= 1e8:
        return f"{n / 1e6:.0f}M"
    if n >= 1e5:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K"


def _num(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")


def markdown_table(rows: list[dict]) -> str:
    """The report table in Markdown: our accuracy, the paper's, and ours − paper, per benchmark."""
    head = ["Run", "Model", "Method", "Rank", "Trainable params (paper)"]
    for _, _, label in BENCHMARKS:
        head += [label, "paper", "Δ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = format_params(r["trainable_params"])
        if r["paper_trainable_params"] is not None:
            params += f" ({format_params(r['paper_trainable_params'])})"
        cells = [r["run"], str(r["model"]), r["method"], "–" if r["rank"] is None else str(r["rank"]), params]
        for key, _, _ in BENCHMARKS:
            cells += [_num(r[key]), _num(r[f"{key}_paper"]), _num(r[f"{key}_diff"], signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measurements_table(run_dirs: list[str | os.PathLike]) -> str:
    """Every measurement of every run (one line per RUN/eval/<folder>/), so scores on other test files of a
    benchmark are shown too; empty when no run was scored."""
    lines = []
    for d in run_dirs:
        for m in measurements(Path(d)):
            lines.append(f"| {Path(d).name} | {m['dataset']} | eval/{m['eval_dir']} | {m['test_file'] or 'hub'} "
                         f"| {'–' if m['total'] is None else m['total']} | {m['accuracy']:.2f} |")
    if not lines:
        return ""
    head = "| Run | Benchmark | Folder | Test file | Scored | Accuracy % |\n|---|---|---|---|---|---|\n"
    return "\n## Every measurement\n\n" + head + "\n".join(lines) + "\n"


def glue_table(run_dirs: list[str | os.PathLike]) -> str:
    """The GLUE scores (validation split, in %) of every run scored on a GLUE task, one line per run, each task's
    measurement chosen as for the other tables (`pick_measurement`); empty when no run was scored on one."""
    lines = []
    for d in run_dirs:
        run = RunDir(d)
        measured = run.eval_results()
        results = {task: pick_measurement(measured, task) for task, _, _ in GLUE_TABLE}
        if not any(results.values()):
            continue
        cfg = run.read_config()
        cells = [run.name, str(cfg.get("model")), method_label(cfg.get("peft", "sorsa"), cfg.get("quantize"))]
        for task, _, keys in GLUE_TABLE:
            r = results.get(task)
            cells.append("–" if r is None else "/".join(_num(None if r.get(k) is None else 100.0 * r[k]) for k in keys))
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = ["Run", "Model", "Method"] + [title for _, title, _ in GLUE_TABLE]
    return ("\n## GLUE (validation split)\n\nGLUE's test labels are hidden, so every task is scored on its validation "
            "split (MNLI: matched and mismatched); MCC = Matthews correlation.\n\n"
            + "| " + " | ".join(head) + " |\n" + "|" + "---|" * len(head) + "\n" + "\n".join(lines) + "\n")


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in REPORT_COLUMNS})
    return buf.getvalue()


# ----------------------------------------------------------------------------- training curves

CURVES = (("loss", "training loss", "linear"), ("grad_norm", "gradient norm (before clipping)", "log"),
          ("ortho_loss", "orthonormal loss L_o", "log"))


def plot_training_curves(run_dirs: list[str | os.PathLike], out_png: str | os.PathLike,
                         labels: list[str] | None = None) -> Path:
    """Training loss, gradient norm and orthonormal loss per step, one line per run, shared step axis."""
    from .plotting import pyplot

    plt = pyplot()
    logs = [RunDir(d).read_train_log() for d in run_dirs]
    labels = labels or [Path(d).name for d in run_dirs]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8), sharex=True)
    for ax, (key, title, scale) in zip(axes, CURVES):
        drawn = False
        for i, (log, label) in enumerate(zip(logs, labels)):
            pts = [(r["step"], r[key]) for r in log if r.get(key) is not None]
            if pts:  # one colour per run in every panel, also where some runs have no such curve
                ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1.2, color=f"C{i % 10}", label=label)
                drawn = True
        if drawn and scale == "log" and all(v > 0 for log in logs for v in (r.get(key) for r in log) if v is not None):
            ax.set_yscale("log")
        if not drawn:
            ax.text(0.5, 0.5, f"no run logged {key}", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, names, fontsize=8)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- entry points

def build_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike,
                 paper_results: str | os.PathLike = PAPER_RESULTS, plot: bool = True) -> dict:
    """Write OUT/report.md, OUT/report.csv and (with `plot`) OUT/training_curves.png for `run_dirs`.

    Returns {"rows": [...], "markdown": str, "files": [paths]}. Accuracies are in %, the differences
    are ours − paper in percentage points; a cell the paper does not have is empty.
    """
    if not run_dirs:
        raise UserError("build_report needs at least one run directory")
    paper = load_paper_results(paper_results)
    rows = [run_row(d, paper) for d in run_dirs]
    out_dir = Path(out_dir)
    markdown = ("# Results\n\nAccuracy % (GSM-8K, MATH) and pass@1 % (HumanEval); `paper` is the published "
                f"number ({Path(paper_results).name}, sources in its `source` column), Δ = ours − paper.\n\n"
                + markdown_table(rows) + glue_table(run_dirs) + measurements_table(run_dirs))
    atomic_write_text(out_dir / "report.md", markdown)
    atomic_write_text(out_dir / "report.csv", csv_text(rows))
    files = [out_dir / "report.md", out_dir / "report.csv"]
    if plot:
        files.append(plot_training_curves(run_dirs, out_dir / "training_curves.png"))
    return {"rows": rows, "markdown": markdown, "files": files}


def report_main(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> list[Path]:
    """The CLI's report job; `out_dir` defaults to RUN_PATH/report beside the first run. Returns the files."""
    if out_dir is None:
        out_dir = Path(run_dirs[0]).parent / "report"
    return build_report(run_dirs, out_dir)["files"]


def report_runs(cfg, names: list[str], out: str | None = None) -> list[Path]:
    """run.py --report: the results table and training curves of the runs named (cfg: the RunConfig of the call,
    for --name and --run-path), into `out` (default RUN_PATH/report)."""
    from ..train.runs import find_runs

    files = report_main([r.path for r in find_runs(names, cfg)], out or Path(cfg.run_path) / "report")
    print("[run] report written: " + ", ".join(map(str, files)))
    return files
