"""Running an experiment: the selection phase (train and validate every tuned setting), the choice per arm, the
final phase (the chosen setting with every seed: train, validate, merge, test, analyse) and the base model's
tests. Every step skips what is already done (a run whose completion marker matches its settings is not
trained again; a measurement or validation record that exists is not redone), so an interrupted experiment
resumes. Runs go one after another in this process, or side by side in worker processes (one per GPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..train.settings import RunConfig
from ..core.fileio import atomic_write_text, jsonl_text
from ..train.runs import RunDir, run_dir
from ..core.records import settings_hash
from .results import choose, find_measurement, record_matches, selection_table, training_identity
from .spec import Experiment, TestSet, TextSample, load_experiment
from ..core.errors import UserError


@dataclass(frozen=True)
class Job:
    """One unit of work: "select" trains and validates a run; "final" also scores it on the tests (and analyses
    it); "base" scores the base model as it is."""

    kind: str
    config: RunConfig
    log: str
    tests: tuple = ()
    metric: str | None = None
    validation_record: str | None = None
    validation_file: str | None = None
    analyze: bool = False
    top_k: int | None = None
    keep_merged: bool = False
    text_sample: TextSample | None = None  # the general-text cross-entropy (forgetting) of final runs and base models


@dataclass
class Outcome:
    name: str
    kind: str
    ok: bool
    trained: bool = False
    seconds: float = 0.0
    error: str | None = None
    log: str = ""


# ----------------------------------------------------------------------------- one job (in a worker or here)

def run_job(job: Job) -> Outcome:
    """Do a job with its output in its log file; an error is caught, logged with its traceback and reported."""
    started = time.perf_counter()
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.kind} {job.config.name}", flush=True)
        try:
            trained = _do(job)
        except Exception as err:  # a failed run is reported and the rest go on
            traceback.print_exc()
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return Outcome(job.config.name, job.kind, False, seconds=time.perf_counter() - started,
                           error=f"{type(err).__name__}: {message}", log=job.log)
    return Outcome(job.config.name, job.kind, True, trained, time.perf_counter() - started, log=job.log)


def _do(job: Job) -> bool:
    if job.kind == "base":
        for test in job.tests:
            ensure_scored(job.config, test, trained=False)
        ensure_text_loss(job, trained=False)
        return False
    trained = ensure_trained(job.config)
    if job.kind == "final":  # scored first: the merged model that scoring writes then serves the validation too
        for test in job.tests:
            ensure_scored(job.config, test, trained=True)
        ensure_text_loss(job, trained=True)
        if job.analyze:
            ensure_analyzed(job.config, job.top_k)
    if job.metric:
        ensure_validated(job)
    merged = run_dir(job.config.run_path, job.config.name).merged_dir
    if not job.keep_merged and merged.is_dir():  # re-creatable with run.py --merge
        shutil.rmtree(merged)
    return trained


def ensure_trained(cfg: RunConfig) -> bool:
    """Train the run unless its completion marker matches its settings; resumes from its checkpoints when they
    come from the same settings, else starts over. Returns whether it trained."""
    from ..train import recipe

    run = run_dir(cfg.run_path, cfg.name)
    settings = cfg.training_settings()
    if run.done_with(settings):
        return False
    resume = bool(run.checkpoints()) and not run.is_done() and _saved_settings_hash(run) == settings_hash(settings)
    recipe.train(dataclasses.replace(cfg, train=True, resume=resume, overwrite=not resume))
    return True


def _saved_settings_hash(run: RunDir) -> str | None:
    try:
        return settings_hash(run.read_run_config().training_settings())
    except (OSError, ValueError):
        return None


def ensure_validated(job: Job) -> None:
    """Write the run's validation record (metric, value, the settings hash and the training it belongs to)
    unless it is there for this very training (a run retrained with the same settings gets a new record)."""
    from ..train import recipe

    cfg = job.config
    path = Path(job.validation_record)
    digest = settings_hash(cfg.training_settings())
    trained = training_identity(cfg)
    if path.is_file() and record_matches(json.loads(path.read_text()), digest, trained):
        return
    if job.metric == "val_loss":
        record = recipe.validation_loss(cfg)
        value = record["val_loss"]
    else:  # greedy generation on the held-out rows, scored as GSM-8K
        result = ensure_scored(cfg, TestSet("validation", "gsm-8k", job.validation_file, None), trained=True)
        record, value = {"val_rows": result["total"]}, result["accuracy"]
    atomic_write_text(path, json.dumps({"run": cfg.name, "settings_hash": digest, "trained": trained,
                                        "metric": job.metric, "value": value, **record}, indent=2) + "\n")


def ensure_scored(cfg: RunConfig, test: TestSet, trained: bool) -> dict:
    """The run's measurement on `test` (merging first when needed), or the one already made."""
    from ..train import recipe

    found = find_measurement(cfg, test, trained)
    if found is not None:
        return found
    if trained and not run_dir(cfg.run_path, cfg.name).merged_dir.is_dir():
        recipe.merge(cfg)
    return recipe.test(dataclasses.replace(cfg, test_dataset=test.dataset, test_file=test.file, limit=test.limit))


def ensure_text_loss(job: Job, trained: bool) -> None:
    """The general-text cross-entropy of the run (or base model) when the experiment measures forgetting; made once
    (recipe.text_loss keeps its record)."""
    if job.text_sample is not None:
        from ..train import recipe

        sample = job.text_sample
        recipe.text_loss(job.config, sample.text, sample.tokens, sample.length, trained=trained)


def ensure_analyzed(cfg: RunConfig, top_k: int | None) -> None:
    """The SVD variation analysis of the run's checkpoints (RUN/analysis.csv), unless newer than its training."""
    from ..tools.analysis import CSV_NAME, analyze_run

    run = run_dir(cfg.run_path, cfg.name)
    csv = run.path / CSV_NAME
    if not csv.is_file() or csv.stat().st_mtime < run.done_file.stat().st_mtime:
        analyze_run(run.path, progress=False, plot=False, top_k=top_k)


# ----------------------------------------------------------------------------- many jobs

def _init_worker(devices, threads: int) -> None:
    """A worker process: one GPU of its own (CUDA_VISIBLE_DEVICES, set before CUDA starts), or its share of the
    CPU cores."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
    import torch

    torch.set_num_threads(threads)


def _pool_plan(workers: int) -> tuple[list[str] | None, int, int]:
    """(the GPU of each worker, None without GPUs; the number of workers, at most one per GPU; the threads of
    each worker)."""
    import torch

    devices = None
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        workers = min(workers, len(ids))
        devices = ids[:workers]
    # OMP_NUM_THREADS, when set, decides (a run's numbers can depend on its thread count); else a share of the cores
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // workers))
    return devices, workers, threads


def _pool(workers: int, devices: list[str] | None, threads: int):
    """A spawn-context process pool of `workers`, each with one GPU of `devices` (when given) and `threads`."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    ctx = get_context("spawn")
    queue = None
    if devices is not None:
        queue = ctx.Queue()
        for device in devices:
            queue.put(device)
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(queue, threads))


def _pool_round(jobs: list[Job], workers: int, devices, threads: int, done, work) -> tuple[list[Job], list[Job]]:
    """Do `jobs` in one pool, submitting at most `workers` at a time, so that a worker that dies (and with it the
    pool) cuts off only the jobs in flight. Returns (the jobs cut off, the jobs not yet submitted); both empty when
    the pool held to the end."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    queue, flight, cut, broken = list(jobs), {}, [], False
    with _pool(workers, devices, threads) as pool:
        while True:
            while queue and not broken and len(flight) < workers:
                try:
                    future = pool.submit(work, queue[0])
                except BrokenProcessPool:  # broke since the last wait: the futures in flight say which jobs it cut
                    broken = True
                    break
                flight[future] = queue.pop(0)
            if not flight:  # (waiting on no futures would never return)
                break
            finished, _ = wait(flight, return_when=FIRST_COMPLETED)
            for future in finished:
                job = flight.pop(future)
                try:
                    done(future.result())
                except BrokenProcessPool:
                    cut.append(job)
                    broken = True
                except Exception as err:  # the job's outcome could not come back (run_job catches its own errors)
                    done(Outcome(job.config.name, job.kind, False, error=f"in its worker: {type(err).__name__}: "
                                 f"{err}", log=job.log))
    return cut, queue


def _in_workers(jobs: list[Job], workers: int, done, work) -> None:
    """Do `jobs` side by side in worker processes. A worker that dies abruptly (killed, out of memory) breaks its
    pool and every job in flight there; each of those is done again alone, in a pool of one worker with the same
    thread count and one GPU, and reported failed only if it dies again (jobs resume, so little is repeated). The
    jobs not yet started go on in a fresh pool."""
    devices, workers, threads = _pool_plan(workers)
    rest = list(jobs)
    while rest:  # each round does at least the first job it submits, so this ends
        cut, rest = _pool_round(rest, workers, devices, threads, done, work)
        for job in cut:
            if _pool_round([job], 1, devices and devices[:1], threads, done, work)[0]:
                done(Outcome(job.config.name, job.kind, False, error="worker died, also when run alone (killed, "
                             "out of memory?)", log=job.log))


def execute(exp: Experiment, jobs: list[Job], workers: int, progress: bool = True, work=run_job) -> list[Outcome]:
    """Do `jobs`, one after another here (workers 1) or side by side in worker processes; returns the outcomes.
    `work` does one job (run_job; a test gives another, importable by the workers)."""
    from tqdm.auto import tqdm

    outcomes = []
    bar = tqdm(total=len(jobs), desc=f"experiment {exp.name}", unit="run", disable=not progress or not jobs)

    def done(outcome: Outcome) -> None:
        outcomes.append(outcome)
        what = "trained" if outcome.trained else "done" if outcome.kind == "base" else "training reused"
        bar.write(f"[experiment] {outcome.kind} {outcome.name}: " + (
            f"{what}, {outcome.seconds:.0f} s" if outcome.ok else f"FAILED ({outcome.error}); log: {outcome.log}"))
        bar.update(1)

    if workers <= 1:
        for job in jobs:
            done(work(job))
    elif jobs:  # in workers even for one job: a run's numbers depend on its thread count, so keep it the same
        _in_workers(jobs, workers, done, work)
    bar.close()
    return outcomes


# ----------------------------------------------------------------------------- the experiment

def _jobs(exp: Experiment, kind: str, specs, validation_files: dict) -> list[Job]:
    return [Job(kind, s.config, str(exp.logs_folder / f"{s.name}.log"), tuple(exp.tests), exp.metric,
                str(exp.validation_record(s.name)), validation_files.get(s.name), exp.analyze, exp.analyze_top_k,
                exp.keep_merged, exp.forgetting if kind == "final" else None) for s in specs]


def _base_jobs(exp: Experiment) -> list[Job]:
    return [Job("base", cfg, str(exp.logs_folder / f"{name}.log"), tuple(exp.tests), text_sample=exp.forgetting)
            for name, cfg in exp.base_models()]


def validation_files(exp: Experiment) -> dict:
    """run name -> the GSM-8K-schema file of its validation rows (written once per training set), for
    validation accuracy; {} for other metrics."""
    from ..tasks.data import math_validation_examples
    from ..train.recipe import training_rows

    if exp.metric != "val_accuracy":
        return {}
    files = {}
    for spec in exp.all_runs():
        cfg = spec.config
        key = settings_hash({k: getattr(cfg, k) for k in ("train_dataset", "split", "train_file", "val_size")})
        path = exp.validation_file(key[:12])
        if not path.is_file():
            rows = training_rows(cfg, validation=True)
            atomic_write_text(path, jsonl_text(math_validation_examples(rows, cfg.train_dataset)))
        files[spec.name] = str(path)
    return files


def check_inputs(exp: Experiment) -> None:
    """The base models and local data files exist; else one error line that names the preparation command."""
    from ..train.loading import resolve_model_name

    hint = f"; build this experiment's inputs first: {exp.prepare}" if exp.prepare else ""
    files = {t.file for t in exp.tests}
    for _, cfg in exp.base_models():
        try:
            resolve_model_name(cfg.model, cfg.cache_path, cfg.run_path)
        except UserError as err:
            raise UserError(f"{exp.source}: {err}{hint}") from None
    for arm in exp.arms:
        files.add(exp.spec(arm, arm.combos[0], exp.seeds[0]).config.train_file)
    missing = sorted(f for f in files if f and not f.startswith("builtin:") and not Path(f).expanduser().exists())
    if missing:
        raise UserError(f"{exp.source}: data file {missing[0]} does not exist{hint}")


def run_experiment(path: str, overrides: dict | None = None, max_parallel: int | None = None,
                   progress: bool = True) -> dict:
    """Run (or resume) the experiment in the YAML file `path` and write its report into RUN_PATH/NAME/.

    overrides: run settings (flags) put on top of the file's base. max_parallel: runs side by side (none: the
    file's max_parallel). Returns {"experiment", "choices", "outcomes", "files"}."""
    from .report import write_report

    exp = load_experiment(path, overrides)
    check_inputs(exp)
    exp.folder.mkdir(parents=True, exist_ok=True)
    with RunDir(exp.folder).locked("experiment"):
        started = time.perf_counter()
        workers = max_parallel or exp.max_parallel
        files = validation_files(exp)
        outcomes = execute(exp, _jobs(exp, "select", exp.selection_runs(), files) + _base_jobs(exp), workers,
                           progress)
        choices = choose(exp, selection_table(exp))
        outcomes += execute(exp, _jobs(exp, "final", exp.final_runs(choices), files), workers, progress)
        report_files = write_report(exp, choices, outcomes, time.perf_counter() - started)
    failed = [o for o in outcomes if not o.ok]
    print(f"[experiment] {exp.name}: {sum(o.trained for o in outcomes)} runs trained, {len(failed)} failed; "
          f"report in {exp.folder / 'report.md'}")
    return {"experiment": exp, "choices": choices, "outcomes": outcomes, "files": report_files}
