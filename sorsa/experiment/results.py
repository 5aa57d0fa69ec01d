"""Reading an experiment's outcomes back from its runs: the validation records and the choice per arm, each
run's measurements (results.json) with its per-item verdicts (generations.jsonl), training logs and summaries.
"""
from __future__ import annotations

import json
import math
import statistics

from ..train.settings import RunConfig
from ..core.fileio import parse_json_lines
from ..eval.measurement import GENERATIONS
from ..train.runs import RunDir, run_dir
from ..core.records import settings_hash
from .spec import METRICS, Arm, Experiment, TestSet
from ..core.errors import UserError


def find_measurement(cfg: RunConfig, test: TestSet, trained: bool = True) -> dict | None:
    """The results.json (with "eval_dir" added) of `test` on the run of `cfg`, measured with the settings the
    experiment uses: its merged model when `trained`, else cfg.model scored as it is. None when not measured."""
    from ..train.loading import resolve_data_file, resolve_model_name
    from ..train.recipe import measurement_settings

    run = run_dir(cfg.run_path, cfg.name)
    model = str(run.merged_dir) if trained else resolve_model_name(cfg.model, cfg.cache_path, cfg.run_path)
    test_file = resolve_data_file(test.file, cfg.cache_path, cfg.run_path, "test")
    want = measurement_settings(cfg, test.dataset, model, test_file)
    want.pop("backend", None)  # hf or vLLM (auto) may differ between machines; either measurement counts
    for result in run.eval_results():
        found = result.get("settings") or {}
        if result.get("dataset") == test.dataset and result.get("limit") == test.limit and \
                all(found.get(k) == v for k, v in want.items()):
            return result
    return None


def item_verdicts(run: RunDir, result: dict) -> dict:
    """{item id: correct} of the items a measurement scored (the first `total` lines of its generations.jsonl,
    which eval.runner writes in dataset order); checked against the measurement's count of correct items."""
    path = run.eval_root / result["eval_dir"] / GENERATIONS
    rows = [r for _, r in parse_json_lines(path.read_text(encoding="utf-8"), str(path))][:result["total"]]
    verdicts = {str(r["id"]): bool(r["correct"]) for r in rows}
    if len(verdicts) != result["total"] or sum(verdicts.values()) != result["correct"]:
        raise UserError(f"{path} does not match the scores of its measurement ({sum(verdicts.values())}/"
                         f"{len(verdicts)} vs {result['correct']}/{result['total']}); score the run again")
    return verdicts


def read_validation(exp: Experiment, cfg: RunConfig) -> float | None:
    """The run's validation metric, when recorded for its current training settings."""
    path = exp.validation_record(cfg.name)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    same = record_matches(record, settings_hash(cfg.training_settings()), training_identity(cfg)) \
        and record.get("metric") == exp.metric
    return record["value"] if same else None


def training_identity(cfg: RunConfig) -> str:
    """A hash of the run's completion marker (its settings hash and training summary: steps, losses): another
    training of the run, even with the same settings (e.g. from a rebuilt base model), changes it."""
    return settings_hash(run_dir(cfg.run_path, cfg.name).read_done())


def record_matches(record: dict, digest: str, trained: str) -> bool:
    return record.get("settings_hash") == digest and record.get("trained") == trained


def selection_table(exp: Experiment) -> list[dict]:
    """One row per arm, tuned setting and seed that has (or should have) a validation value: {"arm", "combo",
    "seed", "run", "value", "selection"}; `selection` is False for final-phase seeds outside select.seeds."""
    if not exp.metric:
        return []
    rows = []
    for arm in exp.arms:
        for combo in arm.combos:
            for seed in dict.fromkeys([*exp.select_seeds, *exp.seeds]):
                spec = exp.spec(arm, combo, seed)
                value = read_validation(exp, spec.config)
                if seed in exp.select_seeds or value is not None:
                    rows.append({"arm": arm, "combo": combo, "seed": seed, "run": spec.name, "value": value,
                                 "selection": seed in exp.select_seeds})
    return rows


def selection_values(table: list[dict], arm: Arm, combo: tuple) -> list[float]:
    """The validation values of `arm` with the tuned setting `combo` on the selection seeds (rows of
    `selection_table`; runs not validated are left out)."""
    return [r["value"] for r in table if r["arm"] == arm and r["combo"] == combo and r["selection"]
            and r["value"] is not None]


def choose(exp: Experiment, table: list[dict]) -> dict:
    """arm -> the tuned setting with the best mean validation metric over the selection seeds (ties: the first
    in grid order), or None when none of its selection runs was validated; without tuned keys, arm -> ().

    A non-finite mean (a diverged run's validation loss is NaN) never wins; when every validated setting of an
    arm is non-finite, the first of them in grid order is kept, so that the arm still gets its final runs and
    the report shows the divergence instead of leaving the arm out."""
    if not exp.tuned_keys:
        return {arm: () for arm in exp.arms}
    best = METRICS[exp.metric]
    choices = {}
    for arm in exp.arms:
        means = {}
        for combo in arm.combos:
            values = selection_values(table, arm, combo)
            if values:
                means[combo] = statistics.fmean(values)
        finite = {combo: mean for combo, mean in means.items() if math.isfinite(mean)}
        choices[arm] = best(finite, key=finite.get) if finite else next(iter(means), None)
    return choices


def train_records(run: RunDir) -> tuple[dict[int, float], float | None]:
    """({step: training loss}, the Trainer's train_runtime in seconds) from the run's training log (the records
    `RunDir.read_train_log` gives, and the last with a train_runtime), read once."""
    if not run.train_log_file.is_file():
        return {}, None
    rows = [r for _, r in parse_json_lines(run.train_log_file.read_text(), str(run.train_log_file))
            if isinstance(r, dict)]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
    runtime = next((r["train_runtime"] for r in reversed(rows) if "train_runtime" in r), None)
    return losses, runtime


def run_outcome(exp: Experiment, cfg: RunConfig, trained: bool = True) -> dict:
    """What the report needs of one run (or of the base model when not `trained`): its measurements per test
    (with per-item verdicts), and for trained runs its summary, losses, training time and SVD analysis."""
    run = run_dir(cfg.run_path, cfg.name)
    out = {"name": cfg.name, "seed": cfg.seed, "tests": {}}
    if trained:
        if not run.done_with(cfg.training_settings()):
            return out
        out["summary"] = run.read_done()
        out["losses"], out["train_seconds"] = train_records(run)
        out["analysis"] = _analysis_last_step(run) if exp.analyze else None
    out["text_ce"] = _text_ce(exp, cfg, trained)
    for test in exp.tests:
        result = find_measurement(cfg, test, trained)
        if result is not None:
            out["tests"][test.name] = {"accuracy": 100.0 * result["accuracy"], "correct": result["correct"],
                                       "total": result["total"], "verdicts": item_verdicts(run, result)}
    return out


def _text_ce(exp: Experiment, cfg: RunConfig, trained: bool) -> float | None:
    """The run's (or base model's) cross-entropy on the experiment's general-text sample, when measured."""
    from ..train.recipe import text_loss_record

    if exp.forgetting is None:
        return None
    sample = exp.forgetting
    record, _, _ = text_loss_record(cfg, sample.text, sample.tokens, sample.length, trained)
    return json.loads(record.read_text())["cross_entropy"] if record.is_file() else None


def _analysis_last_step(run: RunDir) -> tuple[float, float] | None:
    """(ΔΣ, ΔD) at the last analysed step, mean over the adapted layers, from RUN/analysis.csv."""
    from ..tools.analysis import CSV_NAME, read_csv, step_means

    path = run.path / CSV_NAME
    if not path.is_file():
        return None
    _, sigma, direction = step_means(read_csv(path))[-1]
    return sigma, direction


def collect(exp: Experiment, choices: dict) -> dict:
    """Everything the report shows: {"selection": rows, "choices", "arms": {arm: [run outcome per seed]},
    "base": {model: base outcome}}."""
    arms: dict[Arm, list] = {}
    for spec in exp.final_runs(choices):
        arms.setdefault(spec.arm, []).append(run_outcome(exp, spec.config))
    base = {cfg.model: run_outcome(exp, cfg, trained=False) for _, cfg in exp.base_models()}
    return {"selection": selection_table(exp), "choices": choices, "arms": arms, "base": base}
