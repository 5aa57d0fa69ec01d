"""The run directory (sorsa/train/runs.py) and the recipe API: one lock per run, a completion marker keyed by the
settings, evaluation outputs keyed by what they measured, and jobs that stop with an error change nothing."""
import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sorsa import cli as run
from sorsa.eval.runner import evaluate
from sorsa.train import recipe
from sorsa.tasks.builtin import materialize_dataset
from sorsa.train.settings import JobOptions, RunConfig
from sorsa.train.runs import RunDir, RunLockedError
from sorsa.core.records import settings_hash

from test_run import _train_argv, call

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run's lock and keeps it until killed."""
    code = ("import sys, time; from sorsa.train.runs import RunDir\n"
            f"with RunDir({str(run_dir)!r}).locked('train'):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_job_on_a_running_run_is_refused_and_a_dead_holder_does_not_block(tmp_path, capsys,
                                                                                      builtin_model_dir):
    argv = _train_argv(tmp_path, builtin_model_dir, "busy", "--max-steps", "2")
    holder = _hold_lock(tmp_path / "runs" / "busy")
    try:
        code, err = call(argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert f"in use by process {holder.pid}" in err[0] and "train since" in err[0]
        assert not (tmp_path / "runs" / "busy" / "config.yaml").exists()  # the refused job wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = tmp_path / "runs" / "busy" / ".lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the killed holder's record is still there
    code, err = call(argv, capsys)
    assert code == 0 and RunDir(tmp_path / "runs" / "busy").is_done()
    # in one process the jobs take the lock in turn (re-entrant), and a library caller gets the error type
    with RunDir(tmp_path / "runs" / "busy").locked("merge"), RunDir(tmp_path / "runs" / "busy").locked("test"):
        pass
    holder = _hold_lock(tmp_path / "runs" / "busy")
    try:
        cfg = run.resolve_config(["--name", "busy", "--merge", "--run-path", str(tmp_path / "runs")])
        with pytest.raises(RunLockedError, match=str(holder.pid)):
            recipe.merge(cfg)
    finally:
        holder.kill()
        holder.wait()


def test_completion_marker_hashes_the_training_settings(tmp_path, builtin_model_dir):
    cfg = run.resolve_config(_train_argv(tmp_path, builtin_model_dir, "marked", "--max-steps", "2"))
    summary = recipe.train(cfg)
    run_dir = RunDir(tmp_path / "runs" / "marked")
    done = run_dir.read_done()
    assert done["steps"] == summary["steps"] == 2
    assert done["settings_hash"] == settings_hash(cfg.training_settings())
    assert run_dir.done_with(cfg.training_settings())
    # a setting that changes the result breaks the match; one that does not (logging, paths, test) keeps it
    assert not run_dir.done_with(dataclasses.replace(cfg, lr=cfg.lr * 2).training_settings())
    assert not run_dir.done_with(dataclasses.replace(cfg, seed=cfg.seed + 1).training_settings())
    assert run_dir.done_with(dataclasses.replace(cfg, logging_steps=7, test_dataset="math", save_steps=1,
                                                 run_path="elsewhere").training_settings())


def test_scoring_on_another_test_file_keeps_both_and_a_refused_call_changes_nothing(tmp_path, capsys,
                                                                                    builtin_model_dir):
    rp = ["--run-path", str(tmp_path / "runs")]
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "scored", "--max-steps", "2", "--merge")) == 0
    _, first_file = materialize_dataset(tmp_path / "d1", n_train=8, n_test=6, seed=1)
    _, second_file = materialize_dataset(tmp_path / "d2", n_train=8, n_test=5, seed=2)
    gen = ["--max-new-tokens", "8", "--test-precision", "fp32", "--backend", "hf"]
    assert run.main(["--name", "scored", "--test", "--test-file", str(first_file), *gen, *rp]) == 0
    eval_root = tmp_path / "runs" / "scored" / "eval"
    first = json.loads((eval_root / "gsm-8k" / "results.json").read_text())
    assert first["total"] == 6
    assert run.main(["--name", "scored", "--test", "--test-file", str(second_file), *gen, *rp]) == 0
    folders = sorted(p.name for p in eval_root.iterdir())
    assert len(folders) == 2 and folders[0] == "gsm-8k" and folders[1].startswith("gsm-8k-")
    second = json.loads((eval_root / folders[1] / "results.json").read_text())
    assert second["total"] == 5 and second["test_file"] == str(second_file)
    assert json.loads((eval_root / "gsm-8k" / "results.json").read_text()) == first  # kept as it was
    # scoring the first file again reuses its folder and its generations
    assert run.main(["--name", "scored", "--test", "--test-file", str(first_file), *gen, *rp]) == 0
    assert json.loads((eval_root / "gsm-8k" / "results.json").read_text())["reused_generations"] == 6
    # the report lists both measurements
    assert run.main(["--report", "scored", *rp, "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| scored | gsm-8k | eval/gsm-8k | {first_file} | 6 |" in md
    assert f"| scored | gsm-8k | eval/{folders[1]} | {second_file} | 5 |" in md
    # a call that stops with an error leaves every earlier file as it was, and names only CLI actions
    before = _snapshot(tmp_path / "runs" / "scored")
    code, err = call(["--name", "scored", "--test", "--test-file", str(tmp_path / "missing.jsonl"), *gen, *rp],
                     capsys)
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    assert _snapshot(tmp_path / "runs" / "scored") == before
    # the library refuses to mix generations made with other settings, and changes nothing either
    with pytest.raises(ValueError, match="other settings"):
        evaluate("gsm-8k", eval_root / "gsm-8k", lambda prompts: ["x"] * len(prompts), test_file=first_file,
                 settings={"model": "another"}, progress=False)
    assert _snapshot(tmp_path / "runs" / "scored") == before
    # --overwrite with a broken training file stops before the finished run is touched
    code, err = call(_train_argv(tmp_path, builtin_model_dir, "scored", "--overwrite", "--train-file",
                                 str(tmp_path / "missing.jsonl")), capsys)
    assert code == 2 and "does not exist" in err[0]
    assert _snapshot(tmp_path / "runs" / "scored") == before


def test_every_flag_and_its_default_come_from_the_settings_dataclasses():
    parser = run.build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for cls in (RunConfig, JobOptions):
        for f in dataclasses.fields(cls):
            action = by_dest[f.name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert f"(default: {run._show(default)})" in action.help, f.name
            assert f.metadata["help"] in action.help
            if f.metadata["choices"]:
                assert list(action.choices) == list(f.metadata["choices"]), f.name
    help_text = parser.format_help()
    assert "(default: 0.0004)" in help_text and "(default: meta-llama/Llama-2-7b-hf)" in help_text
    # a flag that is not given does not override a config file
    assert run.parse(["--name", "x"])[0] == {"name": "x"}


def _code_strings(path: Path) -> list[str]:
    """The string literals of a module's code (docstrings left out)."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_run_py_is_glue_only_and_run_files_have_one_owner():
    text = (ROOT / "run.py").read_text()
    assert len(text.splitlines()) <= 250
    assert "Trainer" not in text and "from_pretrained" not in text  # the recipe lives in sorsa.recipe
    # the run folder's names are runs.py's; a measurement folder's (results.json, generation_settings.json) are
    # eval/measurement.py's, which runs.py asks
    owners = {"runs.py": ("train_done.json", "train_log.jsonl", "env.json", "config.yaml"),
              "measurement.py": ("results.json", "generation_settings.json")}
    for module in [ROOT / "run.py", *(ROOT / "sorsa").rglob("*.py")]:
        for literal in _code_strings(module):
            for owner, names in owners.items():
                for name in names:
                    assert module.name == owner or name not in literal, (module, name, literal)


def test_a_checkpoint_cut_off_while_saving_is_not_resumed_from(tmp_path, builtin_model_dir):
    """A process killed while the Trainer writes checkpoint-4 leaves it without trainer_state.json (the last file
    written). Resuming from it would restart the step count over its weights; the run resumes from checkpoint-2
    instead and ends at the uninterrupted run's adapter."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from sorsa.train.runs import CHECKPOINT_COMPLETE
    from transformers.trainer import TRAINER_STATE_NAME

    assert CHECKPOINT_COMPLETE == TRAINER_STATE_NAME  # the file transformers writes last
    steps = ("--max-steps", "6", "--save-steps", "2")
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "a", *steps)) == 0
    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    shutil.copytree(run_a, run_b)
    for p in ("adapter", "train_done.json", "checkpoints/checkpoint-6"):
        shutil.rmtree(run_b / p) if (run_b / p).is_dir() else (run_b / p).unlink()
    (run_b / "checkpoints" / "checkpoint-4" / TRAINER_STATE_NAME).unlink()  # cut off mid-save
    assert [s for s, _ in RunDir(run_b).checkpoints()] == [2]
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "b", *steps, "--resume")) == 0
    assert json.loads((run_b / "train_done.json").read_text())["steps"] == 6
    a = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_a_run_name_is_looked_up_under_the_run_path_before_the_working_directory(tmp_path, monkeypatch):
    """--analyze sorsa from the checkout: the run RUN_PATH/sorsa, not the package folder ./sorsa."""
    from types import SimpleNamespace

    from sorsa.train.runs import find_runs

    monkeypatch.chdir(ROOT)
    (tmp_path / "sorsa").mkdir()
    (tmp_path / "sorsa" / "config.yaml").write_text("name: sorsa\n")
    found = find_runs(["sorsa"], SimpleNamespace(run_path=str(tmp_path), name=None))
    assert [r.path for r in found] == [tmp_path / "sorsa"]
