"""SORSA toolkit command line: train, merge and test a named run under --run-path (default ./runs). The same
command is `python run.py ...` in a checkout and `sorsa-run ...` where the package is installed.

    python run.py --config configs/quickstart.yaml                 # the offline default: train, merge, test
    python run.py -n llama2_sorsa -p sorsa --model meta-llama/Llama-2-7b-hf -r 128 --train --merge --test
    python run.py -n llama2_sorsa --test --test-dataset math         # score a finished run on another benchmark
    python run.py --test --model path/to/any/model --test-dataset gsm-8k

Settings resolve as: defaults (the paper's SORSA recipe) < the run's saved config (merge/test of an
existing run) < --config FILE.yaml < command-line flags. Every flag is a field of sorsa.train.settings.RunConfig
(or JobOptions), with its help, choices and default declared there; the jobs are sorsa.train.recipe's, the
reports and plans sorsa.tools'. Input errors (sorsa.core.errors.UserError) end as one `error:` line and exit
status 2; anything else keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from .core.errors import UserError
from .train.settings import EVAL, JOBS, MODEL, OPTIM, PATHS, JobOptions, RunConfig

# Exit status of a command that stopped on bad input (argparse uses 2 for bad flags too).
USER_ERROR_EXIT = 2


# ----------------------------------------------------------------------------- arguments

def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _add_fields(parser: argparse.ArgumentParser, cls, groups: dict) -> None:
    """One flag per field of the dataclass `cls`, its type, choices, help and default from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        kinds = [typing.get_origin(k) or k for k in kinds if k is not type(None)]
        kw = {"dest": f.name, "help": f"{meta['help']} (default: {_show(default)})"}
        if kinds[0] is bool:
            kw["action"] = argparse.BooleanOptionalAction  # --x / --no-x: a flag can switch off a config's setting
        elif meta["append"]:
            kw.update(action="append", choices=meta["choices"])
        else:
            kw.update(type=str if kinds[0] is list else kinds[0], choices=meta["choices"])
            if kinds[0] is list:
                kw["nargs"] = meta["nargs"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        shorts = [x for x in meta["flags"] if not x.startswith("--")]
        longs = [x for x in meta["flags"] if x.startswith("--")]
        group = meta["group"]
        if group and group not in groups:
            groups[group] = parser.add_argument_group(group)
        (groups[group] if group else parser).add_argument(*shorts, "--" + f.name.replace("_", "-"), *longs, **kw)


def build_parser() -> argparse.ArgumentParser:
    # argument_default=SUPPRESS: a flag that was not given does not override the config file
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the groups in the order --help shows them
    groups = {g: parser.add_argument_group(g) for g in (JOBS, MODEL, OPTIM, EVAL, PATHS)}
    _add_fields(parser, JobOptions, groups)
    _add_fields(parser, RunConfig, groups)
    # the `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def parse(argv: list[str] | None) -> tuple[dict, JobOptions]:
    """The run settings given as flags, and the job options (with their defaults)."""
    given = vars(build_parser().parse_args(argv))
    given.pop("local_rank", None)
    job_keys = {f.name for f in dataclasses.fields(JobOptions)}
    jobs = JobOptions(**{k: v for k, v in given.items() if k in job_keys})
    if jobs.gpus is not None and jobs.gpus < 1:
        raise UserError(f"--gpus {jobs.gpus}: give a number of GPUs >= 1")
    return {k: v for k, v in given.items() if k not in job_keys}, jobs


def resolve_config(argv: list[str] | None = None, require_action: bool = True) -> RunConfig:
    """The RunConfig of a command line: defaults < saved run config < --config file < flags."""
    from .train import recipe

    overrides, jobs = parse(argv)
    return recipe.resolve_config(overrides, jobs.config, require_action=require_action)


# ----------------------------------------------------------------------------- main

def dispatch(overrides: dict, jobs: JobOptions) -> None:
    """Run the jobs of one command line: an experiment, a plan, or train / merge / test, then reports."""
    from .train import recipe

    if jobs.experiment:  # a grid of runs, selection, seeds and statistics (sorsa/experiment/)
        from .experiment import experiment_job

        experiment_job(jobs.experiment, overrides, jobs.dry_run, jobs.max_parallel, jobs.gpus or 1)
        return
    if jobs.dry_run:  # a plan of the training run: --train is implied
        from .tools.planner import dry_run

        dry_run(recipe.resolve_config({"train": True, **overrides}, jobs.config),
                jobs.gpus or int(os.environ.get("WORLD_SIZE", "1")))
        return
    reporting = jobs.analyze is not None or jobs.report is not None
    cfg = recipe.resolve_config(overrides, jobs.config, require_action=not reporting)
    if cfg.train:
        recipe.train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under a multi-process launcher, merge, test and reports run once, on the main process
    if cfg.merge:
        recipe.merge(cfg)
    if cfg.test:
        recipe.test(cfg)
    if jobs.analyze is not None:
        from .tools.analysis import analyze

        analyze(cfg, jobs.analyze, jobs.out, jobs.analysis_top_k)
    if jobs.report is not None:
        from .tools.report import report_runs

        report_runs(cfg, jobs.report, jobs.out)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when every job finished, USER_ERROR_EXIT with one `error:` line on bad input (set
    SORSA_DEBUG=1 for its traceback). Any other exception is a bug and propagates with its traceback."""
    quiet_third_party()
    try:
        overrides, jobs = parse(sys.argv[1:] if argv is None else list(argv))
        dispatch(overrides, jobs)
    except UserError as err:
        if os.environ.get("SORSA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


def quiet_third_party() -> None:
    """Hide deprecation chatter that says nothing a user should act on: transformers 5 deprecates
    `is_gradient_checkpointing`, which peft still calls (the import-time notes of bitsandbytes and `kernels` are
    silenced by `import sorsa`)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def entry() -> None:
    """The console script (`sorsa-run`) and `python run.py`."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Two-rank gloo runs sometimes abort at interpreter exit ("terminate called without an
        # active exception"); flushing and leaving at once avoids it.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
