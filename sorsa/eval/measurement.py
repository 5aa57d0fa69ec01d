"""What a measurement is, in one place: a benchmark scored with settings that decide its numbers (the model, the
generation length, precision, test file, ...); the folder under a run's eval/ it is kept in (keyed by those
settings), whether a stored measurement is the same one (to reuse it, or to refuse resuming it with other
settings), and which of a run's measurements a table shows.

    eval/<dataset>/                the first measurement of a benchmark
    eval/<dataset>-<hash>/         a measurement of it with other settings, kept beside the first
      generations.jsonl, results.json, generation_settings.json   (written by sorsa.eval.runner)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.records import settings_hash

GENERATIONS = "generations.jsonl"
RESULTS = "results.json"
EVAL_SETTINGS = "generation_settings.json"
# Settings that may differ between two measurements that count as the same when one is looked up for reuse:
# the generation backend (hf or vLLM under "auto") depends on the machine, not on what is measured.
INTERCHANGEABLE = ("backend",)
# Settings that a resumed measurement may change: it scores more (or fewer) of the same generations.
RESUMABLE = ("limit",)


def stored_form(settings: dict) -> dict:
    """The settings as a JSON file holds them (a JSON round trip: tuples become lists, paths strings)."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


@dataclass(frozen=True)
class Measurement:
    """A benchmark and the settings that decide its numbers (JSON-able)."""

    dataset: str
    settings: dict

    @classmethod
    def generation(cls, dataset: str, model: str, backend: str, max_new_tokens: int, precision: str,
                   test_file: str | None) -> "Measurement":
        """Greedy generation scored by a benchmark's extractor (GSM-8K, MATH, HumanEval, MBPP)."""
        return cls(dataset, {"model": model, "backend": backend, "max_new_tokens": max_new_tokens,
                             "precision": precision, "test_file": test_file, "greedy": True})

    @classmethod
    def classification(cls, dataset: str, model: str, max_length: int, precision: str,
                       test_file: str | None) -> "Measurement":
        """A sequence classifier's predictions (a GLUE task)."""
        return cls(dataset, {"model": model, "classifier": True, "max_length": max_length, "precision": precision,
                             "test_file": test_file})

    def folder(self, eval_root: Path) -> Path:
        """eval/<dataset>/ when it is free or holds this very measurement, else eval/<dataset>-<hash>/."""
        plain = Path(eval_root) / self.dataset
        if not (plain / EVAL_SETTINGS).is_file() or _read_json(plain / EVAL_SETTINGS) == stored_form(self.settings):
            return plain
        return Path(eval_root) / f"{self.dataset}-{settings_hash(self.settings)[:8]}"

    def matches(self, result: dict, limit: int | None) -> bool:
        """Whether a results.json record is this measurement, over the same `limit` (the backend aside)."""
        found = result.get("settings") or {}
        want = stored_form(self.settings)
        return result.get("dataset") == self.dataset and result.get("limit") == limit and \
            all(found.get(k) == v for k, v in want.items() if k not in INTERCHANGEABLE)


def check_resumable(out_dir: Path, settings: dict, have_records: bool) -> dict:
    """The settings as stored; a UserError when `out_dir` holds generations made with other settings."""
    current = stored_form(settings)
    path = Path(out_dir) / EVAL_SETTINGS
    if have_records and path.is_file():
        previous = _read_json(path) or {}
        changed = sorted(k for k in set(previous) | set(current)
                         if k not in RESUMABLE and previous.get(k) != current.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise UserError(f"{Path(out_dir) / GENERATIONS} holds generations made with other settings ({details}); "
                            "write into another folder, or call evaluate(..., resume=False) to replace them")
    return current


def read_results(eval_root: Path) -> list[dict]:
    """Every results.json under `eval_root`, each with "eval_dir" (its folder name) added, in folder order."""
    root = Path(eval_root)
    if not root.is_dir():
        return []
    return [{**json.loads((d / RESULTS).read_text()), "eval_dir": d.name}
            for d in sorted(p for p in root.iterdir() if (p / RESULTS).is_file())]


def find(eval_root: Path, measurement: Measurement, limit: int | None) -> dict | None:
    """The stored results.json (with "eval_dir") of `measurement` over `limit`, or None."""
    return next((r for r in read_results(eval_root) if measurement.matches(r, limit)), None)


def pick(results: list[dict], dataset: str) -> dict | None:
    """Of a run's measurements (`read_results`), the one of `dataset` that a table shows: on the benchmark's own
    whole test set (no test file, no limit) when there is one, else the first (eval/<dataset>/); None if none."""
    found = [m for m in results if m.get("dataset", m["eval_dir"]) == dataset]
    whole = [m for m in found if m.get("test_file") is None and m.get("limit") is None]
    first = [m for m in found if m["eval_dir"] == dataset]
    return next(iter(whole + first), None)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
