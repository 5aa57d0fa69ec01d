"""run.py: the reference's flags, the config files, one-line errors for bad input, and train → resume."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sorsa import cli as run
from sorsa.core.targets import LLAMA_TARGETS
from sorsa.train.settings import RunConfig

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FLAGS = ["--seed", "-p", "--peft", "--model", "--tokenizer", "-n", "--name", "-r", "--rank", "-l", "--length",
                   "-a", "--alpha", "-g", "--gamma", "-d", "--dropout", "-t", "--train", "-T", "--test", "-m", "--merge",
                   "--train-dataset", "--split", "--test-dataset", "--test-precision", "--rwkv", "--mix-precision",
                   "--grad-cp", "--scheduler", "--warmup", "--batch-size", "--valid-batch-size", "--epochs",
                   "--accum-steps", "--accum-step", "--lr", "--wd", "--svd-cache-path", "--run-path", "--cache-path",
                   "--local"]
ADDED_FLAGS = ["--config", "--train-file", "--test-file", "--max-steps", "--save-steps", "--resume", "--svd",
               "--svd-niter", "--report-to", "--deepspeed", "--overwrite"]


def test_help_lists_every_reference_flag():
    options = {o for action in run.build_parser()._actions for o in action.option_strings}
    missing = [f for f in REFERENCE_FLAGS + ADDED_FLAGS if f not in options]
    assert not missing
    cfg = run.resolve_config(["--name", "x", "--train", "--accum-step", "16", "--mix-precision", "bf16"])
    assert cfg.accum_steps == 16 and cfg.mix_precision == ["bf16"]


def test_defaults_are_the_paper_sorsa_recipe():
    cfg = RunConfig()
    assert (cfg.lr, cfg.gamma, cfg.rank, cfg.alpha, cfg.batch_size, cfg.accum_steps, cfg.epochs) == \
        (3e-5, 4e-4, 128, None, 2, 64, 1.0)
    assert (cfg.scheduler, cfg.warmup, cfg.wd, cfg.max_grad_norm, cfg.seed, cfg.length) == ("cosine", 0.03, 0.0, 1.0, 42, 512)
    assert cfg.precision == "bf16" and "tf32" in cfg.mix_precision
    sc = cfg.sorsa_config(LLAMA_TARGETS)
    assert sc.residual_dtype == torch.bfloat16 and sc.adapter_dtype == torch.float32 and sc.scale == 1.0


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_matches_the_paper(path):
    text = path.read_text()
    assert text.startswith("#") and "Launch:" in text and "Effective batch" in text
    cfg = run.resolve_config(["--config", str(path), "--train"])
    if path.name.startswith("quickstart"):
        assert cfg.model.startswith("builtin:") and cfg.train and cfg.merge and cfg.test
        assert cfg.rwkv == ("rwkv" in path.name)
        return
    model, method, task = path.stem.rsplit("_", 2)
    assert cfg.name == path.stem and cfg.peft == method
    assert cfg.batch_size * cfg.accum_steps == 128 and cfg.epochs == 1 and cfg.length == 512 and cfg.seed == 42
    assert cfg.lr == {"sorsa": 3e-5, "pissa": 2e-5, "lora": 2e-5, "full": 2e-5}[method]
    assert cfg.rank == (128 if model == "llama2_7b" else 64) or method == "full"
    assert cfg.rwkv == model.startswith("rwkv6")
    assert cfg.alpha is None and cfg.dropout == 0.0
    assert cfg.train_dataset == {"math": "metamath", "code": "code"}[task]
    assert cfg.test_dataset == {"math": "gsm-8k", "code": "humaneval"}[task]
    if method == "sorsa":
        assert cfg.gamma == 4e-4


def call(argv, capsys):
    capsys.readouterr()  # drop what earlier calls printed
    code = run.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_bad_input_gives_one_line(tmp_path, capsys, builtin_model_dir):
    rp = ["--run-path", str(tmp_path / "runs")]
    good = ["--model", str(builtin_model_dir), "--mix-precision", "fp32"]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "cols.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "broken.jsonl").write_text(json.dumps({"query": "q", "response": "r"}) + "\n{not json\n")
    (tmp_path / "bad.yaml").write_text("rnak: 4\n")
    (tmp_path / "badlr.yaml").write_text("lr: fast\n")
    cases = [
        (["--name", "x", "--train", "--model", str(tmp_path / "nope")], "does not exist"),
        (["--name", "nothere", "--merge"], "has no finished training"),
        (["--name", "x", "--train", "-r", "0"], "rank=0"),
        (["--name", "x", "--train", *good, "--train-file", str(tmp_path / "cols.jsonl")], "missing column(s) 'query'"),
        (["--name", "x", "--train", *good, "--train-file", str(tmp_path / "empty.jsonl")], "no rows"),
        (["--name", "x", "--train", *good, "--train-file", str(tmp_path / "broken.jsonl")], "line 2"),
        (["--name", "x", "--train", *good, "--train-file", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--config", str(tmp_path / "bad.yaml"), "--name", "x", "--train"], "unknown key(s) ['rnak']"),
        (["--config", str(tmp_path / "badlr.yaml"), "--name", "x", "--train"], "lr='fast' is not a number"),
        (["--name", "../x", "--train"], "must stay inside"),
        (["--name", "x"], "nothing to do"),
        (["--name", "x", "--train", "--report-to", "comet"], "not supported here"),
    ]
    for argv, message in cases:
        code, err = call(argv + rp, capsys)
        assert code == 2, argv
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


def test_yaml_numbers_without_a_dot_are_read_as_numbers():
    import yaml

    from sorsa.train.settings import RunConfig

    values = yaml.safe_load("lr: 3e-5\nmax_steps: 1e2\n")
    assert values == {"lr": "3e-5", "max_steps": "1e2"}  # YAML 1.1 (PyYAML): strings
    cfg = RunConfig.from_mapping(values)
    assert cfg.lr == 3e-5 and cfg.max_steps == 100 and isinstance(cfg.max_steps, int)


def test_unreachable_hub_model_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    # the acceptance command exactly: the model is checked before the (hub) training data
    out = subprocess.run([sys.executable, "run.py", "--name", "x", "--train", "--model", "meta-llama/Llama-2-7b-hf",
                          "--run-path", str(tmp_path / "runs")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(lines) == 1 and "could not reach model 'meta-llama/Llama-2-7b-hf'" in lines[0] and "--model DIR" in lines[0]


def _train_argv(tmp_path, model_dir, name, *extra):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        from sorsa.tasks.builtin import materialize_dataset
        train_file, _ = materialize_dataset(tmp_path / "data", n_train=64, n_test=8, seed=0)
        shutil.copy(train_file, data)
    return ["--name", name, "--train", "--model", str(model_dir), "--train-file", str(data), "--split", "[:48]",
            "--run-path", str(tmp_path / "runs"), "-r", "4", "--lr", "2e-3", "--batch-size", "4", "--accum-steps", "2",
            "--mix-precision", "fp32", "--length", "96", "--logging-steps", "1", "--seed", "3", *extra]


def test_train_resume_equals_uninterrupted_and_finished_runs_are_kept(tmp_path, capsys, builtin_model_dir):
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "a", "--max-steps", "6", "--save-steps", "3")) == 0
    run_a = tmp_path / "runs" / "a"
    done = json.loads((run_a / "train_done.json").read_text())
    assert done["steps"] == 6 and done["first_loss"] > 0
    assert done["trainable_params"] == 4 * sum(i + o + 1 for i, o in [(128, 128)] * 4 + [(128, 256)] * 3) * 2
    log = [json.loads(line) for line in (run_a / "train_log.jsonl").read_text().splitlines()]
    assert all("ortho_loss" in r for r in log if "loss" in r)
    saved = yaml.safe_load((run_a / "config.yaml").read_text())
    assert saved["rank"] == 4 and json.loads((run_a / "env.json").read_text())["versions"]["torch"]
    # A finished run is never silently overwritten.
    code, err = call(_train_argv(tmp_path, builtin_model_dir, "a", "--max-steps", "6"), capsys)
    assert code == 2 and "has finished training" in err[0]
    # The same run, interrupted after checkpoint-3 and resumed, ends at the same adapter.
    run_b = tmp_path / "runs" / "b"
    shutil.copytree(run_a, run_b)
    for p in ("adapter", "train_done.json", "checkpoints/checkpoint-6"):
        shutil.rmtree(run_b / p) if (run_b / p).is_dir() else (run_b / p).unlink()
    code, err = call(_train_argv(tmp_path, builtin_model_dir, "b", "--max-steps", "6", "--save-steps", "3"), capsys)
    assert code == 2 and "--resume" in err[0]
    # resuming with other training settings would continue checkpoints of another run: refused, files kept
    code, err = call(_train_argv(tmp_path, builtin_model_dir, "b", "--max-steps", "6", "--save-steps", "3",
                                 "--resume", "--lr", "1e-3"), capsys)
    assert code == 2 and "other settings (lr differ" in err[0] and (run_b / "checkpoints" / "checkpoint-3").is_dir()
    assert run.main(_train_argv(tmp_path, builtin_model_dir, "b", "--max-steps", "6", "--save-steps", "3",
                                "--resume")) == 0
    a = load_file(str(run_a / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_b / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    moved = max((a[k] - a[k[:-len("U_p")] + "U_0"]).abs().max().item() for k in a if k.endswith(".U_p"))
    assert moved > 1e-4  # six steps really trained the adapter


def test_quickstart_config_end_to_end(tmp_path, builtin_model_dir):
    """configs/quickstart.yaml, shortened: train -> merge -> test on the built-in data, offline."""
    argv = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--model", str(builtin_model_dir),
            "--run-path", str(tmp_path / "runs"), "--cache-path", str(tmp_path / "cache"), "--max-steps", "40",
            "--logging-steps", "5", "--limit", "16"]
    assert run.main(argv) == 0
    run_dir = tmp_path / "runs" / "quickstart"
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0]
    results = json.loads((run_dir / "eval" / "gsm-8k" / "results.json").read_text())
    assert results["total"] == 16 and results["correct"] == round(results["accuracy"] * 16)
    rows = [json.loads(line) for line in (run_dir / "eval" / "gsm-8k" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and sum(r["correct"] for r in rows) == results["correct"]
    assert (run_dir / "merged" / "model.safetensors").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
    # The quickstart re-runs from scratch (overwrite: true in the file); a rerun of test alone reuses generations.
    assert run.main(["--name", "quickstart", "--test", "--run-path", str(tmp_path / "runs"),
                     "--cache-path", str(tmp_path / "cache")]) == 0
    again = json.loads((run_dir / "eval" / "gsm-8k" / "results.json").read_text())
    assert again["reused_generations"] == 16 and again["correct"] == results["correct"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*_7b_*.yaml")), ids=lambda p: p.name)
def test_paper_configs_use_the_reference_loss_normalisation(path):
    cfg = run.resolve_config(["--config", str(path), "--train"])
    assert cfg.loss_normalization == "reference" and cfg.alpha_init == "tail"
    assert RunConfig().loss_normalization == "reference"  # run.py's default is the paper recipe too


def test_validation_loss_reads_the_merged_model_when_there_is_one(tmp_path, builtin_model_dir, monkeypatch):
    """The validation loss of a trained run is the same whether the adapter is folded in memory or read from
    RUN/merged (which --merge wrote), so an experiment's final runs do not load and merge the base twice."""
    from sorsa.train import recipe

    argv = _train_argv(tmp_path, builtin_model_dir, "v", "--max-steps", "3", "--val-size", "8")
    assert run.main(argv) == 0
    cfg = run.resolve_config(argv)
    in_memory = recipe.validation_loss(cfg)
    recipe.merge(cfg)

    def no_second_merge(*args):
        raise AssertionError("the base model was loaded and merged again")

    monkeypatch.setattr(recipe, "merged_model", no_second_merge)
    from_disk = recipe.validation_loss(cfg)
    assert in_memory["val_rows"] == from_disk["val_rows"] == 8 and in_memory["val_tokens"] > 0
    assert from_disk["val_loss"] == pytest.approx(in_memory["val_loss"], rel=1e-6)
    assert 0 < in_memory["val_loss"] < 10
