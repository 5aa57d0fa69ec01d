"""CPU-scale reproduction of the SORSA paper's comparison, run as the experiment configs/experiments/mini.yaml:
this script is its preparation step (the base model and the data) and copies its report into docs/.

    bash scripts/mini_reproduction.sh                          # prepare, run, write docs/mini_reproduction.{md,png}
    python scripts/mini_reproduction.py --prepare              # only build the base model and the data
    python run.py --experiment configs/experiments/mini.yaml   # the experiment alone, once prepared

1. Pre-train a small Llama-architecture model from scratch on level-1 arithmetic (configs/mini/pretrain.yaml)
   into runs/mini_reproduction/base/.
2. Write the level-2 fine-tuning problems (4400 training, 200 test) and 200 level-1 test problems unseen in
   pre-training into runs/mini_reproduction/data/. A changed recipe rebuilds them and clears the old runs.
3. Run the experiment (sorsa.experiment: per-method learning rate on 400 held-out problems, 3 seeds, tests,
   statistics) and copy its report and summary figure to docs/, with the measured wall and CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# One BLAS thread per process, set before torch is imported (spawned workers inherit it): two single-threaded
# workers use two cores fully, while two-thread OpenMP pools stall badly on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

EXPERIMENT = ROOT / "configs/experiments/mini.yaml"
OUT = ROOT / "runs" / "mini_reproduction"  # the experiment's folder (its name under base.run_path)
N_TRAIN, N_TEST, DATA_SEED = 4400, 200, 0  # 400 of the training problems are held out by the experiment


def build_data(out: Path, pre: dict) -> None:
    """Level-2 train/test files (the fine-tuning task) and a level-1 test file (the pre-training task), with no
    test question seen in training or pre-training."""
    from sorsa.tasks.builtin import make_problems, materialize_dataset, pretrain_problems

    materialize_dataset(out / "data" / "level2", n_train=N_TRAIN, n_test=N_TEST, seed=DATA_SEED, level=2)
    seen = {p.question for p in pretrain_problems(pre["steps"], pre["batch_size"], pre["seed"], pre["level"])}
    problems = make_problems(N_TEST, seed=DATA_SEED + 2_000_003, level=1, exclude=seen)
    level1 = out / "data" / "level1" / "test.jsonl"
    level1.parent.mkdir(parents=True, exist_ok=True)
    level1.write_text("".join(json.dumps(p.gsm8k()) + "\n" for p in problems))


def build_base(out: Path, pre: dict) -> dict:
    """Pre-train the base model from scratch into OUT/base; returns what it measured."""
    import torch
    from transformers import LlamaForCausalLM

    from sorsa.tasks import builtin as B

    torch.set_num_threads(int(os.environ.get("MINI_PRETRAIN_THREADS", "1")))
    tokenizer = B.build_tokenizer()
    config = B.build_config(tokenizer)
    config.hidden_size, config.intermediate_size = pre["hidden_size"], pre["intermediate_size"]
    config.num_hidden_layers = pre["num_hidden_layers"]
    config.num_attention_heads = config.num_key_value_heads = pre["num_attention_heads"]
    torch.manual_seed(pre["seed"])
    model = LlamaForCausalLM(config)
    info = {"parameters": sum(p.numel() for p in model.parameters()),
            "loss_before": B.heldout_loss(model, tokenizer, level=pre["level"], pretrain_seed=pre["seed"])}
    started = time.perf_counter()
    losses = B.pretrain(model, tokenizer, pre["steps"], seed=pre["seed"], batch_size=pre["batch_size"], lr=pre["lr"],
                        level=pre["level"])
    info.update(pretrain_seconds=round(time.perf_counter() - started, 1), final_train_loss=losses[-1],
                loss_after=B.heldout_loss(model, tokenizer, level=pre["level"], pretrain_seed=pre["seed"]))
    shutil.rmtree(out / "base", ignore_errors=True)
    model.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    return info


def prepare(out: Path = OUT) -> dict:
    """The base model and the data, rebuilt (and the old runs cleared) when their recipe changed; returns the
    preparation record (recipe and measurements)."""
    pre = yaml.safe_load((ROOT / "configs/mini/pretrain.yaml").read_text())
    recipe = {"pretrain": pre, "data": {"n_train": N_TRAIN, "n_test": N_TEST, "seed": DATA_SEED}}
    marker = out / "prepared.json"
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == recipe and (out / "base").is_dir():
        return json.loads(marker.read_text())
    print(f"[mini] pre-training the base model ({pre['steps']} steps) and writing the data", flush=True)
    for stale in ("runs", "validation", "data"):  # runs from an older base, their validation, its held-out rows
        shutil.rmtree(out / stale, ignore_errors=True)
    marker.unlink(missing_ok=True)
    build_data(out, pre)
    record = {"recipe": recipe, "base": build_base(out, pre)}
    marker.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the experiment's workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def measured_cost(wall: float, trained: int) -> dict:
    """The cost of the invocation that trained the runs (OUT/cost.json): a later invocation that only reuses
    them re-renders the docs and keeps the measured cost."""
    path = OUT / "cost.json"
    if trained or not path.is_file():
        path.write_text(json.dumps({"wall_seconds": round(wall, 1), "cpu_seconds": _cpu_seconds(), "trained": trained,
                                    "measured": time.strftime("%Y-%m-%d %H:%M")}, indent=1) + "\n")
    return json.loads(path.read_text())


def write_docs(docs: Path, record: dict, cost: dict) -> None:
    """docs/mini_reproduction.md (the experiment's report.md with the preparation and the measured cost) and
    docs/mini_reproduction.png (its summary figure)."""
    pre, base = record["recipe"]["pretrain"], record["base"]
    report = (OUT / "report.md").read_text().replace("](summary.png)", "](mini_reproduction.png)").replace(
        "Generated by `python run.py", "Generated by `bash scripts/mini_reproduction.sh` (its preparation step, then "
        "`python run.py").replace("mini.yaml`; do not edit", "mini.yaml`); do not edit")
    # docs/ holds only the summary figure: the report's single-panel figures become pointers to its panels
    from sorsa.experiment.figures import FILES

    panels = {f"]({name})": letter for letter, name in zip("abcd", [v for k, v in FILES.items() if k != "summary"])}
    lines = report.splitlines()
    for i, line in enumerate(lines):
        letter = next((panels[k] for k in panels if line.startswith("![") and line.endswith(k)), None)
        if letter:
            lines[i] = f"(The figure at the top, panel ({letter}).)"
    # the cost measured below (the invocation that trained the runs) replaces the report's line on the last one
    report = "\n".join(line for line in lines if not line.startswith("- This invocation:"))
    cost = (f"- Preparation (`python scripts/mini_reproduction.py --prepare`): base model of "
            f"{base['parameters']:,} parameters (hidden {pre['hidden_size']}, {pre['num_hidden_layers']} layers, "
            f"{pre['num_attention_heads']} heads, SwiGLU {pre['intermediate_size']}, the built-in word-level "
            f"tokenizer), pre-trained from scratch for {pre['steps']} steps x {pre['batch_size']} level-1 problems, "
            f"lr {pre['lr']:g}: held-out response loss {base['loss_before']:.2f} -> {base['loss_after']:.3f} "
            f"({base['pretrain_seconds']:.0f} s).\n"
            f"- **Wall time of `bash scripts/mini_reproduction.sh`: {cost['wall_seconds'] / 60:.1f} min** "
            f"(preparation included, {cost['trained']} runs trained, measured {cost['measured']}), CPU time "
            f"{cost['cpu_seconds'] / 60:.1f} min (user + system, all processes): on two cores that nothing else uses "
            "it would need about half the CPU time; a wall time well above that means other work shared the cores "
            "(this machine is shared).\n")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "mini_reproduction.md").write_text(report.rstrip("\n") + "\n" + cost)
    shutil.copy(OUT / "summary.png", docs / "mini_reproduction.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", action="store_true", help="only build the base model and the data")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the report and figure are copied")
    args = p.parse_args(argv)
    started = time.perf_counter()
    os.chdir(ROOT)  # the experiment file's paths are relative to the checkout
    record = prepare()
    if args.prepare:
        return 0
    from sorsa.experiment import run_experiment

    result = run_experiment(str(EXPERIMENT.relative_to(ROOT)))
    wall = time.perf_counter() - started
    if result["outcomes"] and any(not o.ok for o in result["outcomes"]):
        print("[mini] some runs failed (see the report); docs/ not updated", flush=True)
        return 1
    write_docs(Path(args.docs), record, measured_cost(wall, sum(o.trained for o in result["outcomes"])))
    print(f"[mini] wrote docs/mini_reproduction.md and .png; {wall / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
