"""CPU-scale reproduction of the SORSA paper's convergence claim (arXiv 2409.00055: SORSA converges faster
than PiSSA, which converges faster than LoRA), with full fine-tuning alongside; writes docs/mini_reproduction.{png,md}.

    bash scripts/mini_reproduction.sh                 # the whole experiment: ~30 CPU-minutes, ~15 min on 2 free cores
    python scripts/mini_reproduction.py --quick       # a smoke run in ~2 min (not written to docs/)

1. Pre-train a small Llama-architecture model from scratch on level-1 arithmetic (configs/mini/pretrain.yaml).
2. Fine-tune it on level-2 arithmetic (a shifted task) with LoRA, PiSSA and SORSA at one rank, one step count
   and one data order per seed (configs/mini/<method>.yaml through sorsa.recipe), plus full fine-tuning: first a
   learning-rate sweep on seed 0 (chosen by the mean training loss of the last 10% of steps), then seeds 1-3
   at each method's best learning rate.
3. Greedy held-out accuracy through the eval pipeline (level 2, and level 1 to see forgetting), the SVD
   variation analysis of every checkpoint (sorsa.analysis), loss curves; one figure and one table.
Finished runs are kept and reused when the script is run again with the same settings (--fresh starts over).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

# One BLAS thread per process, set before torch is imported (spawned workers inherit it): two
# single-threaded workers use two cores fully, while two-thread OpenMP pools stall badly on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

METHODS = ("sorsa", "pissa", "lora", "full")
from sorsa.config import METHOD_LABELS as LABELS  # noqa: E402
COLORS = {"sorsa": "tab:red", "pissa": "tab:blue", "lora": "tab:green", "full": "tab:gray"}
# Learning-rate grids of the sweep, factor 2 (3 for full FT) apart. A first full run found 5e-4 worst for
# every adapter and LoRA's best at the top of a shared grid, so LoRA's grid is shifted up one step (its B
# starts at zero, so its updates start smaller); full fine-tuning moves every weight and wants smaller steps.
SWEEP = {"sorsa": [1e-3, 2e-3, 4e-3, 8e-3], "pissa": [1e-3, 2e-3, 4e-3, 8e-3],
         "lora": [2e-3, 4e-3, 8e-3, 1.6e-2], "full": [1e-4, 3e-4, 1e-3, 3e-3]}
SWEEP_SEED = 0
SEEDS = (1, 2, 3)
N_TRAIN, N_TEST = 4000, 200
DATA_SEED = 0
LAST_FRACTION = 0.1  # the sweep's criterion: mean training loss over the last 10% of steps


# ----------------------------------------------------------------------------- setup

def load_settings(quick: bool) -> tuple[dict, dict]:
    """The base model's recipe (configs/mini/pretrain.yaml) and the fine-tuning recipe shared by the methods."""
    pre = yaml.safe_load((ROOT / "configs/mini/pretrain.yaml").read_text())
    recipe = {m: yaml.safe_load((ROOT / f"configs/mini/{m}.yaml").read_text()) for m in METHODS}
    if quick:  # a smoke test of the whole pipeline, not a result
        pre.update(steps=40)
        for r in recipe.values():
            r.update(max_steps=40, save_steps=20)
    return pre, recipe


def build_data(out: Path, pre: dict) -> dict:
    """Level-2 train/test files (the fine-tuning task) and a level-1 test file (the pre-training task),
    with no test question seen in training or pre-training."""
    from sorsa.builtin import PRETRAIN_POOL_MAX, _pretrain_pool, make_problems, materialize_dataset

    l2_train, l2_test = materialize_dataset(out / "data" / "level2", n_train=N_TRAIN, n_test=N_TEST, seed=DATA_SEED,
                                            level=2)
    l1_test = out / "data" / "level1" / "test.jsonl"
    if not l1_test.is_file():
        seen = {p.question for p in _pretrain_pool(min(pre["steps"] * pre["batch_size"], PRETRAIN_POOL_MAX),
                                                  pre["seed"], pre["level"])}
        problems = make_problems(N_TEST, seed=DATA_SEED + 2_000_003, level=1, exclude=seen)
        l1_test.parent.mkdir(parents=True, exist_ok=True)
        l1_test.write_text("".join(json.dumps(p.gsm8k()) + "\n" for p in problems))
    return {"l2_train": l2_train, "l2_test": l2_test, "l1_test": l1_test}


def build_base(out: Path, pre: dict) -> tuple[Path, dict, bool]:
    """Pre-train the base model from scratch (or reuse OUT/base if built with the same recipe); the flag
    says whether it was built now."""
    import torch
    from transformers import LlamaForCausalLM

    from sorsa import builtin as B

    path = out / "base"
    marker = path / "mini_base.json"
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == pre:
        return path, json.loads(marker.read_text()), False
    torch.set_num_threads(int(os.environ.get("MINI_PRETRAIN_THREADS", "1")))
    tokenizer = B.build_tokenizer()
    config = B.build_config(tokenizer)
    config.hidden_size, config.intermediate_size = pre["hidden_size"], pre["intermediate_size"]
    config.num_hidden_layers = pre["num_hidden_layers"]
    config.num_attention_heads = config.num_key_value_heads = pre["num_attention_heads"]
    torch.manual_seed(pre["seed"])
    model = LlamaForCausalLM(config)
    info = {"recipe": pre, "parameters": sum(p.numel() for p in model.parameters()),
            "loss_before": B.heldout_loss(model, tokenizer, pretrain_seed=pre["seed"])}
    started = time.perf_counter()
    losses = B.pretrain(model, tokenizer, pre["steps"], seed=pre["seed"], batch_size=pre["batch_size"], lr=pre["lr"],
                        level=pre["level"])
    info.update(pretrain_seconds=round(time.perf_counter() - started, 1), final_train_loss=losses[-1],
                loss_after=B.heldout_loss(model, tokenizer, pretrain_seed=pre["seed"]), losses=losses)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return path, info, True


# ----------------------------------------------------------------------------- jobs (run in worker processes)

def _init_worker():
    import torch

    torch.set_num_threads(1)


def _greedy_eval(model_dir: Path, out_dir: Path, test_file: Path, recipe: dict) -> dict:
    """Greedy accuracy of a saved model on a GSM-8K-schema file, through eval.runner.evaluate."""
    from eval.generate import make_generator
    from eval.runner import STOP_STRINGS, evaluate

    generate = make_generator(str(model_dir), backend="hf", max_new_tokens=recipe["max_new_tokens"],
                              batch_size=recipe["valid_batch_size"], stop=STOP_STRINGS["gsm-8k"], dtype="float32",
                              device="cpu")
    settings = {"model": str(model_dir), "max_new_tokens": recipe["max_new_tokens"], "greedy": True,
                "test_file": str(test_file)}
    return evaluate("gsm-8k", out_dir, generate, test_file=test_file, settings=settings, progress=False)


def job_base_eval(base: Path, data: dict, recipe: dict, out: Path) -> dict:
    """Accuracy of the base model before fine-tuning, on both levels."""
    return {level: _greedy_eval(base, out / "base_eval" / level, data[key], recipe)["accuracy"]
            for level, key in (("level1", "l1_test"), ("level2", "l2_test"))}


def job_run(method: str, name: str, lr: float, seed: int, final: bool, base: Path, data: dict, recipe: dict,
            run_path: Path, log_dir: Path) -> dict:
    """One fine-tuning run through sorsa.recipe: train (sweep), or train -> merge -> test plus the level-1 test
    and the SVD analysis (final). Reuses a run finished with the same training settings."""
    from sorsa import recipe as jobs
    from sorsa.analysis import analyze_run
    from sorsa.runs import run_dir as open_run

    overrides = {"name": name, "seed": seed, "lr": lr, "model": str(base), "train_file": str(data["l2_train"]),
                 "test_file": str(data["l2_test"]), "run_path": str(run_path), "max_steps": recipe["max_steps"],
                 "save_steps": recipe["save_steps"] if final else recipe["max_steps"], "overwrite": True}
    if not final:
        overrides.update(merge=False, test=False)
    cfg = jobs.resolve_config(overrides, str(ROOT / f"configs/mini/{method}.yaml"))
    run = open_run(cfg.run_path, cfg.name)
    started = time.perf_counter()
    need = ["eval/gsm-8k/results.json", "eval/level1/results.json", "analysis.csv", "analysis_topk/analysis.csv"]
    reused = run.done_with(cfg.training_settings()) and (not final or all((run.path / f).is_file() for f in need))
    if not reused:
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            jobs.train(cfg)
            if final:
                jobs.merge(cfg)
                jobs.test(cfg)
        if not final:  # the sweep reads only train_log.jsonl; its checkpoint (optimizer state included) goes
            shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
        if final:
            _greedy_eval(run.merged_dir, run.eval_root / "level1", data["l1_test"], recipe)
            analyze_run(run.path, progress=False, plot=False)
            # The principal part alone: the top-r triplets that PiSSA and SORSA train directly.
            analyze_run(run.path, out_dir=run.path / "analysis_topk", progress=False, plot=False,
                        top_k=recipe["rank"])
            shutil.rmtree(run.merged_dir, ignore_errors=True)  # re-creatable with run.py --merge
    return {"method": method, "name": name, "lr": lr, "seed": seed, "final": final, "reused": reused,
            "seconds": round(time.perf_counter() - started, 1)}


# ----------------------------------------------------------------------------- results

def train_losses(run_dir: Path) -> dict[int, float]:
    from sorsa.runs import RunDir

    return {r["step"]: r["loss"] for r in RunDir(run_dir).read_train_log()}


def tail_loss(losses: dict[int, float], fraction: float = LAST_FRACTION) -> float:
    steps = sorted(losses)
    tail = steps[-max(1, round(len(steps) * fraction)):]
    return sum(losses[s] for s in tail) / len(tail)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(run_path: Path, best: dict[str, float]) -> dict:
    """Per method: losses per seed, accuracies, trainable parameters and analysis rows at the last step."""
    from sorsa.analysis import read_csv
    from sorsa.report import count_trainable_params

    results = {}
    for m in METHODS:
        runs = [run_path / f"{m}_s{s}" for s in SEEDS]
        res = {"lr": best[m], "losses": [train_losses(r) for r in runs],
               "acc_l2": [100 * json.loads((r / "eval/gsm-8k/results.json").read_text())["accuracy"] for r in runs],
               "acc_l1": [100 * json.loads((r / "eval/level1/results.json").read_text())["accuracy"] for r in runs],
               "params": count_trainable_params(runs[0], m),
               "analysis": [read_csv(r / "analysis.csv") for r in runs],
               "analysis_topk": [read_csv(r / "analysis_topk/analysis.csv") for r in runs]}
        results[m] = res
    return results


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def make_figure(results: dict, out_png: Path, rank: int):
    from matplotlib.colors import Normalize

    from sorsa.analysis import draw_analysis_panel, pyplot, step_means

    plt = pyplot()

    fig = plt.figure(figsize=(17, 8.6))
    grid = fig.add_gridspec(2, 4, height_ratios=[1, 1], hspace=0.38, wspace=0.28)
    # (a) loss curves: per-step loss averaged over seeds, smoothed (window 20), band = min..max over seeds
    curves = {}
    for m in METHODS:
        losses = results[m]["losses"]
        steps = sorted(set.intersection(*(set(l) for l in losses)))
        curves[m] = steps, [smooth([l[s] for s in steps], 20) for l in losses]  # per seed
    ax = fig.add_subplot(grid[0, 0])
    for m in METHODS:
        steps, per_seed = curves[m]
        ax.plot(steps, [statistics.fmean(v) for v in zip(*per_seed)], color=COLORS[m], lw=1.4,
                label=f"{LABELS[m]} (lr {results[m]['lr']:g})")
        ax.fill_between(steps, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                        color=COLORS[m], alpha=0.18, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average, 20 steps)")
    ax.set_title(f"(a) training loss, level-2 task\n(mean of {len(SEEDS)} seeds; band: min–max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    # (b) the adapters' gap to LoRA, paired by seed (the same data order): where the curves in (a) overlap
    ax = fig.add_subplot(grid[0, 1])
    for m in ("sorsa", "pissa"):
        steps, per_seed = curves[m]
        diffs = [[a - b for a, b in zip(mine, lora)] for mine, lora in zip(per_seed, curves["lora"][1])]
        ax.plot(steps, [statistics.fmean(v) for v in zip(*diffs)], color=COLORS[m], lw=1.4, label=LABELS[m])
        ax.fill_between(steps, [min(v) for v in zip(*diffs)], [max(v) for v in zip(*diffs)], color=COLORS[m],
                        alpha=0.18, lw=0)
    ax.axhline(0.0, color=COLORS["lora"], lw=1.2, label="LoRA")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss minus LoRA's loss (same seed)")
    ax.set_title("(b) gap to LoRA, paired by seed\n(below 0: lower loss than LoRA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # (c) held-out accuracy, per seed
    ax = fig.add_subplot(grid[0, 2])
    for i, m in enumerate(METHODS):
        for j, (key, hatch) in enumerate((("acc_l2", None), ("acc_l1", "//"))):
            vals = results[m][key]
            x = i + (j - 0.5) * 0.38
            ax.bar(x, statistics.fmean(vals), width=0.36, color=COLORS[m], alpha=0.55 if j else 0.85, hatch=hatch,
                   yerr=statistics.stdev(vals) if len(vals) > 1 else 0, capsize=3)
            ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(METHODS)), [LABELS[m] for m in METHODS])
    ax.set_ylabel("greedy accuracy %, 200 problems")
    ax.set_title("(c) held-out accuracy\nlevel 2 (solid), level 1 (hatched)")
    ax.grid(alpha=0.3, axis="y")
    # (d) mean ΔΣ-ΔD trajectories of the top-r triplets, mean over seeds
    ax = fig.add_subplot(grid[0, 3])
    for m in METHODS:
        per_seed = [step_means(rows) for rows in results[m]["analysis_topk"]]
        xs = [0.0] + [statistics.fmean(p[i][1] for p in per_seed) for i in range(len(per_seed[0]))]
        ys = [0.0] + [statistics.fmean(p[i][2] for p in per_seed) for i in range(len(per_seed[0]))]
        ax.plot(xs, ys, "-o", ms=3, color=COLORS[m], label=LABELS[m])
    ax.set_xlabel("ΔΣ (top-r)")
    ax.set_ylabel("ΔD (top-r)")
    ax.set_title(f"(d) SVD variation of the top r={rank} triplets\n(mean over layers and seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # (e) the paper-style scatter over all triplets, seed 1, shared axes
    rows_all = [r for m in METHODS for r in results[m]["analysis"][0]]
    norm = Normalize(0, max(r["step"] for r in rows_all))
    first = None
    scatter = None
    for i, m in enumerate(METHODS):
        ax = fig.add_subplot(grid[1, i], sharex=first, sharey=first)
        first = first or ax
        scatter = draw_analysis_panel(ax, results[m]["analysis"][0], norm,
                                      title=f"(e) {LABELS[m]}: all triplets, seed {SEEDS[0]}")
        if i:
            ax.set_ylabel("")
        ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(scatter, ax=fig.axes[-4:], label="step", fraction=0.02, pad=0.01)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pm(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _last_step(rows_per_seed: list[list[dict]]) -> tuple[list[float], list[float]]:
    from sorsa.analysis import step_means

    last = [step_means(rows)[-1] for rows in rows_per_seed]
    return [x[1] for x in last], [x[2] for x in last]


def write_markdown(path: Path, results: dict, sweep: dict, best: dict, base_info: dict, base_acc: dict,
                   chance: dict, recipe: dict, cost: dict, wall: float, timings: list[dict], quick: bool):
    from sorsa.runs import package_versions

    versions = package_versions()
    r0 = recipe["sorsa"]
    steps = r0["max_steps"]
    early = steps // 4
    lines = ["# Mini reproduction: SORSA vs PiSSA vs LoRA vs full fine-tuning on a CPU", "",
             "Generated by `bash scripts/mini_reproduction.sh` (scripts/mini_reproduction.py); do not edit by hand."
             + (" **QUICK SMOKE RUN — not a result.**" if quick else ""), ""]
    # --- the claim and the answer
    per_seed = {m: [statistics.fmean(l.values()) for l in results[m]["losses"]] for m in METHODS}
    early_seed = {m: [statistics.fmean(v for s, v in l.items() if s <= early) for l in results[m]["losses"]]
                  for m in METHODS}
    mean_loss = {m: mean_std(per_seed[m]) for m in METHODS}
    final_loss = {m: mean_std([tail_loss(l) for l in results[m]["losses"]]) for m in METHODS}
    acc = {m: mean_std(results[m]["acc_l2"]) for m in METHODS}
    order = sorted(("sorsa", "pissa", "lora"), key=lambda m: mean_loss[m][0])

    def paired(a: str, b: str, values: dict) -> str:
        diffs = [x - y for x, y in zip(values[a], values[b])]
        wins = sum(d < 0 for d in diffs)
        return (f"{LABELS[a]} − {LABELS[b]} = {', '.join(f'{d:+.4f}' for d in diffs)} "
                f"({LABELS[a]} lower in {wins} of {len(diffs)} seeds)")

    holds = order == ["sorsa", "pissa", "lora"]
    adapters = ("sorsa", "pissa", "lora")
    acc_gap = max(acc[m][0] for m in adapters) - min(acc[m][0] for m in adapters)
    acc_sd = max(acc[m][1] for m in adapters)
    top_sigma = {m: statistics.fmean(_last_step(results[m]["analysis_topk"])[0]) for m in adapters}
    least_sigma = min(adapters, key=top_sigma.get)
    forgot = [statistics.fmean(results[m]["acc_l1"]) for m in METHODS]
    lines += ["## What it shows", "",
              "The paper's claim is that SORSA converges faster than PiSSA, which converges faster than LoRA. "
              f"Measured by the mean training loss over all {steps} steps (the area under the loss curve; lower = "
              f"faster convergence), this run orders them **{' < '.join(LABELS[m] for m in order)}** "
              f"({', '.join(f'{LABELS[m]} {mean_loss[m][0]:.3f} ± {mean_loss[m][1]:.3f}' for m in order)}; "
              f"mean ± sd over {len(SEEDS)} seeds); "
              + ("the paper's ordering holds at this scale. " if holds else
                 "the paper's ordering does **not** hold in full at this scale. ")
              + "Paired by seed (every method sees the same data order at a given seed): "
              f"{paired('sorsa', 'pissa', per_seed)}; {paired('pissa', 'lora', per_seed)}. "
              f"Mean loss over the first quarter (steps 1–{early}): "
              f"{', '.join(f'{LABELS[m]} {statistics.fmean(early_seed[m]):.3f}' for m in ('sorsa', 'pissa', 'lora'))}.",
              "",
              "Over the last 10% of steps the three adapters reach a loss of "
              f"{', '.join(f'{LABELS[m]} {final_loss[m][0]:.3f}' for m in adapters)}, and their "
              "held-out level-2 accuracy "
              f"({', '.join(f'{LABELS[m]} {acc[m][0]:.1f} ± {acc[m][1]:.1f}%' for m in adapters)}) "
              + ("differs by less than its seed spread. " if acc_gap < acc_sd else
                 f"is best for {LABELS[max(adapters, key=lambda m: acc[m][0])]}. ")
              + f"Full fine-tuning, with {results['full']['params'] / results['sorsa']['params']:.0f}× the trainable "
              f"parameters, reaches loss {mean_loss['full'][0]:.3f} and accuracy {acc['full'][0]:.1f}%. Every "
              f"method forgets the pre-training task's format: level-1 accuracy falls from "
              f"{100 * base_acc['level1']:.1f}% to {min(forgot):.1f}–{max(forgot):.1f}%. In the SVD analysis "
              f"{LABELS[least_sigma]} moves the top-r singular values least of the three adapters "
              f"(ΔΣ top-r: {', '.join(f'{LABELS[m]} {top_sigma[m]:.3f}' for m in adapters)}).", ""]
    # --- main table
    lines += ["## Results", "",
              f"Fine-tuning on level-2 problems, {steps} steps, batch 8, rank {r0['rank']}, each method at its "
              f"sweep-chosen learning rate; mean ± sd over seeds {', '.join(map(str, SEEDS))} "
              "(min–max in brackets for accuracy). Accuracy: greedy decoding, 200 held-out problems, "
              "the GSM-8K protocol of the eval pipeline. ΔΣ / ΔD: the SVD variation analysis at the last step, "
              "mean over the adapted layers, over all triplets and over the top-r triplets.", "",
              "| Method | lr | trainable params | mean loss, all steps | loss, steps 1–%d | loss, last 10%% "
              "| level-2 acc. %% | level-1 acc. %% | ΔΣ all | ΔD all | ΔΣ top-r | ΔD top-r |" % early,
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        res = results[m]
        early_loss = [statistics.fmean(v for s, v in l.items() if s <= early) for l in res["losses"]]
        ds, dd = _last_step(res["analysis"])
        ds_k, dd_k = _last_step(res["analysis_topk"])
        a2, a1 = res["acc_l2"], res["acc_l1"]
        lines.append(f"| {LABELS[m]} | {res['lr']:g} | {res['params']:,} "
                     f"| {_pm([statistics.fmean(l.values()) for l in res['losses']])} "
                     f"| {_pm(early_loss)} | {_pm([tail_loss(l) for l in res['losses']])} "
                     f"| {_pm(a2, 1)} [{min(a2):.1f}–{max(a2):.1f}] | {_pm(a1, 1)} [{min(a1):.1f}–{max(a1):.1f}] "
                     f"| {_pm(ds, 4)} | {_pm(dd, 3)} | {_pm(ds_k, 4)} | {_pm(dd_k, 3)} |")
    bounds = [0] + [round(steps * f) for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1)]
    phases = list(zip([b + 1 for b in bounds[:-1]], bounds[1:]))
    lines += ["", "Mean training loss by phase of training (mean over seeds; figure panel (b) shows the paired gap "
              "to LoRA step by step):", "",
              "| Method | " + " | ".join(f"steps {a}–{b}" for a, b in phases) + " |",
              "|---|" + "---|" * len(phases)]
    for m in METHODS:
        cells = [statistics.fmean(statistics.fmean(v for s, v in l.items() if a <= s <= b)
                                  for l in results[m]["losses"]) for a, b in phases]
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    lines += ["", f"Base model before fine-tuning: level-1 accuracy {100 * base_acc['level1']:.1f}%, level-2 accuracy "
              f"{100 * base_acc['level2']:.1f}%. Chance (always answering the most frequent answer of the test set): "
              f"level 1 {chance['level1']:.1f}%, level 2 {chance['level2']:.1f}%.", "",
              "![mini reproduction](mini_reproduction.png)", ""]
    # --- sweep
    lines += ["## Learning-rate sweep (seed %d)" % SWEEP_SEED, "",
              "Criterion: mean training loss over the last 10% of steps (each run makes one pass over fresh "
              "problems, so this is also a held-out loss).", "",
              "| Method | lr | last-10% loss | |", "|---|---|---|---|"]
    for m in METHODS:
        for lr in SWEEP[m]:
            mark = ""
            if lr == best[m]:
                mark = "**chosen**" + (" (grid edge)" if lr in (SWEEP[m][0], SWEEP[m][-1]) else "")
            lines.append(f"| {LABELS[m]} | {lr:g} | {sweep[m][lr]:.4f} | {mark} |")
    # --- how it was run
    pre = base_info["recipe"]
    lines += ["", "## How it was run", "",
              f"- Base model: Llama architecture, hidden {pre['hidden_size']}, {pre['num_hidden_layers']} layers, "
              f"{pre['num_attention_heads']} heads, SwiGLU {pre['intermediate_size']}, "
              f"{base_info['parameters']:,} parameters, the built-in word-level tokenizer; pre-trained from scratch "
              f"for {pre['steps']} steps × {pre['batch_size']} level-1 problems (one addition or subtraction), lr "
              f"{pre['lr']:g}; held-out response loss {base_info['loss_before']:.2f} → {base_info['loss_after']:.3f} "
              f"({base_info['pretrain_seconds']:.0f} s).",
              f"- Fine-tuning task: level-2 problems (an addition then a subtraction, or a one-digit product), "
              f"{N_TRAIN} training and {N_TEST} test problems (no overlap); a test set of {N_TEST} level-1 problems "
              "unseen in pre-training measures forgetting.",
              f"- Recipe (configs/mini/<method>.yaml through `sorsa.recipe`): rank {r0['rank']} on all seven projections, "
              f"{steps} steps, batch {r0['batch_size']}, cosine schedule with {r0['warmup']:g} warmup, AdamW without "
              f"weight decay, clip 1.0, fp32, full SVD initialisation for PiSSA and SORSA, SORSA gamma "
              f"{r0['gamma']:g}; the same data order for every method at a given seed (the seed also draws "
              "LoRA's random A).",
              f"- Sweep: seed {SWEEP_SEED}; the reported runs use seeds {', '.join(map(str, SEEDS))}, so the "
              "numbers above are not the ones the learning rate was chosen on.",
              "- SVD analysis: `sorsa.analysis.analyze_run` on every checkpoint (every "
              f"{r0['save_steps']} steps); ΔΣ = mean |σ_t − σ_0|, "
              "ΔD = 1 − mean (|⟨u_t,u_0⟩| + |⟨v_t,v_0⟩|)/2, "
              "over all min(out, in) triplets and over the top r. Triplets are paired by rank, so over all triplets "
              "ΔD also counts singular values that change places and nearly equal ones whose directions a small "
              "change re-mixes; the top-r numbers describe the principal part that PiSSA and SORSA train.",
              f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores; {len(timings)} fine-tuning runs in "
              f"{cost.get('jobs', 2)} single-threaded worker processes; torch {versions.get('torch', '?')}, "
              f"transformers {versions.get('transformers', '?')}, peft {versions.get('peft', '?')}.",
              f"- **Wall time: {cost['wall_seconds'] / 60:.1f} min** for the whole script (pre-training, sweep, seeds, "
              f"evaluation, analysis, figure), measured {cost['measured']}"
              + (f"; CPU time {cost['cpu_seconds'] / 60:.1f} min (user + system, all processes), so on two cores "
                 f"that nothing else uses the script needs about {cost['cpu_seconds'] / 120:.0f} min; a wall time "
                 "well above that means other work shared the cores" if cost.get("cpu_seconds") else "")
              + (f". These docs were re-rendered from the finished runs in {wall:.0f} s." if not any(
                  not t["reused"] for t in timings) and cost["wall_seconds"] > wall + 1 else ".")
              + "", ""]
    path.write_text("\n".join(lines))


def _cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and its finished children (the worker pool), or None."""
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def chance_accuracy(test_file: Path) -> float:
    """Accuracy (%) of always answering the test set's most frequent answer."""
    answers = [json.loads(line)["answer"].rsplit("####", 1)[-1].strip() for line in test_file.read_text().splitlines()]
    return 100 * max(answers.count(a) for a in set(answers)) / len(answers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "mini_reproduction"), help="working directory of the runs")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the figure and table go")
    p.add_argument("--jobs", type=int, default=2, help="parallel single-threaded worker processes (default 2)")
    p.add_argument("--quick", action="store_true", help="a 2-minute smoke run of the pipeline (writes to OUT only)")
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing finished runs")
    args = p.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out) / ("quick" if args.quick else "")
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    pre, recipe = load_settings(args.quick)
    if args.quick:
        for m in METHODS:
            SWEEP[m] = SWEEP[m][1:3]
    data = build_data(out, pre)
    print(f"[mini] pre-training the base model ({pre['steps']} steps)", flush=True)
    base, base_info, built = build_base(out, pre)
    if built:  # runs fine-tuned from an earlier base must not be reused
        shutil.rmtree(out / "runs", ignore_errors=True)
    print(f"[mini] base: {base_info['parameters']:,} parameters, held-out loss {base_info['loss_before']:.2f} -> "
          f"{base_info['loss_after']:.3f} ({base_info['pretrain_seconds']} s)", flush=True)
    run_path, log_dir = out / "runs", out / "logs"
    common = dict(base=base, data=data, run_path=run_path, log_dir=log_dir)
    timings = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        base_eval = pool.submit(job_base_eval, base, data, recipe["sorsa"], out)
        sweep_jobs = {(m, lr): pool.submit(job_run, m, f"sweep_{m}_lr{lr:g}", lr, SWEEP_SEED, False,
                                           recipe=recipe[m], **common)
                      for m in METHODS for lr in SWEEP[m]}
        sweep = {m: {} for m in METHODS}
        for (m, lr), fut in sweep_jobs.items():
            t = fut.result()
            timings.append(t)
            sweep[m][lr] = tail_loss(train_losses(run_path / t["name"]))
            print(f"[mini] sweep {m} lr {lr:g}: last-10% loss {sweep[m][lr]:.4f} ({t['seconds']} s"
                  f"{', reused' if t['reused'] else ''})", flush=True)
        best = {m: min(sweep[m], key=sweep[m].get) for m in METHODS}
        print(f"[mini] best learning rates: {best}", flush=True)
        final_jobs = [pool.submit(job_run, m, f"{m}_s{s}", best[m], s, True, recipe=recipe[m], **common)
                      for s in SEEDS for m in METHODS]
        for fut in final_jobs:
            t = fut.result()
            timings.append(t)
            print(f"[mini] {t['name']} done ({t['seconds']} s{', reused' if t['reused'] else ''})", flush=True)
        base_acc = base_eval.result()
    results = collect(run_path, best)
    data_chance = {"level1": chance_accuracy(data["l1_test"]), "level2": chance_accuracy(data["l2_test"])}
    docs = Path(args.docs) if not args.quick else out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    make_figure(results, docs / "mini_reproduction.png", recipe["sorsa"]["rank"])
    wall = time.perf_counter() - started
    # The cost reported is that of the invocation that computed the runs; a later one that reuses them all
    # only re-renders the docs and keeps the measured cost.
    cost_path = out / "cost.json"
    computed = sum(not t["reused"] for t in timings)
    if built or computed or not cost_path.is_file():
        cost = {"wall_seconds": round(wall, 1), "cpu_seconds": _cpu_seconds(), "runs_computed": computed,
                "base_built": built, "jobs": args.jobs, "measured": time.strftime("%Y-%m-%d %H:%M")}
        cost_path.write_text(json.dumps(cost, indent=1) + "\n")
    cost = json.loads(cost_path.read_text())
    write_markdown(docs / "mini_reproduction.md", results, sweep, best, base_info, base_acc, data_chance, recipe,
                   cost, wall, timings, args.quick)
    summary = {m: {"lr": best[m], "acc_l2": results[m]["acc_l2"], "acc_l1": results[m]["acc_l1"],
                   "mean_loss": [statistics.fmean(l.values()) for l in results[m]["losses"]],
                   "tail_loss": [tail_loss(l) for l in results[m]["losses"]]} for m in METHODS}
    record = {"sweep": {m: {str(k): v for k, v in d.items()} for m, d in sweep.items()}, "best": best,
              "results": summary, "base_acc": base_acc, "chance": data_chance, "cost": cost, "timings": timings}
    (out / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[mini] wrote {docs / 'mini_reproduction.png'} and {docs / 'mini_reproduction.md'} "
          f"in {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
