"""Experiments: a grid of runs from one YAML file, tuned per method on a validation split, repeated over seeds,
scored on in- and out-of-domain tests, and reported with confidence intervals, paired tests between methods,
learning-rate sensitivity, training curves and the forgetting matrix (README, "Experiments").

    python run.py --experiment configs/experiments/mini.yaml [--max-parallel N] [--dry-run]
    sorsa-run --experiment configs/experiments/mini.yaml               # the same, where the package is installed

    from sorsa.experiment import run_experiment
    result = run_experiment("configs/experiments/mini.yaml")   # RUN_PATH/NAME/report.md, report.csv, *.png
"""
from .plan import count_runs, plan_experiment
from .runner import run_experiment
from .spec import Experiment, TestSet, load_experiment
from ..core.errors import UserError

__all__ = ["Experiment", "TestSet", "count_runs", "experiment_job", "load_experiment", "plan_experiment",
           "run_experiment"]


def experiment_job(path: str, overrides: dict, dry_run: bool = False, max_parallel: int | None = None,
                   gpus: int = 1) -> dict:
    """run.py's --experiment: the plan with `dry_run`, else the experiment itself."""
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel {max_parallel}: give a number of runs >= 1")
    if dry_run:
        return plan_experiment(load_experiment(path, overrides), gpus)
    return run_experiment(path, overrides, max_parallel)
