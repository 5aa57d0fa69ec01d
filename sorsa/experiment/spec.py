"""The experiment file (YAML): its schema, checked key by key (an unknown key is an error naming it), and what it
expands to: arms (a method with its fixed grid values), the runs of the selection phase and of the final phase,
each an ordinary RunConfig under EXPERIMENT/runs/, and the experiment folder's layout.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import METHODS, method_label
from ..train.settings import TEST_DATASETS, RunConfig, load_yaml
from ..core.errors import UserError

KEYS = ("name", "description", "prepare", "base", "grid", "select", "test", "forgetting", "analyze", "stats", "plan",
        "max_parallel", "keep_merged")
# What each top-level key holds (docs/experiment_schema.md is written from these by scripts/gen_docs.py)
KEY_HELP = {
    "name": "the experiment's folder name under the run path (letters, digits, . _ -)",
    "description": "free text, shown at the top of the report",
    "prepare": "the command that builds the experiment's inputs (named in the error when one is missing)",
    "base": "the run settings every run starts from: a run config file's path, or a mapping of settings",
    "grid": "`peft` (the methods), the tuned settings and `seed`, each a list or a mapping from method to list",
    "select": "how each arm's setting is chosen: the tuned `keys`, the validation `metric`, the selection `seeds`",
    "test": "the tests every final run and the base model are scored on: benchmark names or mappings",
    "forgetting": "the cross-entropy on a general-text sample, base vs every final run (true for the defaults)",
    "analyze": "the SVD analysis of the final runs (true, or `top_k`)",
    "stats": "the report's statistics: interval confidence, bootstrap samples and seed",
    "plan": "the --dry-run's GPU-hour assumptions",
    "max_parallel": "runs side by side (worker processes; one GPU each where there are GPUs)",
    "keep_merged": "keep each final run's merged model (true) or delete it after scoring (false, the default)",
}
SELECT_KEYS = ("keys", "metric", "seeds")
# The validation metrics and how the best value is picked.
METRICS = {"val_loss": min, "val_accuracy": max}
TEST_KEYS = ("name", "dataset", "file", "limit")
STATS_DEFAULTS = {"confidence": 0.95, "bootstrap": 10000, "seed": 0}
PLAN_KEYS = ("train_examples", "tokens_per_example", "gpu_tflops", "utilization")
ANALYZE_KEYS = ("top_k",)
FORGETTING_DEFAULTS = {"text": "builtin:python-docs", "tokens": 8192, "length": 256}
# What the experiment decides for each of its runs; in `base` (a run config file, say) these are ignored.
RUN_OWNED = ("name", "train", "merge", "test", "overwrite", "resume")
# The experiment folder RUN_PATH/NAME/: every name in it is spelled here.
RUNS, VALIDATION, LOGS, DATA = "runs", "validation", "logs", "data"


@dataclass(frozen=True)
class TestSet:
    """One test that every final run, and the base model, is scored on (a benchmark, optionally a local file)."""

    name: str
    dataset: str
    file: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class TextSample:
    """Forgetting as PEFT measures it: the cross-entropy on the first `tokens` tokens of `text` (a file or a builtin:
    name), in rows of `length`, of the base model and of every final run (sorsa.eval.text_loss)."""

    text: str
    tokens: int
    length: int


@dataclass(frozen=True)
class Arm:
    """A method with its fixed grid values (the grid keys that are neither tuned nor the seed)."""

    method: str
    fixed: tuple  # ((key, value), ...)
    combos: tuple  # the tuned settings to choose from: ((key, value), ...) each

    @property
    def label(self) -> str:
        name = method_label(self.method)
        return name + (f" ({', '.join(f'{k}={show(v)}' for k, v in self.fixed)})" if self.fixed else "")


@dataclass(frozen=True)
class RunSpec:
    """One run of the experiment: its arm, tuned values and seed, and its RunConfig."""

    arm: Arm
    combo: tuple
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class Experiment:
    """A loaded experiment file (see the README's "Experiments" section for the schema)."""

    name: str
    source: str
    base: RunConfig  # the settings every run starts from (base file < inline base < flags)
    base_file: str | None
    base_values: dict
    grid: dict
    methods: list
    seeds: list
    tuned_keys: list
    metric: str | None
    select_seeds: list
    tests: list
    description: str = ""
    prepare: str | None = None
    analyze: bool = False
    analyze_top_k: int | None = None
    stats: dict = field(default_factory=lambda: dict(STATS_DEFAULTS))
    plan: dict = field(default_factory=dict)
    max_parallel: int = 1
    keep_merged: bool = False
    forgetting: TextSample | None = None
    arms: list = field(default_factory=list)
    _specs: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ the folder
    @property
    def folder(self) -> Path:
        return Path(self.base.run_path) / self.name

    runs_folder = property(lambda self: self.folder / RUNS)
    logs_folder = property(lambda self: self.folder / LOGS)

    def validation_record(self, run_name: str) -> Path:
        return self.folder / VALIDATION / f"{run_name}.json"

    def validation_file(self, key: str) -> Path:
        """The GSM-8K-schema file of the validation rows of one training set (for validation accuracy)."""
        return self.folder / DATA / f"validation-{key}.jsonl"

    # ------------------------------------------------------------------ the runs
    def spec(self, arm: Arm, combo: tuple, seed: int) -> RunSpec:
        """The run of `arm` with the tuned values `combo` and `seed` (the same object for the same point)."""
        key = (arm, combo, seed)
        if key not in self._specs:
            from ..train import recipe

            point = {k: list(v) if isinstance(v, tuple) else v for k, v in (*arm.fixed, *combo)}
            point.update(peft=arm.method, seed=seed)
            values = {**self.base_values, **point, "name": self._run_name(point), "run_path": str(self.runs_folder),
                      "train": True}
            try:
                cfg = recipe.resolve_config(values, self.base_file, require_action=False)
            except UserError as err:
                raise UserError(f"{self.source}: the run {values['name']}: {err}") from None
            self._specs[key] = RunSpec(arm, combo, seed, cfg)
        return self._specs[key]

    def _run_name(self, point: dict) -> str:
        keys = [k for k in self.grid if k != "peft"]
        if "seed" not in keys and len(set(self.seeds) | set(self.select_seeds)) > 1:  # select.seeds beside the base seed
            keys.append("seed")
        return "_".join([point["peft"]] + [f"{k}{show(point[k], slug=True)}" for k in keys])

    def selection_runs(self) -> list[RunSpec]:
        """Every tuned setting of every arm with each selection seed (with nothing tuned: none)."""
        if not self.tuned_keys:
            return []
        return [self.spec(a, c, s) for a in self.arms for c in a.combos for s in self.select_seeds]

    def final_runs(self, choices: dict) -> list[RunSpec]:
        """The chosen setting of each arm (choices: arm -> combo; an arm without a choice is left out) with
        every seed."""
        return [self.spec(a, choices[a], s) for a in self.arms if choices.get(a) is not None for s in self.seeds]

    def all_runs(self) -> list[RunSpec]:
        """Every run the experiment may train: the selection runs, then every tuned setting of every arm with
        each final seed (whichever setting is chosen); a run in both lists appears twice."""
        return self.selection_runs() + [self.spec(a, c, s) for a in self.arms for c in a.combos for s in self.seeds]

    def base_models(self) -> list[tuple[str, RunConfig]]:
        """(run name, RunConfig) of each distinct base model, scored on the tests as it is."""
        models = dict.fromkeys(self.spec(a, a.combos[0], self.seeds[0]).config.model for a in self.arms)
        out = []
        for model in models:
            slug = show(model, slug=True)
            cfg = dataclasses.replace(self.base, model=model, name=f"base_{slug}", run_path=str(self.runs_folder))
            out.append((cfg.name, cfg))
        return out


def combo_text(combo: tuple) -> str:
    """A setting ((key, value), ...) as text for the report: "lr=0.001, rank=8", or "–" for none."""
    return ", ".join(f"{k}={show(v)}" for k, v in combo) or "–"


def fmt(x, digits: int = 1) -> str:
    """A number for the report's tables: "–" for missing or not-a-number."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def show(value, slug: bool = False) -> str:
    """A grid value as text: 0.004 -> "0.004", a path -> its last two parts; `slug`: safe in a directory name."""
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(show(v) for v in value)
    elif isinstance(value, str) and ("/" in value or ":" in value):
        parts = Path(value.split(":", 1)[-1]).with_suffix("").parts
        text = "-".join(parts[-2:])
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") if slug else text


# ----------------------------------------------------------------------------- loading

def _check_keys(mapping, known, where: str) -> dict:
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must be a mapping, not {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known keys are: {', '.join(known)}")
    return mapping


def _base(raw, source: str, overrides: dict) -> tuple[str | None, dict, RunConfig]:
    """(base config file, inline values with the flags on top, the resolved base RunConfig)."""
    from ..train import recipe

    if raw is None or isinstance(raw, str):
        raw = {"config": raw} if raw else {}
    _check_keys(raw, ("config", *RunConfig.keys()), f"{source}: base")
    values = {k: v for k, v in raw.items() if k != "config" and k not in RUN_OWNED}
    values.update({k: v for k, v in overrides.items() if k not in RUN_OWNED})
    config = raw.get("config")
    base = recipe.resolve_config({**values, "train": True}, config, require_action=False)
    return config, values, base


def _grid(raw, source: str, base: RunConfig) -> tuple[dict, list]:
    """The grid with every value list checked, and the methods."""
    grid = _check_keys(raw if raw is not None else {}, RunConfig.keys(), f"{source}: grid")
    training = base.training_settings()
    for key, values in grid.items():
        if key not in training:
            raise UserError(f"{source}: grid key {key!r} does not change training; list test sets under `test` "
                             "and give other settings in `base`")
        lists = values.values() if isinstance(values, dict) else [values]
        if key == "peft" and isinstance(values, dict) or not all(isinstance(v, list) and v for v in lists):
            raise UserError(f"{source}: grid.{key} must be a non-empty list of values" +
                             ("" if key == "peft" else ", or a mapping method -> list"))
    methods = grid.get("peft", [base.peft])
    bad = [m for m in methods if m not in METHODS]
    if bad or len(set(methods)) != len(methods):
        raise UserError(f"{source}: grid.peft {methods} must list distinct methods of {list(METHODS)}")
    for key, values in grid.items():
        if isinstance(values, dict) and set(values) != set(methods):
            raise UserError(f"{source}: grid.{key} gives values for {sorted(values)}, but the methods are "
                             f"{methods}; give a list for every method")
    return grid, methods


def _values(grid: dict, key: str, method: str) -> list:
    """The values of a grid key for one method (lists become tuples, so that runs can be looked up by them)."""
    values = grid[key][method] if isinstance(grid[key], dict) else grid[key]
    return [tuple(v) if isinstance(v, list) else v for v in values]


def _select(raw, source: str, grid: dict, base: RunConfig) -> tuple[list, str | None, list | None]:
    """(tuned keys, metric, selection seeds or None for the grid's seeds)."""
    if raw is None:
        return [], None, None
    _check_keys(raw, SELECT_KEYS, f"{source}: select")
    keys = raw.get("keys")
    if not isinstance(keys, list) or not keys or any(k not in grid or k in ("peft", "seed") for k in keys):
        raise UserError(f"{source}: select.keys must list grid keys to tune (not peft or seed), got {keys!r}")
    metric = raw.get("metric", "val_loss")
    if metric not in METRICS:
        raise UserError(f"{source}: select.metric {metric!r} is unknown; use one of {list(METRICS)}")
    if not base.val_size:
        raise UserError(f"{source}: select needs a validation split carved from the training data; set val_size "
                         "in base (rows, or a fraction < 1)")
    seeds = raw.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise UserError(f"{source}: select.seeds must be a list of integers, got {seeds!r}")
    return keys, metric, seeds


def _tests(raw, source: str, base: RunConfig) -> list[TestSet]:
    if raw is None:
        return [TestSet(base.test_dataset, base.test_dataset, base.test_file, base.limit)]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{source}: test must be a list of benchmarks or {{name, dataset, file, limit}} mappings")
    tests = []
    for entry in raw:
        entry = {"dataset": entry} if isinstance(entry, str) else _check_keys(entry, TEST_KEYS, f"{source}: test")
        if entry.get("dataset") not in TEST_DATASETS:
            raise UserError(f"{source}: test dataset {entry.get('dataset')!r} is unknown; use one of "
                             f"{list(TEST_DATASETS)}")
        tests.append(TestSet(str(entry.get("name", entry["dataset"])), entry["dataset"], entry.get("file"),
                             entry.get("limit", base.limit)))
    if len({t.name for t in tests}) != len(tests):
        raise UserError(f"{source}: two tests share a name; give each a distinct `name`")
    return tests


def _is_number(value, kind: type, least: float) -> bool:
    """An int (kind int) or an int or float (kind float), not a bool, >= least."""
    kinds = (int,) if kind is int else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value >= least


def _options(raw: dict, source: str) -> dict:
    """analyze, stats, plan, max_parallel, keep_merged and forgetting, checked."""
    analyze = raw.get("analyze", False)
    if isinstance(analyze, dict):
        _check_keys(analyze, ANALYZE_KEYS, f"{source}: analyze")
    elif not isinstance(analyze, bool):
        raise UserError(f"{source}: analyze must be true, false or {{top_k: K}}")
    if isinstance(analyze, dict) and not _is_number(analyze.get("top_k", 1), int, 1):
        raise UserError(f"{source}: analyze.top_k must be an integer >= 1, got {analyze['top_k']!r}")
    stats = {**STATS_DEFAULTS, **_check_keys(raw.get("stats") or {}, tuple(STATS_DEFAULTS), f"{source}: stats")}
    if not (_is_number(stats["confidence"], float, 0.5) and stats["confidence"] < 1
            and _is_number(stats["bootstrap"], int, 100) and _is_number(stats["seed"], int, 0)):
        raise UserError(f"{source}: stats.confidence must lie in [0.5, 1), stats.bootstrap be an integer >= 100 and "
                         f"stats.seed an integer >= 0, got {stats}")
    plan = _check_keys(raw.get("plan") or {}, PLAN_KEYS, f"{source}: plan")
    bad = [k for k, v in plan.items() if not _is_number(v, float, 0)]
    if bad:
        raise UserError(f"{source}: plan.{bad[0]} must be a positive number, got {plan[bad[0]]!r}")
    forgetting = raw.get("forgetting")
    if forgetting is not None:
        if forgetting is True:
            forgetting = {}
        if not isinstance(forgetting, dict):
            raise UserError(f"{source}: forgetting must be true or {{text, tokens, length}}")
        forgetting = {**FORGETTING_DEFAULTS, **_check_keys(forgetting, tuple(FORGETTING_DEFAULTS),
                                                           f"{source}: forgetting")}
        if not (isinstance(forgetting["text"], str) and _is_number(forgetting["tokens"], int, 2)
                and _is_number(forgetting["length"], int, 2) and forgetting["length"] <= forgetting["tokens"]):
            raise UserError(f"{source}: forgetting needs a text (file or builtin: name) and integers "
                            f"2 <= length <= tokens, got {forgetting}")
        forgetting = TextSample(**forgetting)
    parallel = raw.get("max_parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise UserError(f"{source}: max_parallel must be an integer >= 1, got {parallel!r}")
    return {"analyze": bool(analyze), "analyze_top_k": analyze.get("top_k") if isinstance(analyze, dict) else None,
            "stats": stats, "plan": plan, "max_parallel": parallel, "keep_merged": bool(raw.get("keep_merged")),
            "forgetting": forgetting}


def load_experiment(path: str, overrides: dict | None = None) -> Experiment:
    """The experiment in the YAML file `path`; `overrides` (run settings given as flags) go on top of its base and
    may not name a grid key."""
    source = str(path)
    raw = _check_keys(load_yaml(path), KEYS, source)
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{source}: name must be a plain folder name (letters, digits, . _ -), got {name!r}")
    overrides = dict(overrides or {})
    clash = sorted(set(overrides) & set(raw.get("grid") or {}))
    if clash:
        raise UserError(f"{source}: {', '.join('--' + k.replace('_', '-') for k in clash)} is swept by the "
                         "experiment's grid; change the grid in the file instead")
    base_file, base_values, base = _base(raw.get("base"), source, overrides)
    grid, methods = _grid(raw.get("grid"), source, base)
    tuned, metric, select_seeds = _select(raw.get("select"), source, grid, base)
    seeds = grid.get("seed", [base.seed])
    if isinstance(seeds, dict) or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{source}: grid.seed must be one list of integers for every method")
    exp = Experiment(name=name, source=source, base=base, base_file=base_file, base_values=base_values, grid=grid,
                     methods=methods, seeds=seeds, tuned_keys=tuned, metric=metric,
                     select_seeds=select_seeds or seeds, tests=_tests(raw.get("test"), source, base),
                     description=str(raw.get("description") or ""), prepare=raw.get("prepare"),
                     **_options(raw, source))
    fixed_keys = [k for k in grid if k not in ("peft", "seed") and k not in tuned]
    for method in methods:
        combos = tuple(tuple(zip(tuned, values)) for values in
                       itertools.product(*(_values(grid, k, method) for k in tuned)))
        for fixed in itertools.product(*(_values(grid, k, method) for k in fixed_keys)):
            exp.arms.append(Arm(method, tuple(zip(fixed_keys, fixed)), combos))
    _check_runs(exp)
    return exp


def _check_runs(exp: Experiment) -> None:
    """Every run resolves to valid settings, distinct runs get distinct names, and validation accuracy is only
    asked of math training data."""
    names = {}
    for spec in exp.all_runs():
        other = names.setdefault(spec.name, spec.config)
        if other.training_settings() != spec.config.training_settings():
            raise UserError(f"{exp.source}: two different runs would both be named {spec.name!r}; make the grid's "
                             "values distinct")
        if exp.metric == "val_accuracy" and spec.config.train_dataset != "metamath":
            raise UserError(f"{exp.source}: select.metric val_accuracy reads 'The answer is: N' from math "
                             f"responses; {spec.name} trains on {spec.config.train_dataset!r}: use val_loss")
