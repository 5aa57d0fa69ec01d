"""The experiment's report in its folder: report.md; report.csv (one row per arm and test: the selected setting,
test accuracy mean and confidence interval over seeds, trainable parameters, training time); selection.csv,
comparisons.csv (paired tests between arms on the same items) and forgetting.csv; and the figures (figures.py).
"""
from __future__ import annotations

import csv
import io
import itertools
import os
import platform
import statistics
from pathlib import Path

from ..core.fileio import atomic_write_text
from ..core.records import package_versions
from ..tools.stats import holm, mcnemar_exact, mean_ci, paired_bootstrap
from .results import collect
from .spec import Experiment, combo_text, show

REPORT_MD, REPORT_CSV = "report.md", "report.csv"
SELECTION_CSV, COMPARISONS_CSV, FORGETTING_CSV = "selection.csv", "comparisons.csv", "forgetting.csv"
TEXT_FORGETTING_CSV = "forgetting_text.csv"


# ----------------------------------------------------------------------------- the numbers

def summarize(exp: Experiment, data: dict) -> list[dict]:
    """One row per arm and test: test accuracy (%) over the seeds with its Student-t interval, and the arm's
    selected setting, trainable parameters, mean training time and mean training loss over all steps."""
    confidence = exp.stats["confidence"]
    rows = []
    for arm, runs in data["arms"].items():
        trained = [r for r in runs if "summary" in r]
        mean_losses = [sum(r["losses"].values()) / len(r["losses"]) for r in trained if r["losses"]]
        seconds = [r["train_seconds"] for r in trained if r["train_seconds"] is not None]
        loss_ci = mean_ci(mean_losses, confidence) if mean_losses else None
        shared = {"arm": arm.label, "method": arm.method, "fixed": combo_text(arm.fixed),
                  "selected": combo_text(data["choices"][arm]),
                  "trainable_params": trained[0]["summary"].get("trainable_params") if trained else None,
                  "train_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
                  **{f"{k}_mean": _mean([r["summary"].get(k) for r in trained]) for k in EFFICIENCY},
                  "mean_train_loss": loss_ci["mean"] if loss_ci else None,
                  "mean_train_loss_half_width": loss_ci["half_width"] if loss_ci else None}
        for test in exp.tests:
            scored = [(r["seed"], r["tests"][test.name]) for r in runs if test.name in r["tests"]]
            ci = mean_ci([m["accuracy"] for _, m in scored], confidence) if scored else None
            rows.append({**shared, "test": test.name, "dataset": test.dataset,
                         "items": scored[0][1]["total"] if scored else None,
                         "seeds": ";".join(str(s) for s, _ in scored), "n_seeds": len(scored),
                         "accuracy_mean": ci and ci["mean"], "ci_low": ci and ci["low"], "ci_high": ci and ci["high"],
                         "ci_half_width": ci and ci["half_width"], "sd": ci and ci["sd"],
                         "accuracy_per_seed": ";".join(f"{m['accuracy']:.4f}" for _, m in scored)})
    return rows


EFFICIENCY = ("peak_memory_mib", "tokens_per_second", "saved_bytes")  # PEFT's columns, from the completion marker


def _mean(values: list) -> float | None:
    """The mean of the recorded values (None when a run did not record one: trained before it was recorded)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _paired(runs_a: list[dict], runs_b: list[dict], test: str) -> tuple[list, list, list]:
    """(seeds, a, b): the per-item verdicts of both arms on the seeds and items both were scored on,
    a[s][i] and b[s][i] from the same seed s and item i."""
    va = {r["seed"]: r["tests"][test]["verdicts"] for r in runs_a if test in r["tests"]}
    vb = {r["seed"]: r["tests"][test]["verdicts"] for r in runs_b if test in r["tests"]}
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return [], [], []
    items = sorted(set.intersection(*(set(va[s]) & set(vb[s]) for s in seeds)),
                   key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))
    return seeds, [[va[s][i] for i in items] for s in seeds], [[vb[s][i] for i in items] for s in seeds]


def compare(exp: Experiment, data: dict) -> list[dict]:
    """Every pair of arms on every test: the mean difference in points, its paired-bootstrap interval and
    p-value (items and seeds resampled), McNemar's exact p, and Holm's correction over all the rows."""
    rows = []
    arms = list(data["arms"])
    for test, (a, b) in itertools.product(exp.tests, itertools.combinations(arms, 2)):
        seeds, va, vb = _paired(data["arms"][a], data["arms"][b], test.name)
        if not seeds or not va[0]:
            continue
        boot = paired_bootstrap(va, vb, samples=int(exp.stats["bootstrap"]), seed=int(exp.stats["seed"]),
                                confidence=exp.stats["confidence"])
        mc = mcnemar_exact(va, vb)
        rows.append({"test": test.name, "a": a.label, "b": b.label, "seeds": ";".join(map(str, seeds)),
                     "items": len(va[0]), "diff": 100 * boot["diff"], "ci_low": 100 * boot["low"],
                     "ci_high": 100 * boot["high"], "p_bootstrap": boot["p"], "a_only": mc["a_only"],
                     "b_only": mc["b_only"], "p_mcnemar": mc["p"]})
    for row, adjusted in zip(rows, holm([r["p_bootstrap"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def forgetting(exp: Experiment, data: dict, summary: list[dict]) -> list[dict]:
    """The forgetting matrix: one row per base model (as it is) and per arm (trained on its data), one column per
    test, mean accuracy (%) over the seeds."""
    rows = []
    for model, outcome in data["base"].items():
        rows.append({"row": f"base model ({show(model)})", "trained_on": "–",
                     **{t.name: outcome["tests"].get(t.name, {}).get("accuracy") for t in exp.tests}})
    for arm in data["arms"]:
        cfg = exp.spec(arm, data["choices"][arm], exp.seeds[0]).config
        cells = {r["test"]: r["accuracy_mean"] for r in summary if r["arm"] == arm.label}
        rows.append({"row": arm.label, "trained_on": show(cfg.train_file or cfg.train_dataset), **cells})
    return rows


def text_forgetting(exp: Experiment, data: dict) -> list[dict]:
    """Forgetting as PEFT measures it: per base model its cross-entropy on the general-text sample, per arm the
    mean over seeds and the increase over its base model with a Student-t interval (empty without `forgetting`)."""
    if exp.forgetting is None:
        return []
    confidence = exp.stats["confidence"]
    rows = [{"row": f"base model ({show(model)})", "cross_entropy": outcome.get("text_ce"), "n_seeds": None,
             "increase": None, "ci_low": None, "ci_high": None} for model, outcome in data["base"].items()]
    for arm, runs in data["arms"].items():
        base = data["base"][exp.spec(arm, data["choices"][arm], exp.seeds[0]).config.model].get("text_ce")
        values = [r["text_ce"] for r in runs if r.get("text_ce") is not None]
        ci = mean_ci([v - base for v in values], confidence) if values and base is not None else None
        rows.append({"row": arm.label, "cross_entropy": statistics.fmean(values) if values else None,
                     "n_seeds": len(values), "increase": ci and ci["mean"], "ci_low": ci and ci["low"],
                     "ci_high": ci and ci["high"]})
    return rows


# ----------------------------------------------------------------------------- files

def _csv(rows: list[dict], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    columns = columns or (list(rows[0]) if rows else [])
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    return buf.getvalue()


def _selection_rows(data: dict) -> list[dict]:
    return [{"arm": r["arm"].label, "setting": combo_text(r["combo"]), "seed": r["seed"], "run": r["run"],
             "value": r["value"], "used_for_selection": r["selection"],
             "chosen": r["combo"] == data["choices"].get(r["arm"])} for r in data["selection"]]


def write_report(exp: Experiment, choices: dict, outcomes: list, wall_seconds: float) -> list[Path]:
    """Write the report files into the experiment folder; returns their paths."""
    from .figures import draw_figures
    from .markdown import render

    data = collect(exp, choices)
    summary = summarize(exp, data)
    comparisons = compare(exp, data)
    matrix = forgetting(exp, data, summary)
    text_rows = text_forgetting(exp, data)
    folder = exp.folder
    tables = {REPORT_CSV: summary, SELECTION_CSV: _selection_rows(data), COMPARISONS_CSV: comparisons,
              FORGETTING_CSV: matrix, **({TEXT_FORGETTING_CSV: text_rows} if text_rows else {})}
    for name, rows in tables.items():
        atomic_write_text(folder / name, _csv(rows))
    figures = draw_figures(exp, data, summary, matrix, folder)
    context = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores" + _gpu_text(),
               "versions": package_versions(), "wall_seconds": wall_seconds,
               "trained": sum(o.trained for o in outcomes), "failed": [o for o in outcomes if not o.ok]}
    atomic_write_text(folder / REPORT_MD, render(exp, data, summary, comparisons, matrix, figures, context,
                                                 text_rows))
    return [folder / REPORT_MD, *(folder / n for n in tables), *figures.values()]


def _gpu_text() -> str:
    import torch

    if not torch.cuda.is_available():
        return ", no GPU"
    return f", {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"

