"""An experiment's --dry-run: how many runs, trainings and test measurements it holds, and an estimate of its
training GPU-hours from the planner (sorsa/tools/planner.py: parameter counts from the model built on the meta
device, FLOPs per token), without reading any weight or training anything.
"""
from __future__ import annotations

import re

from ..train.settings import RunConfig
from .spec import Experiment
from ..core.errors import UserError


def train_examples(exp: Experiment, cfg: RunConfig) -> int:
    """Training rows of a run (after the validation hold-out): plan.train_examples, else the rows of a local
    training file, else the absolute end of --split ('[:100000]')."""
    from ..tasks.data import load_train_dataset, validation_rows
    from ..train.loading import resolve_data_file

    if exp.plan.get("train_examples"):
        n = int(exp.plan["train_examples"])
    elif cfg.train_file:
        path = resolve_data_file(cfg.train_file, cfg.cache_path, cfg.run_path, "train")
        n = len(load_train_dataset(cfg.train_dataset, cfg.split, path, cfg.cache_path))
    else:
        match = re.fullmatch(r"(?:train)?\[\s*:\s*(\d+)\s*\]", (cfg.split or "").replace(" ", ""))
        if not match:
            raise UserError(f"{exp.source}: cannot tell how many rows the split {cfg.split!r} of {cfg.train_dataset} "
                             "holds without downloading it; set plan.train_examples in the experiment file")
        n = int(match.group(1))
    return n - len(validation_rows(n, cfg.val_size)) if cfg.val_size else n


def run_tokens(exp: Experiment, cfg: RunConfig, gpus: int) -> tuple[float, bool]:
    """(tokens one training run processes, whether that is the 2 × length upper bound per sequence)."""
    per_example = exp.plan.get("tokens_per_example")
    if cfg.max_steps > 0:
        sequences = cfg.max_steps * cfg.batch_size * cfg.accum_steps * gpus
    else:
        sequences = cfg.epochs * train_examples(exp, cfg)
    return sequences * (per_example or 2 * cfg.length), not per_example


def count_runs(exp: Experiment) -> dict:
    """Selection runs, final runs, trainings (a final run at a selection seed is a selection run already) and
    test measurements (final runs and base models, on every test)."""
    selection = len(exp.selection_runs())
    final = len(exp.arms) * len(exp.seeds)
    shared = len(exp.arms) * len(set(exp.seeds) & set(exp.select_seeds)) if exp.tuned_keys else 0
    return {"selection": selection, "final": final, "shared": shared, "trainings": selection + final - shared,
            "tests": (final + len(exp.base_models())) * len(exp.tests)}


def plan_experiment(exp: Experiment, gpus: int = 1) -> dict:
    """The numbers of `count_runs` and the training GPU-hours per arm and in total; prints them."""
    from ..tools.planner import A100_BF16_TFLOPS, DEFAULT_UTILIZATION, plan_of, training_gpu_hours

    counts = count_runs(exp)
    tflops = float(exp.plan.get("gpu_tflops", A100_BF16_TFLOPS))
    utilization = float(exp.plan.get("utilization", DEFAULT_UTILIZATION))
    lines = [f"Experiment {exp.name} ({exp.source}) -> {exp.folder}/",
             f"  arms: {len(exp.arms)} ({', '.join(a.label for a in exp.arms)}); seeds {exp.seeds}",
             f"  selection: {counts['selection']} runs" + (f" (tuning {', '.join(exp.tuned_keys)} by {exp.metric} on "
                                                          f"seeds {exp.select_seeds})" if exp.tuned_keys else ""),
             f"  final: {counts['final']} runs (the chosen setting of each arm x {len(exp.seeds)} seeds), "
             f"{counts['shared']} of them among the selection runs",
             f"  trainings: {counts['trainings']}; test measurements: {counts['tests']} "
             f"({len(exp.tests)} tests: {', '.join(t.name for t in exp.tests)}; base models included)"]
    lines.append(f"  training GPU-hours (estimate, {gpus} GPU(s) a run):")
    total, per_arm, bound = 0.0, {}, False
    for arm in exp.arms:
        cfg = exp.spec(arm, arm.combos[0], exp.seeds[0]).config
        tokens, upper = run_tokens(exp, cfg, gpus)
        bound |= upper
        plan = plan_of(cfg, gpus)
        trainings = len(exp.seeds)
        if exp.tuned_keys:  # every tuned setting on the selection seeds, then the other seeds of the chosen one
            trainings = len(arm.combos) * len(exp.select_seeds) + len(set(exp.seeds) - set(exp.select_seeds))
        hours = training_gpu_hours(plan, tokens, tflops, utilization)
        per_arm[arm.label] = {"runs": trainings, "hours_per_run": hours, "trainable": plan.trainable}
        total += trainings * hours
        lines.append(f"    {arm.label:<24} {plan.trainable:,} trainable; {tokens:.3g} tokens a run; "
                     f"{trainings} trainings x {hours:.2f} GPU-h")
    lines += [f"  total: {total:.1f} GPU-hours of training",
              f"  assumptions: {tflops:g} TFLOP/s peak (A100 bf16 by default) at {100 * utilization:.0f} % "
              "utilization; 6N-style FLOPs per token (sorsa.tools.planner.training_flops_per_token); "
              + ("every sequence at the 2 x length upper bound (set plan.tokens_per_example)" if bound
                 else f"{exp.plan['tokens_per_example']} tokens per example (plan.tokens_per_example)")
              + "; generation for validation and tests is not included"]
    print("\n".join(lines))
    return {**counts, "gpu_hours": total, "per_arm": per_arm}
