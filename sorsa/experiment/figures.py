"""The experiment's figures: validation metric per tuned setting (learning-rate sensitivity) with seed bands,
training curves with seed bands, test accuracy with confidence intervals, and the forgetting matrix; each as its
own PNG and all four in summary.png.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..methods import METHODS
from .results import selection_values
from .spec import Experiment, combo_text

FILES = {"selection": "lr_sensitivity.png", "curves": "training_curves.png", "accuracy": "accuracy.png",
         "forgetting": "forgetting.png", "summary": "summary.png"}


def arm_colors(arms) -> dict:
    """One colour per arm: the method's when each method has one arm, else the default cycle."""
    arms = list(arms)
    if len({a.method for a in arms}) == len(arms):
        return {a: METHODS[a.method].color if a.method in METHODS else f"C{i}" for i, a in enumerate(arms)}
    return {a: f"C{i % 10}" for i, a in enumerate(arms)}


def _nothing(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def draw_selection(ax, exp: Experiment, data: dict) -> None:
    """Validation metric against the tuned setting, one line per arm (mean over the selection seeds, band:
    min–max over them); the chosen setting circled. A single positive numeric key goes on a log axis."""
    colors = arm_colors(exp.arms)
    numeric = len(exp.tuned_keys) == 1 and all(isinstance(v, (int, float)) and v > 0
                                               for a in exp.arms for ((_, v),) in a.combos)
    # a shared axis for settings that are not one number: every arm's settings, in order (per-method grids differ)
    combos = list(dict.fromkeys(c for a in exp.arms for c in a.combos))
    drawn = False
    for arm in exp.arms:
        points = []
        for combo in arm.combos:
            vals = selection_values(data["selection"], arm, combo)
            if vals:
                x = combo[0][1] if numeric else combos.index(combo)
                points.append((x, sum(vals) / len(vals), min(vals), max(vals), combo))
        if not points:
            continue
        points.sort(key=lambda p: p[0])  # a grid listed out of order still draws as a line from left to right
        xs, means = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, means, "-o", ms=4, color=colors[arm], label=arm.label)
        ax.fill_between(xs, [p[2] for p in points], [p[3] for p in points], color=colors[arm], alpha=0.18, lw=0)
        chosen = [p for p in points if p[4] == data["choices"].get(arm)]
        ax.scatter([p[0] for p in chosen], [p[1] for p in chosen], s=110, facecolors="none", edgecolors="k", zorder=3)
        drawn = True
    if not drawn:
        _nothing(ax, "no validation results")
    if numeric:
        ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(combos)), [combo_text(c) for c in combos], rotation=30, fontsize=7)
    ax.set_xlabel(exp.tuned_keys[0] if numeric else "setting")
    ax.set_ylabel(f"validation {exp.metric}")
    ax.set_title(f"(a) selection: {exp.metric} vs {', '.join(exp.tuned_keys)}\n(band: seeds min–max; circle: chosen)")


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def draw_curves(ax, exp: Experiment, data: dict) -> None:
    """Training loss per step of each arm's final runs: moving-average mean over seeds, band min–max."""
    colors = arm_colors(exp.arms)
    drawn = False
    for arm, runs in data["arms"].items():
        logs = [r["losses"] for r in runs if r.get("losses")]
        if not logs:
            continue
        steps = sorted(set.intersection(*(set(log) for log in logs)))
        window = max(1, len(steps) // 25)
        per_seed = [_smooth([log[s] for s in steps], window) for log in logs]
        columns = list(zip(*per_seed))
        ax.plot(steps, [sum(c) / len(c) for c in columns], color=colors[arm], lw=1.3,
                label=f"{arm.label} ({combo_text(data['choices'][arm])})")
        ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=colors[arm], alpha=0.18,
                        lw=0)
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        _nothing(ax, "no training logs")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("(b) training curves of the selected settings\n(mean over seeds; band: min–max)")


def draw_accuracy(ax, exp: Experiment, data: dict, summary: list[dict]) -> None:
    """Test accuracy per test (groups) and arm (bars): mean, confidence interval, one dot per seed."""
    arms = list(data["arms"])
    colors = arm_colors(exp.arms)
    width = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        for i, test in enumerate(exp.tests):
            row = next((r for r in summary if r["arm"] == arm.label and r["test"] == test.name), None)
            if not row or row["accuracy_mean"] is None:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            half = row["ci_half_width"]
            ax.bar(x, row["accuracy_mean"], width=width * 0.9, color=colors[arm], alpha=0.8,
                   yerr=None if half is None or math.isnan(half) else half, capsize=3,
                   label=arm.label if i == 0 else None)
            seeds = [float(v) for v in row["accuracy_per_seed"].split(";") if v]
            ax.scatter([x] * len(seeds), seeds, color="k", s=7, zorder=3)
    ax.set_xticks(range(len(exp.tests)), [t.name for t in exp.tests])
    ax.set_ylabel("test accuracy %")
    conf = round(100 * exp.stats["confidence"])
    ax.set_title(f"(c) test accuracy\n(bar: mean over seeds; whisker: {conf} % CI; dots: seeds)")
    if arms:
        ax.legend(fontsize=7)


def draw_forgetting(ax, exp: Experiment, matrix: list[dict]) -> None:
    """The forgetting matrix as a heat map with its values."""
    import numpy as np

    values = np.array([[math.nan if r.get(t.name) is None else r[t.name] for t in exp.tests] for r in matrix], float)
    ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if math.isnan(v) else f"{v:.1f}", ha="center", va="center",
                color="w" if not math.isnan(v) and v < 60 else "k", fontsize=8)
    ax.set_xticks(range(len(exp.tests)), [t.name for t in exp.tests])
    ax.set_yticks(range(len(matrix)), [r["row"] for r in matrix], fontsize=7)
    ax.set_xlabel("scored on")
    ax.set_title("(d) forgetting matrix: accuracy %\n(rows: base model, and each arm after fine-tuning)")


def draw_figures(exp: Experiment, data: dict, summary: list[dict], matrix: list[dict], folder: Path) -> dict:
    """Write each figure and summary.png (all four panels) into `folder`; returns {key: path}."""
    from ..tools.plotting import pyplot

    plt = pyplot()
    panels = {"selection": lambda ax: draw_selection(ax, exp, data), "curves": lambda ax: draw_curves(ax, exp, data),
              "accuracy": lambda ax: draw_accuracy(ax, exp, data, summary),
              "forgetting": lambda ax: draw_forgetting(ax, exp, matrix)}
    if not exp.tuned_keys:
        panels.pop("selection")
    paths = {}
    for key, draw in panels.items():
        fig, ax = plt.subplots(figsize=(6.2, 4.4))
        draw(ax)
        paths[key] = _save(fig, folder / FILES[key], plt)
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12.5, 4.9 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels.values()):
        draw(ax)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    paths["summary"] = _save(fig, folder / FILES["summary"], plt)
    return paths


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
