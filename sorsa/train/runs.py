"""The run directory RUN_PATH/NAME: its layout and file names, the readers and writers of its records, the
completion marker that says which settings a finished run was trained with, and the lock a job holds on it.

    RUN/config.yaml        the resolved settings          RUN/adapter/       the trained adapter (SORSA, LoRA, PiSSA)
    RUN/env.json           versions, git commit, argv     RUN/model/         the trained model (full fine-tuning)
    RUN/train_log.jsonl    the Trainer's log history      RUN/checkpoints/   checkpoint-N/ (adapter-only for adapters)
    RUN/train_done.json    the completion marker          RUN/merged/        a plain Hugging Face checkpoint
    RUN/eval/<key>/        generations.jsonl, results.json and generation_settings.json of one measurement
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..core.errors import MissingFileError, UserError
from ..core.fileio import atomic_write_text, jsonl_text, parse_json_lines
from ..core.records import git_commit, package_versions, settings_hash
from ..eval import measurement

CONFIG = "config.yaml"
ENV = "env.json"
TRAIN_LOG = "train_log.jsonl"
TRAIN_DONE = "train_done.json"
LOCK = ".lock"
# The last file the Trainer writes into a checkpoint (transformers' TRAINER_STATE_NAME): a checkpoint without it
# was cut off while being saved, and resuming from it would restart the step count from 0 over its weights.
CHECKPOINT_COMPLETE = "trainer_state.json"
# Sub-directories that training (re)creates; --overwrite removes them.
TEXT_LOSS = "text_loss"  # RUN/text_loss/<settings hash>.json: cross-entropy on a general-text sample (forgetting)
TRAINING_OUTPUTS = ("checkpoints", "adapter", "pissa_init", "merged", "eval", "lora_export", "model", TEXT_LOSS)


class RunLockedError(UserError):
    """Another live process is using the run directory."""


def run_dir(run_path: str | os.PathLike, name: str | None) -> "RunDir":
    """RUN_PATH/NAME, refusing a missing name or one that escapes RUN_PATH."""
    if not name:
        raise UserError("--name is required (the run directory is RUN_PATH/NAME)")
    root = Path(run_path).resolve()
    path = (root / name).resolve()
    if path == root or root not in path.parents:
        raise UserError(f"--name {name!r} must stay inside --run-path {run_path}; use a plain name")
    return RunDir(path)


def find_runs(names: list[str], cfg) -> list[RunDir]:
    """Run directories from names under RUN_PATH or paths (--analyze, --report); no names: the run of cfg.name."""
    if not names:
        if not cfg.name:
            raise UserError("--analyze / --report without a RUN need --name (or give run names or directories)")
        names = [cfg.name]
    found = []
    for name in names:
        run = run_dir(cfg.run_path, name)
        if not run.is_run() and Path(name).is_dir():  # a run under RUN_PATH first: a folder "sorsa" may be the package
            run = RunDir(name)
        run.read_config()  # not a run directory: one error saying so
        found.append(run)
    return found


class RunDir:
    """One run directory (see the module docstring); every path and record of a run goes through here."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------ paths
    config_file = property(lambda self: self.path / CONFIG)
    env_file = property(lambda self: self.path / ENV)
    train_log_file = property(lambda self: self.path / TRAIN_LOG)
    done_file = property(lambda self: self.path / TRAIN_DONE)
    adapter_dir = property(lambda self: self.path / "adapter")
    model_dir = property(lambda self: self.path / "model")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    merged_dir = property(lambda self: self.path / "merged")
    lora_export_dir = property(lambda self: self.path / "lora_export")
    pissa_init_dir = property(lambda self: self.path / "pissa_init")
    eval_root = property(lambda self: self.path / "eval")

    def trained_dir(self, method) -> Path:
        """Where training leaves its result (a sorsa.methods.Method's result_dir): RUN/adapter or RUN/model."""
        return self.path / method.result_dir

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, RUN/checkpoints/checkpoint-N) of every complete checkpoint, in step order (one that a killed
        process left half-written is skipped, so a resume starts from the one before it)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(int(d.name.split("-")[-1]), d) for d in self.checkpoints_dir.glob("checkpoint-*")
                 if d.name.split("-")[-1].isdigit() and (d / CHECKPOINT_COMPLETE).is_file()]
        return sorted(found)

    def is_run(self) -> bool:
        return self.config_file.is_file()

    # ------------------------------------------------------------------ records
    def read_config(self) -> dict:
        """The resolved settings a run was trained (or tested) with."""
        from .settings import load_yaml

        if not self.config_file.is_file():
            raise MissingFileError(f"{self.path} is not a run directory (no {CONFIG}); train it with run.py first")
        return load_yaml(self.config_file)

    def read_run_config(self):
        """The saved settings as a RunConfig (keys this version does not know are ignored, missing ones take
        their defaults)."""
        from .settings import RunConfig

        saved = self.read_config()
        return RunConfig.from_mapping({k: v for k, v in saved.items() if k in RunConfig.keys()},
                                      source=str(self.config_file))

    def write_records(self, settings: dict, argv: list[str] | None = None) -> None:
        """config.yaml (the resolved settings) and env.json (package versions, git commit, command line)."""
        import yaml

        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_file, yaml.safe_dump(settings, sort_keys=False))
        env = {"versions": package_versions(), "git_commit": git_commit(), "python": sys.version.split()[0],
               "argv": list(sys.argv if argv is None else argv)}
        atomic_write_text(self.env_file, json.dumps(env, indent=2) + "\n")

    def write_train_log(self, history: list[dict]) -> None:
        atomic_write_text(self.train_log_file, jsonl_text(history))

    def read_train_log(self) -> list[dict]:
        """The per-step records of train_log.jsonl that carry a training loss (the Trainer's log history)."""
        if not self.train_log_file.is_file():
            return []
        rows = parse_json_lines(self.train_log_file.read_text(), str(self.train_log_file))
        return [r for _, r in rows if isinstance(r, dict) and "loss" in r and "step" in r]

    # ------------------------------------------------------------------ completion marker
    def mark_done(self, summary: dict, training_settings: dict) -> None:
        """Write train_done.json: the summary plus the hash of the settings that decided the result."""
        record = {**summary, "settings_hash": settings_hash(training_settings)}
        atomic_write_text(self.done_file, json.dumps(record, indent=2) + "\n")

    def is_done(self) -> bool:
        return self.done_file.is_file()

    def read_done(self) -> dict:
        return json.loads(self.done_file.read_text()) if self.done_file.is_file() else {}

    def done_with(self, training_settings: dict) -> bool:
        """True when training finished with exactly these settings (an experiment then skips the run)."""
        return self.read_done().get("settings_hash") == settings_hash(training_settings)

    def clear_training(self) -> None:
        """Remove everything training (re)creates, for --overwrite."""
        import shutil

        for sub in TRAINING_OUTPUTS:
            shutil.rmtree(self.path / sub, ignore_errors=True)
        self.done_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ evaluation outputs
    def eval_dir(self, dataset: str, measure: dict) -> Path:
        """The folder of one measurement of `dataset` with the settings `measure` (sorsa.eval.measurement)."""
        return measurement.Measurement(dataset, measure).folder(self.eval_root)

    def text_loss_file(self, settings: dict) -> Path:
        """The record of one general-text cross-entropy measurement (sorsa.eval.text_loss), keyed by its settings."""
        return self.path / TEXT_LOSS / f"{settings_hash(settings)[:16]}.json"

    def eval_results(self) -> list[dict]:
        """Every results.json under eval/, each with "eval_dir" (its folder name) added, in folder order."""
        return measurement.read_results(self.eval_root)

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def locked(self, job: str):
        """Hold the run's lock while a job writes into it. A second process gets a RunLockedError naming the
        holder. The lock is the kernel's (flock), so one left by a killed process is released with it."""
        key = str(self.path.resolve())
        if key in _HELD:  # this process already holds it (train then merge then test)
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        handle = _acquire(self.path / LOCK, self.name, job)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            _release(handle)
            if created and [p.name for p in self.path.iterdir()] == [LOCK]:  # a job refused before writing anything
                (self.path / LOCK).unlink(missing_ok=True)
                self.path.rmdir()


_HELD: dict[str, int] = {}


def _acquire(path: Path, name: str, job: str):
    import fcntl

    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        handle.close()
        since = time.strftime("%H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
        raise RunLockedError(f"run {name!r} is in use by process {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')} ({holder.get('job', '?')} since {since}: "
                             f"{holder.get('command', '?')}); wait for it to finish, or stop that process, "
                             "or use another --name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job, "since": time.time(),
                             "command": " ".join(sys.argv)[:300]}))
    handle.flush()
    return handle


def _release(handle) -> None:
    import fcntl

    handle.truncate(0)  # an empty lock file: nobody holds the run
    handle.flush()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
