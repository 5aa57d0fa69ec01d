"""The text of an experiment's report.md, from the numbers report.py computed (nothing is computed here)."""
from __future__ import annotations

import math
import statistics

from .results import selection_values
from .spec import Arm, Experiment, combo_text, fmt, show


def _protocol(exp: Experiment) -> list[str]:
    b = exp.base
    steps = f"{b.max_steps} steps" if b.max_steps > 0 else f"{b.epochs:g} epoch(s)"
    tuned = ", ".join(exp.tuned_keys)
    lines = ["## Protocol", "",
             f"- Arms: {', '.join(a.label for a in exp.arms)}; base model `{b.model}`; {steps}, batch "
             f"{b.batch_size} × {b.accum_steps} accumulation, length {b.length}, {'/'.join(b.mix_precision)}.",
             f"- Seeds {', '.join(map(str, exp.seeds))} (the seed sets the data order, so runs with the same seed "
             "see the same batches, and the initialisation where it is random)."]
    if tuned:
        same = exp.select_seeds == exp.seeds
        lines.append(f"- Tuned per arm: {tuned}, by the {exp.metric} on a validation split of "
                     f"{show(b.val_size)} {'rows' if b.val_size >= 1 else 'of the rows'} held out of the training "
                     f"data (never the test set); best mean over "
                     + ("the same seeds" if same else f"seeds {', '.join(map(str, exp.select_seeds))}") + ".")
    lines.append("- Tests: " + ", ".join(f"{t.name} ({t.dataset}{', ' + show(t.file) if t.file else ''}"
                                         f"{f', first {t.limit}' if t.limit else ''})" for t in exp.tests)
                 + "; greedy decoding, scored by the benchmark's own rule.")
    return lines + [""]


def _results(exp: Experiment, summary: list[dict]) -> list[str]:
    conf = round(100 * exp.stats["confidence"])
    head = ["Method", "selected", "trainable params", "train time / run", "mean train loss (all steps)"] + \
        [f"{t.name} %" for t in exp.tests]
    lines = ["## Test accuracy", "",
             f"Mean over seeds ± the half-width of the {conf} % Student-t confidence interval (t quantile with n − 1 "
             "degrees of freedom; none with one seed), per-seed values in brackets. Training time: the Trainer's "
             "runtime, mean over seeds (a shared machine makes it noisy). Mean train loss: over all logged steps, "
             "mean ± CI over seeds.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in dict.fromkeys(r["arm"] for r in summary):
        rows = {r["test"]: r for r in summary if r["arm"] == label}
        first = next(iter(rows.values()))
        params = "–" if first["trainable_params"] is None else f"{first['trainable_params']:,}"
        seconds = first["train_seconds_mean"]
        cells = [label, first["selected"], params, fmt(seconds, 1 if seconds is not None and seconds < 10 else 0) + " s",
                 f"{fmt(first['mean_train_loss'], 4)} ± {fmt(first['mean_train_loss_half_width'], 4)}"]
        for t in exp.tests:
            r = rows.get(t.name)
            per_seed = ", ".join(f"{float(v):.1f}" for v in r["accuracy_per_seed"].split(";") if v) if r else ""
            cells.append("–" if not r or r["accuracy_mean"] is None else
                         f"{fmt(r['accuracy_mean'])} ± {fmt(r['ci_half_width'])} ({per_seed}; n={r['n_seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _efficiency(summary: list[dict]) -> list[str]:
    """PEFT's efficiency columns per arm (means over the seeds' completion markers)."""
    lines = ["## Efficiency", "", "Per arm, mean over its runs: trainable parameters, training time, input tokens per "
             "second of training, peak memory (CUDA's peak allocation on a GPU, else the process's resident high-water "
             "mark, which includes the base model) and the size of the weights training saved (the adapter, or the model).", "",
             "| Method | trainable params | train time / run | tokens/s | peak memory | saved |", "|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["arm"] for r in summary):
        r = next(x for x in summary if x["arm"] == label)
        params = "–" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        saved = r.get("saved_bytes_mean")
        lines.append(f"| {label} | {params} | {fmt(r['train_seconds_mean'], 0)} s | {fmt(r.get('tokens_per_second_mean'), 0)} "
                     f"| {fmt(r.get('peak_memory_mib_mean'), 0)} MiB | {fmt(saved and saved / 2 ** 20, 1)} MiB |")
    return lines + [""]


def _comparisons(exp: Experiment, comparisons: list[dict]) -> list[str]:
    conf = round(100 * exp.stats["confidence"])
    lines = ["## Paired comparisons", "",
             f"A − B in accuracy points on the same test items and seeds. Test: a paired bootstrap over items and "
             f"seeds ({exp.stats['bootstrap']} replicates, each drawing the seeds and the items with replacement; "
             f"{conf} % percentile interval; two-sided p from the bootstrap distribution shifted to the null), "
             "with Holm's correction over all rows of the table. McNemar's exact test on the discordant items "
             "(pooled over seeds) for reference: A-only / B-only correct.", ""]
    if not comparisons:
        return lines + ["No two arms were scored on the same items.", ""]
    lines += ["| Test | A | B | A − B (points) | CI | p (bootstrap) | p (Holm) | McNemar p (A-only / B-only) "
              "| seeds × items |", "|---|---|---|---|---|---|---|---|---|"]
    for r in comparisons:
        lines.append(f"| {r['test']} | {r['a']} | {r['b']} | {r['diff']:+.2f} | [{r['ci_low']:+.2f}, "
                     f"{r['ci_high']:+.2f}] | {r['p_bootstrap']:.4f} | {r['p_holm']:.4f} | {r['p_mcnemar']:.4f} "
                     f"({r['a_only']} / {r['b_only']}) | {len(r['seeds'].split(';'))} × {r['items']} |")
    return lines + [""]


def at_grid_edge(arm: Arm, combo: tuple) -> bool:
    """Whether the setting `combo` of `arm` takes, for some tuned key with more than one numeric value, that key's
    lowest or highest value: the optimum may then lie outside the grid. Keys with non-numeric values (or bools)
    have no order, so no edge."""
    for i, (_, chosen) in enumerate(combo):
        values = {c[i][1] for c in arm.combos}
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and len(values) > 1 and chosen in (min(values), max(values)):
            return True
    return False


def _selection(exp: Experiment, data: dict, figures: dict) -> list[str]:
    if not exp.tuned_keys:
        return []
    lines = ["## Selection on the validation split", "",
             f"{exp.metric} of each tuned setting (mean ± sd over the selection seeds, n); the chosen one per arm "
             "is marked, and flagged when it lies at the edge of its grid (the optimum may be outside it).", "",
             f"| Method | setting | {exp.metric} | |", "|---|---|---|---|"]
    for arm in exp.arms:
        for combo in arm.combos:
            values = selection_values(data["selection"], arm, combo)
            spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
            mark = ""
            if combo == data["choices"].get(arm):
                mark = "**chosen**" + (" (grid edge)" if at_grid_edge(arm, combo) else "")
            value = f"{statistics.fmean(values):.4f}{spread} ({len(values)})" if values else "– (not validated)"
            lines.append(f"| {arm.label} | {combo_text(combo)} | {value} | {mark} |")
    return lines + ["", f"![selection]({figures['selection'].name})", ""]


def _forgetting(exp: Experiment, matrix: list[dict], figures: dict) -> list[str]:
    head = ["Trained on ↓ / scored on →", "training data"] + [t.name for t in exp.tests]
    lines = ["## Forgetting matrix", "",
             "Mean test accuracy (%) over seeds: the base model as it is, and each arm after fine-tuning on its "
             "training data; a drop from the base model's row on a test is forgetting.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in matrix:
        lines.append("| " + " | ".join([r["row"], r["trained_on"]] + [fmt(r.get(t.name)) for t in exp.tests]) + " |")
    return lines + ["", f"![forgetting]({figures['forgetting'].name})", ""]


def _text_forgetting(exp: Experiment, rows: list[dict]) -> list[str]:
    if not rows:
        return []
    sample = exp.forgetting
    lines = ["## Forgetting on general text", "",
             f"Mean cross-entropy (nats per token) on the first {sample.tokens} tokens of `{sample.text}` in rows of "
             f"{sample.length} (text none of the runs trained on), as PEFT's method comparison measures forgetting; "
             f"the increase over the base model, mean over seeds with its {100 * exp.stats['confidence']:.0f} % "
             "interval.", "", "| Model | cross-entropy | increase over the base | interval | seeds |",
             "|---|---|---|---|---|"]
    for r in rows:
        interval = "–" if r.get("ci_low") is None or math.isnan(r["ci_low"]) else \
            f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        increase = "–" if r.get("increase") is None else f"{r['increase']:+.4f}"
        lines.append(f"| {r['row']} | {fmt(r['cross_entropy'], 4)} | {increase} | {interval} | "
                     f"{r.get('n_seeds') or '–'} |")
    return lines + [""]


def _analysis(exp: Experiment, data: dict) -> list[str]:
    if not exp.analyze:
        return []
    which = f"the top {exp.analyze_top_k} singular triplets" if exp.analyze_top_k else "all singular triplets"
    lines = ["## SVD variation of the trained weights", "",
             f"`sorsa.tools.analysis` on each final run's last checkpoint against the base model, over {which}: "
             "ΔΣ = mean |σ_t − σ_0|, ΔD = 1 − mean (|⟨u_t,u_0⟩| + |⟨v_t,v_0⟩|)/2, mean over the adapted layers, "
             "mean ± sd over seeds.", "", "| Method | ΔΣ | ΔD |", "|---|---|---|"]
    for arm, runs in data["arms"].items():
        found = [r["analysis"] for r in runs if r.get("analysis")]
        cells = []
        for k in (0, 1):
            vals = [f[k] for f in found]
            cells.append("–" if not vals else f"{statistics.fmean(vals):.4f}"
                         + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""))
        lines.append(f"| {arm.label} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def render(exp: Experiment, data: dict, summary: list[dict], comparisons: list[dict], matrix: list[dict],
           figures: dict, context: dict, text_rows: list[dict] | None = None) -> str:
    """report.md: protocol, test accuracy with intervals, paired comparisons, selection, training curves, the
    forgetting matrix, the SVD analysis, failures and how it was run."""
    versions = context["versions"]
    lines = [f"# Experiment: {exp.name}", ""] + ([exp.description.strip(), ""] if exp.description else []) + \
        [f"Generated by `python run.py --experiment {exp.source}`; do not edit by hand. The numbers behind the "
         "tables are in report.csv, comparisons.csv, selection.csv and forgetting.csv beside this file.", "",
         f"![summary]({figures['summary'].name})", ""]
    lines += _protocol(exp) + _results(exp, summary) + _efficiency(summary) + _comparisons(exp, comparisons)
    lines += _selection(exp, data, figures)
    lines += ["## Training curves", "", "Training loss per step (moving average), mean over seeds; the band spans "
              "the seeds (min–max).", "", f"![training curves]({figures['curves'].name})", ""]
    lines += _forgetting(exp, matrix, figures) + _text_forgetting(exp, text_rows or []) + _analysis(exp, data)
    if context["failed"]:
        lines += ["## Failed runs", "", "Reported and left out; rerun the experiment to retry them.", ""]
        lines += [f"- {o.kind} {o.name}: {o.error} (log: {o.log})" for o in context["failed"]] + [""]
    lines += ["## How it was run", "",
              f"- Machine: {context['machine']}; torch {versions.get('torch', '?')}, transformers "
              f"{versions.get('transformers', '?')}, peft {versions.get('peft', '?')}.",
              f"- This invocation: {context['wall_seconds'] / 60:.1f} min wall time, {context['trained']} runs trained "
              "(runs finished earlier with the same settings are reused, not trained again).", ""]
    return "\n".join(lines)
