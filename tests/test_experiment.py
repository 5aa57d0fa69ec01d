"""Experiments (sorsa/experiment/): the file's schema and its one-line errors, the validation split, the dry-run
plan, and a tiny experiment (2 methods x 2 learning rates x 2 seeds on the built-in model) end to end: a failed
run is reported while the rest go on, a rerun completes it and a further rerun does nothing, a killed experiment
resumes to the same report, and the report's intervals and p-values match a recomputation from the runs'
results.json and generations.jsonl files."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from sorsa import cli as run
from sorsa.train import recipe
from sorsa.tasks.builtin import materialize_dataset
from sorsa.train.settings import RunConfig
from sorsa.tasks.data import math_validation_examples, split_validation, validation_rows
from sorsa.experiment import count_runs, load_experiment, plan_experiment, run_experiment
from sorsa.train.runs import RunDir

from test_run import call

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("train", "merge", "test", "validation_loss")


# ----------------------------------------------------------------------------- files and errors

def _copy_task(root: Path) -> tuple[Path, Path]:
    """A task the briefly pre-trained built-in model can get partly right after a few steps (its answer is a
    number of the question): 96 training rows (MetaMathQA schema) and 24 test rows (GSM-8K schema)."""
    import random

    from sorsa.tasks.builtin import ITEMS, NAMES

    files = []
    for split, n, seed in (("train", 96, 1), ("test", 24, 2)):
        rng, lines = random.Random(seed), []
        for _ in range(n):
            name, item, a = rng.choice(NAMES)[0], rng.choice(ITEMS), rng.randint(2, 9)
            question, step = f"{name} has {a} {item}. How many {item} does {name} have?", f"{name} has {a} {item}."
            row = ({"query": question, "response": f"Let's think step by step.\n{step}\nThe answer is: {a}"}
                   if split == "train" else {"question": question, "answer": f"{step}\n#### {a}"})
            lines.append(json.dumps(row) + "\n")
        files.append(root / f"copy_{split}.jsonl")
        files[-1].write_text("".join(lines))
    return files[0], files[1]


def _tiny_spec(root: Path, model_dir) -> dict:
    """2 methods x 2 learning rates x 2 seeds, 8 steps each on the copy task, tested on it and on level-2
    arithmetic (out of domain)."""
    train, test1 = _copy_task(root)
    _, test2 = materialize_dataset(root / "level2", n_train=8, n_test=24, seed=0, level=2)
    base = {"model": str(model_dir), "train_file": str(train), "split": None, "val_size": 16, "rank": 4,
            "max_steps": 8, "batch_size": 4, "accum_steps": 1, "length": 96, "mix_precision": ["fp32"],
            "save_steps": 4, "logging_steps": 1, "test_precision": "fp32", "max_new_tokens": 32,
            "valid_batch_size": 24, "run_path": str(root / "runs")}
    return {"name": "tiny", "base": base,
            "grid": {"peft": ["sorsa", "lora"], "lr": {"sorsa": [5e-3, 2e-2], "lora": [1e-2, 4e-2]}, "seed": [1, 2]},
            "select": {"keys": ["lr"], "metric": "val_loss"},
            "test": [{"name": "copy", "dataset": "gsm-8k", "file": str(test1)},
                     {"name": "level-2", "dataset": "gsm-8k", "file": str(test2)}],
            "stats": {"bootstrap": 2000, "seed": 5}}


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_experiment_file_errors_are_one_line(tmp_path, capsys, builtin_model_dir):
    good = _tiny_spec(tmp_path, builtin_model_dir)
    no_val = {**good, "base": {k: v for k, v in good["base"].items() if k != "val_size"}}
    code = {**good, "base": {**good["base"], "train_dataset": "code"}, "select": {"keys": ["lr"],
                                                                                   "metric": "val_accuracy"}}
    missing = {**good, "base": {**good["base"], "model": str(tmp_path / "no_model")}, "prepare": "make inputs"}
    cases = [({**good, "tests": []}, "unknown key(s) ['tests']"),
             ({**good, "grid": {**good["grid"], "lrr": [1]}}, "grid: unknown key(s) ['lrr']"),
             ({**good, "grid": {**good["grid"], "lr": {"sorsa": [1e-3]}}}, "gives values for ['sorsa']"),
             ({**good, "grid": {**good["grid"], "test_file": ["x"]}}, "does not change training"),
             ({**good, "grid": {**good["grid"], "rank": 4}}, "grid.rank must be a non-empty list"),
             (no_val, "select needs a validation split"),
             (code, "val_accuracy reads 'The answer is: N'"),
             ({**good, "select": {"keys": ["seed"]}}, "select.keys must list grid keys"),
             ({**good, "test": [{"dataset": "gsm8k"}]}, "test dataset 'gsm8k' is unknown"),
             ({**good, "base": {**good["base"], "rnak": 4}}, "base: unknown key(s) ['rnak']"),
             ({**good, "name": "../up"}, "name must be a plain folder name"),
             (missing, "build this experiment's inputs first: make inputs")]
    for i, (spec, message) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.yaml", spec)
        code_, err = call(["--experiment", str(path)], capsys)
        assert code_ == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
    path = _write(tmp_path / "good.yaml", good)
    code_, err = call(["--experiment", str(path), "--lr", "1e-3"], capsys)
    assert code_ == 2 and "--lr is swept by the experiment's grid" in err[0]
    code_, err = call(["--experiment", str(path), "--max-parallel", "0"], capsys)
    assert code_ == 2 and "--max-parallel 0" in err[0]
    assert not (tmp_path / "runs").exists()  # nothing was written by a refused experiment


def test_validation_split_is_fixed_disjoint_and_left_out_of_training(tmp_path, builtin_model_dir):
    import datasets

    ds = datasets.Dataset.from_list([{"query": f"q{i}", "response": f"r{i}"} for i in range(10)])
    train, val = (list(part["query"]) for part in split_validation(ds, 3))
    assert len(val) == 3 and len(train) == 7 and set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(ds["query"]) and train == sorted(train, key=lambda q: int(q[1:]))
    assert val == list(split_validation(ds, 3)[1]["query"]) == [f"q{i}" for i in validation_rows(10, 3)]
    assert len(validation_rows(8, 0.25)) == 2 and validation_rows(10, 0) == []
    for bad in (10, 0.0001):
        with pytest.raises(ValueError, match="holds out"):
            validation_rows(10, bad)
    assert RunConfig(val_size=400.0).val_size == 400 and isinstance(RunConfig(val_size=400.0).val_size, int)
    for bad in (-1, 1.5, "ten"):
        with pytest.raises(ValueError, match="val_size"):
            RunConfig(val_size=bad)
    # training reads the rest: recipe's data with val_size 16 of 96 rows
    level1, _ = materialize_dataset(tmp_path / "l1", n_train=96, n_test=8, seed=0, level=1)
    cfg = RunConfig(model=str(builtin_model_dir), train_file=str(level1), split=None, val_size=16, length=64)
    _, rows = recipe._training_data(cfg)
    _, held = recipe._training_data(cfg, validation=True)
    assert (len(rows), len(held)) == (80, 16)


def test_math_validation_examples_golden():
    rows = [{"query": "q1", "response": "step\nThe answer is: 42"},
            {"query": "q2", "response": "x\nThe answer is: 1,234."},
            {"query": "q3", "response": "The answer is: \\frac{1}{2}"},  # not a number: left out
            {"query": "q4", "response": "no cue at all 7"},
            {"query": "q5", "response": "The answer is: -3.5"}]
    out = math_validation_examples(rows)
    assert out == [{"question": "q1", "answer": "step\n#### 42"}, {"question": "q2", "answer": "x\n#### 1,234"},
                   {"question": "q5", "answer": "\n#### -3.5"}]


def test_experiment_configs_load_and_paper_dry_run(capsys):
    files = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
    assert {f.stem for f in files} >= {"mini", "llama2_7b_math", "llama2_7b_code"}
    for f in files:
        text = f.read_text()
        assert text.startswith("#") and "Launch:" in text and "Effective batch" in text, f
        exp = load_experiment(str(f))
        if f.stem.startswith("peft_"):  # PEFT's protocol (the baselines issue): its own arms, one fixed lr or a sweep
            assert [a.method for a in exp.arms] == ["sorsa", "pissa", "lora", "rslora", "dora", "olora", "milora",
                                                    "full"]
            continue
        assert [a.method for a in exp.arms] == ["sorsa", "pissa", "lora", "full"] and exp.tuned_keys == ["lr"]
    # configs/mini/<method>.yaml (one arm alone) is the experiment's run of that method at seed 1 and its choice
    mini = load_experiment(str(ROOT / "configs/experiments/mini.yaml"))
    for arm in mini.arms:
        alone = recipe.resolve_config({}, str(ROOT / "configs" / "mini" / f"{arm.method}.yaml"))
        assert (("lr", alone.lr),) in arm.combos
        assert alone.training_settings() == mini.spec(arm, (("lr", alone.lr),), 1).config.training_settings()
    paper = load_experiment(str(ROOT / "configs/experiments/llama2_7b_math.yaml"))
    assert paper.base.model == "meta-llama/Llama-2-7b-hf" and paper.base.rank == 128 and paper.seeds == [42, 43, 44]
    assert [t.dataset for t in paper.tests] == ["gsm-8k", "math", "humaneval"]
    # 4 methods x 3 lrs on seed 42, then seeds 43 and 44 at the choice: 12 + 8 trainings
    assert count_runs(paper) == {"selection": 12, "final": 12, "shared": 4, "trainings": 20, "tests": 39}
    capsys.readouterr()
    assert run.main(["--experiment", str(ROOT / "configs/experiments/llama2_7b_math.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "trainings: 20" in printed and "GPU-hours" in printed
    plan = plan_experiment(paper)
    # by hand: 99,000 rows (100k minus the 1000 held out) x 300 tokens; FLOPs per token 4N + 6N_t (adapters),
    # 6N (full), N = 6,738,415,616; at 312 TFLOP/s x 0.3
    tokens, rate = 99_000 * 300, 312e12 * 0.3
    n = 6_738_415_616
    sorsa = plan["per_arm"]["SORSA"]
    assert sorsa["hours_per_run"] == pytest.approx((4 * n + 6 * sorsa["trainable"]) * tokens / rate / 3600, rel=1e-9)
    assert plan["per_arm"]["Full FT"]["hours_per_run"] == pytest.approx(6 * n * tokens / rate / 3600, rel=1e-9)
    assert plan["per_arm"]["Full FT"]["hours_per_run"] == pytest.approx(3.56, abs=0.01)
    assert plan["gpu_hours"] == pytest.approx(sum(5 * a["hours_per_run"] for a in plan["per_arm"].values()))
    # python -m sorsa.experiment is the same command line
    out = subprocess.run([sys.executable, "-m", "sorsa.experiment", "configs/experiments/llama2_7b_code.yaml",
                          "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "trainings: 20" in out.stdout and "humaneval, gsm-8k, math" in out.stdout


# ----------------------------------------------------------------------------- a tiny experiment, end to end

def _counting(mp, calls: Counter, fail_on: dict):
    """Wrap the recipe's jobs to count calls; fail_on = {job: n}: the n-th call of that job raises."""
    for name in JOBS:
        original = getattr(recipe, name)

        def counted(cfg, _original=original, _name=name):
            calls[_name] += 1
            if fail_on.get(_name) == calls[_name]:
                raise RuntimeError(f"injected failure in {_name}")
            return _original(cfg)

        mp.setattr(recipe, name, counted)


def _csv(path: Path, drop: tuple = ()) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _report_tables(folder: Path) -> dict:
    """The report's tables without the training time, speed and peak memory (of the machine, not results)."""
    return {name: _csv(folder / name, drop=("train_seconds_mean", "tokens_per_second_mean", "peak_memory_mib_mean"))
            for name in ("report.csv", "comparisons.csv", "selection.csv", "forgetting.csv")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, builtin_model_dir):
    """The tiny experiment run three times in this process, single-threaded (as the kill test's workers): with
    one injected training failure, then again (completing it), then once more (nothing to do)."""
    root = tmp_path_factory.mktemp("experiment")
    spec = _tiny_spec(root, builtin_model_dir)
    path = _write(root / "tiny.yaml", spec)
    exp = load_experiment(str(path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {"root": root, "spec": spec, "path": path, "exp": exp, "calls": []}
    try:
        for fail_on in ({"train": 2}, {}, {}):
            calls = Counter()
            pending = [s.name for s in exp.selection_runs()
                       if not RunDir(s.config.run_path + "/" + s.name).done_with(s.config.training_settings())]
            with pytest.MonkeyPatch.context() as mp:
                _counting(mp, calls, fail_on)
                started = time.perf_counter()
                result = run_experiment(str(path), progress=False)
            out["calls"].append({"calls": calls, "pending": pending, "seconds": time.perf_counter() - started,
                                 "result": result, "report": (exp.folder / "report.md").read_text(),
                                 "tables": _report_tables(exp.folder)})
    finally:
        torch.set_num_threads(threads)
    return out


def test_tiny_experiment_end_to_end_failure_rerun_and_no_work(tiny):
    first, second, third = tiny["calls"]
    exp = tiny["exp"]
    # 1st: the second training failed; it is reported, and the seven other runs trained, validated and reported
    failed = [o for o in first["result"]["outcomes"] if not o.ok]
    assert len(failed) == 1 and "injected failure in train" in failed[0].error and failed[0].kind == "select"
    assert "## Failed runs" in first["report"] and failed[0].name in first["report"]
    assert first["calls"]["train"] >= 8 and first["seconds"] < 120
    # 2nd: only what was left is done; the report is complete
    assert second["calls"]["train"] == len(second["pending"]) <= 1
    assert all(o.ok for o in second["result"]["outcomes"]) and "## Failed runs" not in second["report"]
    for s in exp.selection_runs():
        assert RunDir(exp.runs_folder / s.name).done_with(s.config.training_settings())
    # 3rd: no training, merging, testing or validation at all, and the same report
    assert sum(third["calls"].values()) == 0 and third["pending"] == []
    assert third["tables"] == second["tables"]
    # the report: every arm with its selected lr, 2 seeds per test, the forgetting matrix with the base model's row
    rows = third["tables"]["report.csv"]
    assert [(r["arm"], r["test"], r["n_seeds"]) for r in rows] == [
        ("SORSA", "copy", "2"), ("SORSA", "level-2", "2"), ("LoRA", "copy", "2"), ("LoRA", "level-2", "2")]
    choices = third["result"]["choices"]
    for arm in exp.arms:
        chosen = [r for r in third["tables"]["selection.csv"] if r["arm"] == arm.label and r["chosen"] == "True"]
        means = {}
        for r in third["tables"]["selection.csv"]:
            if r["arm"] == arm.label:
                means.setdefault(r["setting"], []).append(float(r["value"]))
        best = min(means, key=lambda k: sum(means[k]) / len(means[k]))  # val_loss: lowest mean over the seeds
        assert {r["setting"] for r in chosen} == {best} == {f"lr={choices[arm][0][1]:g}"}
        assert next(r["selected"] for r in rows if r["arm"] == arm.label) == best
        assert int(next(r["trainable_params"] for r in rows if r["arm"] == arm.label)) in (17_464, 17_408)
    forgetting = third["tables"]["forgetting.csv"]
    assert forgetting[0]["row"].startswith("base model") and [r["row"] for r in forgetting[1:]] == ["SORSA", "LoRA"]
    for name in ("report.md", "report.csv", "summary.png", "lr_sensitivity.png", "training_curves.png",
                 "forgetting.png", "accuracy.png"):
        assert (exp.folder / name).is_file() and (exp.folder / name).stat().st_size > 100, name
    assert "## Paired comparisons" in third["report"] and "paired bootstrap over items and seeds" in third["report"]


def _chosen_runs(tables: dict) -> dict:
    """arm label -> the names of its chosen runs (one per seed)."""
    runs = {}
    for r in tables["selection.csv"]:
        if r["chosen"] == "True":
            runs.setdefault(r["arm"], []).append(r["run"])
    return runs


def _measurement(run: Path, test_file: str) -> tuple[dict, dict]:
    """(results.json, {id: correct}) of a run's measurement on `test_file`, read straight from the files."""
    for results in sorted(run.glob("eval/*/results.json")):
        r = json.loads(results.read_text())
        if r["test_file"] == test_file:
            rows = [json.loads(line) for line in (results.parent / "generations.jsonl").read_text().splitlines()]
            return r, {row["id"]: row["correct"] for row in rows[:r["total"]]}
    raise AssertionError(f"{run} has no measurement on {test_file}")


def test_tiny_report_statistics_match_a_recomputation_from_the_run_files(tiny):
    from scipy import stats

    from sorsa.tools.stats import holm, paired_bootstrap

    tables, spec, exp = tiny["calls"][-1]["tables"], tiny["spec"], tiny["exp"]
    runs = _chosen_runs(tables)
    files = {t["name"]: t["file"] for t in spec["test"]}
    nontrivial = 0
    for row in tables["report.csv"]:
        accs = [100 * _measurement(exp.runs_folder / name, files[row["test"]])[0]["accuracy"] for name in runs[row["arm"]]]
        mean, sd = sum(accs) / 2, math.sqrt(sum((a - sum(accs) / 2) ** 2 for a in accs))  # n - 1 = 1
        half = stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
        assert float(row["accuracy_mean"]) == pytest.approx(mean, abs=1e-9)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((mean - half, mean + half), abs=1e-9)
        nontrivial += half > 0
    rows = tables["comparisons.csv"]
    assert len(rows) == 2  # SORSA vs LoRA on each test
    for row in rows:
        verdicts = {arm: [_measurement(exp.runs_folder / name, files[row["test"]])[1] for name in runs[arm]]
                    for arm in (row["a"], row["b"])}
        items = sorted(verdicts[row["a"]][0])
        a = [[v[i] for i in items] for v in verdicts[row["a"]]]
        b = [[v[i] for i in items] for v in verdicts[row["b"]]]
        a_only = sum(x and not y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        b_only = sum(y and not x for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        p_mcnemar = 1.0 if a_only + b_only == 0 else stats.binomtest(a_only, a_only + b_only, 0.5).pvalue
        assert (int(row["a_only"]), int(row["b_only"])) == (a_only, b_only)
        assert float(row["p_mcnemar"]) == pytest.approx(p_mcnemar, abs=1e-12)
        diff = 100 * (sum(map(sum, a)) - sum(map(sum, b))) / (2 * len(items))
        assert float(row["diff"]) == pytest.approx(diff, abs=1e-9) and int(row["items"]) == len(items) == 24
        boot = paired_bootstrap(a, b, samples=2000, seed=5)
        assert float(row["p_bootstrap"]) == pytest.approx(boot["p"], abs=1e-12)
        assert float(row["ci_low"]) == pytest.approx(100 * boot["low"], abs=1e-9)
        nontrivial += a_only + b_only > 0
    assert [float(r["p_holm"]) for r in rows] == pytest.approx(holm([float(r["p_bootstrap"]) for r in rows]))
    assert nontrivial > 0  # the check above compared real spread, not only zeros


def _wait_until_gone(group: int, timeout: float = 30.0) -> None:
    """Wait until every process of the process group has exited. A killed multi-threaded process shows as a
    zombie while its other threads still exit, and keeps its files (and flocks) until the last one has: a zombie
    counts as gone only with one thread left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
                threads = int(fields[17])  # num_threads
            except (OSError, IndexError, ValueError):
                continue
            if int(fields[2]) == group and (fields[0] != "Z" or threads > 1):
                alive.append(proc.name)
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {alive} of group {group} outlived SIGKILL")


def test_killed_experiment_resumes_to_the_same_report(tiny, tmp_path):
    """The experiment in a subprocess with two workers, killed as soon as its first run finished; a rerun finishes
    only the rest and writes the same report as the uninterrupted runs of the fixture."""
    other = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "run.py", "--experiment", str(tiny["path"]), "--run-path", str(other),
                             "--max-parallel", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    runs = other / "tiny" / "runs"
    try:
        deadline = time.monotonic() + 240
        while not list(runs.glob("*/train_done.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers
        proc.wait()
        _wait_until_gone(proc.pid)  # a worker still exiting would still hold its run's lock
    exp = load_experiment(str(tiny["path"]), {"run_path": str(other)})
    done = [s for s in exp.selection_runs() if RunDir(runs / s.name).done_with(s.config.training_settings())]
    assert 1 <= len(done) < len(exp.selection_runs()), (len(done), proc.returncode)  # killed midway
    calls = Counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            _counting(mp, calls, {})
            result = run_experiment(str(tiny["path"]), {"run_path": str(other)}, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert all(o.ok for o in result["outcomes"]), [(o.name, o.kind, o.error) for o in result["outcomes"] if not o.ok]
    assert calls["train"] == len(exp.selection_runs()) - len(done)  # finished runs were not trained again
    assert _report_tables(exp.folder) == tiny["calls"][-1]["tables"]


def test_validation_accuracy_selects_on_greedy_answers_of_the_held_out_rows(tmp_path, builtin_model_dir):
    """select.metric val_accuracy: the held-out training rows become a GSM-8K-schema file, each run is scored on it
    greedily, and the choice is the setting with the highest accuracy."""
    spec = _tiny_spec(tmp_path, builtin_model_dir)
    spec.update(grid={"peft": ["sorsa"], "lr": [5e-3, 2e-2], "seed": [1]},
                select={"keys": ["lr"], "metric": "val_accuracy"}, test=[{**spec["test"][0], "limit": 4}])
    result = run_experiment(str(_write(tmp_path / "acc.yaml", spec)), progress=False)
    assert all(o.ok for o in result["outcomes"])
    exp = result["experiment"]
    train_rows = [json.loads(line) for line in Path(spec["base"]["train_file"]).read_text().splitlines()]
    held = [train_rows[i] for i in validation_rows(len(train_rows), 16)]
    (val_file,) = exp.folder.glob("data/validation-*.jsonl")
    val_rows = [json.loads(line) for line in val_file.read_text().splitlines()]
    assert [r["question"] for r in val_rows] == [r["query"] for r in held]  # the 16 held-out rows, numeric answers
    assert [r["answer"].rsplit("#### ", 1)[1] for r in val_rows] == [r["response"].rsplit(": ", 1)[1] for r in held]
    values = {}
    for s in exp.selection_runs():
        record = json.loads(exp.validation_record(s.name).read_text())
        measured, _ = _measurement(exp.runs_folder / s.name, str(val_file))
        assert record["metric"] == "val_accuracy" and record["value"] == measured["accuracy"]
        assert measured["total"] == record["val_rows"] == 16
        values[s.combo] = record["value"]
    assert result["choices"][exp.arms[0]] == max(values, key=values.get)  # the first of equal best ones


@pytest.mark.parametrize("dataset", ["gsm-8k", "mbpp", "glue-sst2"])
def test_find_measurement_knows_every_benchmark_the_spec_accepts(tmp_path, dataset):
    from sorsa.experiment.results import find_measurement
    from sorsa.experiment.spec import TestSet
    from sorsa.eval.measurement import RESULTS
    from sorsa.train.runs import run_dir

    train = "glue-sst2" if dataset.startswith("glue") else "metamath"
    cfg = RunConfig(name="r", run_path=str(tmp_path), model="some/model", train_dataset=train)
    test = TestSet(dataset, dataset, str(tmp_path / "test.jsonl"), None)
    assert find_measurement(cfg, test) is None  # not measured yet (and no KeyError for MBPP or GLUE)
    run = run_dir(cfg.run_path, cfg.name)
    settings = recipe.measurement_settings(cfg, dataset, str(run.merged_dir), test.file)
    out = run.eval_dir(dataset, settings)
    out.mkdir(parents=True)
    (out / RESULTS).write_text(json.dumps({"dataset": dataset, "limit": None, "settings": settings,
                                           "accuracy": 0.5, "correct": 1, "total": 2}))
    assert find_measurement(cfg, test)["accuracy"] == 0.5
    other = RunConfig(name="r", run_path=str(tmp_path), model="some/model", train_dataset=train, test_precision="fp32")
    assert find_measurement(other, test) is None  # another precision is another measurement


# ----------------------------------------------------------------------------- worker pool

def _crash_or_finish(job):
    """A worker's job for the pool test: the job named "crash" kills its own worker process (as the OOM killer
    would); any other job is still running when that happens, then finishes."""
    from sorsa.experiment.runner import Outcome

    if job.config.name == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)
    return Outcome(job.config.name, job.kind, True, log=job.log)


def test_a_dying_worker_fails_only_its_own_job(tmp_path):
    """A worker killed mid-job breaks its whole pool; the jobs it cut off are done again alone, so only the job
    that dies alone too is reported failed."""
    from types import SimpleNamespace

    from sorsa.experiment.runner import Job, execute

    jobs = [Job("select", RunConfig(name=name), str(tmp_path / f"{name}.log")) for name in ("crash", "ok")]
    started = time.perf_counter()
    outcomes = execute(SimpleNamespace(name="pool"), jobs, workers=2, progress=False, work=_crash_or_finish)
    assert sorted((o.name, o.ok) for o in outcomes) == [("crash", False), ("ok", True)], outcomes
    assert "worker died" in next(o.error for o in outcomes if not o.ok)
    assert time.perf_counter() - started < 60


# ----------------------------------------------------------------------------- selection, unit by unit

def test_choice_skips_diverged_settings_and_selection_values_filters_rows():
    """A NaN mean (a diverged run's validation loss) listed first is not chosen; when every setting diverged the
    first stays chosen. selection_values keeps the selection seeds' validated values of one arm and setting."""
    from types import SimpleNamespace

    from sorsa.experiment.results import choose, selection_values
    from sorsa.experiment.spec import Arm

    combos = ((("lr", 0.1),), (("lr", 0.01),), (("lr", 0.001),))
    arm, other = Arm("sorsa", (), combos), Arm("lora", (), combos)
    exp = SimpleNamespace(tuned_keys=["lr"], metric="val_loss", arms=[arm])

    def row(combo, value, selection=True, which=arm):
        return {"arm": which, "combo": combo, "value": value, "selection": selection}

    table = [row(combos[0], math.nan), row(combos[0], 0.1), row(combos[1], 0.7), row(combos[1], 0.5),
             row(combos[2], 0.4), row(combos[2], 0.1, selection=False), row(combos[2], None),
             row(combos[2], 0.0, which=other)]
    assert selection_values(table, arm, combos[2]) == [0.4]
    assert selection_values(table, arm, combos[1]) == [0.7, 0.5]
    assert choose(exp, table) == {arm: combos[2]}
    diverged = [row(combos[1], math.nan), row(combos[2], math.inf)]
    assert choose(exp, diverged) == {arm: combos[1]}  # the first validated one in grid order
    assert choose(exp, []) == {arm: None}


def test_grid_edge_flag_looks_at_each_tuned_key():
    from sorsa.experiment.markdown import at_grid_edge
    from sorsa.experiment.spec import Arm

    grid = [(("lr", lr), ("rank", rank)) for lr in (1e-3, 1e-4, 1e-2) for rank in (4, 8, 16)]  # lr unsorted
    arm = Arm("sorsa", (), tuple(grid))
    assert at_grid_edge(arm, (("lr", 1e-4), ("rank", 8)))  # lowest lr, though listed in the middle
    assert at_grid_edge(arm, (("lr", 1e-3), ("rank", 16)))  # middle lr, highest rank
    assert not at_grid_edge(arm, (("lr", 1e-3), ("rank", 8)))  # listed first, but inside on both keys
    single = Arm("lora", (), tuple((("lr", 1e-3), ("rank", r)) for r in (4, 8, 16)))
    assert not at_grid_edge(single, (("lr", 1e-3), ("rank", 8)))  # a key with one value has no edge
    words = Arm("lora", (), ((("target", "attn"),), (("target", "mlp"),), (("target", "all"),)))
    assert not at_grid_edge(words, (("target", "attn"),))  # values without an order have no edge


# ----------------------------------------------------------------------------- forgetting on general text

def test_text_forgetting_matches_a_recomputation_and_is_not_measured_twice(tmp_path, builtin_model_dir, monkeypatch):
    """forgetting: {text, tokens, length}: the base model's and every final run's mean cross-entropy on the text's
    first tokens; forgetting_text.csv holds the base value and each arm's mean increase over it, which a
    recomputation with transformers' own loss reproduces; a rerun measures nothing again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sorsa.tasks.builtin import resolve_builtin

    spec = _tiny_spec(tmp_path, builtin_model_dir)
    spec.update(grid={"peft": ["sorsa"], "lr": [2e-2], "seed": [1, 2]}, select={"keys": ["lr"], "metric": "val_loss"},
                test=[spec["test"][0]], forgetting={"text": "builtin:python-docs", "tokens": 256, "length": 64})
    path = _write(tmp_path / "forget.yaml", spec)
    run_experiment(str(path), progress=False)
    exp = load_experiment(str(path))
    rows = _csv(exp.folder / "forgetting_text.csv")
    assert [r["row"] for r in rows][1:] == ["SORSA"] and rows[0]["row"].startswith("base model")

    text = Path(resolve_builtin("builtin:python-docs", tmp_path / "cache")).read_text()
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:256]).view(4, 64)

    def loss_of(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():  # transformers' own shifted loss, mean over the 4 x 63 predicted tokens
            return model(input_ids=ids, labels=ids).loss.item()

    base = loss_of(builtin_model_dir)
    assert float(rows[0]["cross_entropy"]) == pytest.approx(base, rel=1e-5)
    per_run = []
    for s in exp.final_runs({a: a.combos[0] for a in exp.arms}):
        recipe.merge(s.config)
        per_run.append(loss_of(RunDir(exp.runs_folder / s.name).merged_dir))
    assert float(rows[1]["cross_entropy"]) == pytest.approx(sum(per_run) / 2, rel=1e-5)
    assert float(rows[1]["increase"]) == pytest.approx(sum(per_run) / 2 - base, rel=1e-4, abs=1e-6)
    assert float(rows[1]["ci_low"]) <= float(rows[1]["increase"]) <= float(rows[1]["ci_high"])
    assert "## Forgetting on general text" in (exp.folder / "report.md").read_text()
    # PEFT's efficiency columns: the mean of what each run's completion marker recorded
    summary = _csv(exp.folder / "report.csv")[0]
    runs = [RunDir(exp.runs_folder / s.name) for s in exp.final_runs({a: a.combos[0] for a in exp.arms})]
    sizes = [sum(f.stat().st_size for f in (r.path / "adapter").rglob("*.safetensors")) for r in runs]
    assert float(summary["saved_bytes_mean"]) == pytest.approx(sum(sizes) / 2)
    assert float(summary["peak_memory_mib_mean"]) > 100 and float(summary["tokens_per_second_mean"]) > 0
    done = [r.read_done() for r in runs]
    assert all(d["tokens_per_second"] > 0 for d in done)
    assert "## Efficiency" in (exp.folder / "report.md").read_text()

    calls = Counter()
    original = recipe.text_loss
    monkeypatch.setattr(recipe, "text_loss", lambda *a, **k: calls.update(["text_loss"]) or original(*a, **k))
    from sorsa.eval import text_loss as module

    monkeypatch.setattr(module, "mean_cross_entropy", lambda *a, **k: pytest.fail("measured again"))
    run_experiment(str(path), progress=False)
    assert calls["text_loss"] == 3  # asked for the base and both runs, each answered from its record


def test_text_cross_entropy_is_zero_change_for_an_untouched_model_and_ln_v_for_a_uniform_one(builtin_model_dir):
    """The forgetting measure where the answer is known: the same model twice changes nothing, and a model whose
    output layer is zeroed predicts uniformly, so its cross-entropy is ln(vocabulary) exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sorsa.eval.text_loss import mean_cross_entropy, text_rows

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    rows = text_rows(tokenizer, " ".join(["Tom has 3 apples and buys 4 more ."] * 40), 96, 32)
    assert rows.shape == (3, 32)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval()
    first, count = mean_cross_entropy(model, rows)
    again, _ = mean_cross_entropy(AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval(), rows, batch_size=2)
    assert count == 3 * 31 and again == pytest.approx(first, abs=1e-6)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    uniform, _ = mean_cross_entropy(model, rows)
    assert uniform == pytest.approx(math.log(model.config.vocab_size), rel=1e-6)
