"""Generate and score one benchmark into a folder: generations.jsonl (one line per example) and results.json.

    from sorsa.eval.generate import make_generator
    from sorsa.eval.runner import evaluate, MAX_NEW_TOKENS, STOP_STRINGS
    generate = make_generator("runs/X/merged", max_new_tokens=MAX_NEW_TOKENS["gsm-8k"], stop=STOP_STRINGS["gsm-8k"])
    results = evaluate("gsm-8k", Path("runs/X/eval/gsm-8k"), generate, settings={"model": "runs/X/merged"})

Finished generations are appended (and flushed) as they arrive, so a rerun after a crash reuses them and
generates only the rest; verdicts are recomputed on every run with the current scorer. At the end
generations.jsonl is rewritten in dataset order and results.json is written, both atomically. Nothing in
the folder is changed before the inputs and settings are checked, so a refused call leaves it as it was.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..core.errors import UserError
from ..core.fileio import atomic_write_text, jsonl_text
from ..core.records import package_versions
from .benchmarks import MAX_NEW_TOKENS, STOP_STRINGS, get_benchmark  # noqa: F401  (re-exported)
from .measurement import EVAL_SETTINGS, GENERATIONS, RESULTS, check_resumable

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


class _Progress:
    """The tqdm bar with the running accuracy of the verdicts so far."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)

    def advance(self, n: int, verdicts: dict) -> None:
        correct = sum(v["correct"] for v in verdicts.values())
        self.bar.update(n)
        self.bar.set_postfix(acc=f"{correct / max(1, len(verdicts)):.4f}", refresh=False)


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
        raise UserError(f"limit = {limit!r}; expected a positive integer (or None for the whole test set)")
    examples_all = bench.load_examples(test_file)
    examples = examples_all[:limit] if limit else examples_all
    out_dir = Path(out_dir)
    gen_path = out_dir / GENERATIONS
    prompts = {ex.id: bench.prompt(ex) for ex in examples_all}
    earlier = read_generations(gen_path) if resume else []
    stored_settings = check_resumable(out_dir, dict(settings or {}), bool(earlier))
    # Checked: from here on the folder is written. Reuse a generation only for the same example and prompt.
    out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier results.json would describe generations that this call may replace, until it finishes.
    (out_dir / RESULTS).unlink(missing_ok=True)
    atomic_write_text(out_dir / EVAL_SETTINGS, json.dumps(stored_settings, indent=2, sort_keys=True) + "\n")
    finished = {r["id"]: r for r in earlier if r["id"] in prompts and r.get("prompt") == prompts[r["id"]]}
    atomic_write_text(gen_path, jsonl_text(list(finished.values())))  # a clean file to append to
    reused = [ex for ex in examples if ex.id in finished]
    todo = [ex for ex in examples if ex.id not in finished]
    options = {"workers": workers, **(score_options or {})}
    bar = _Progress(len(examples), dataset, progress)
    verdicts: dict = {}
    if reused:  # re-score with the current scorer: cheap, and verdicts never go stale
        completions = [finished[ex.id]["completion"] for ex in reused]
        _record(bench, reused, completions, prompts, options, verdicts, finished)
        bar.advance(len(reused), verdicts)
    chunk = chunk_size or getattr(generate_fn, "batch_size", None) or DEFAULT_CHUNK
    _generate_missing(bench, todo, generate_fn, chunk, prompts, options, verdicts, finished, gen_path, bar)
    bar.bar.close()
    # Final, consistent file in dataset order; generations kept from an earlier run over more examples
    # (beyond --limit) stay, so a later run without --limit reuses them.
    atomic_write_text(gen_path, jsonl_text([finished[ex.id] for ex in examples_all if ex.id in finished]))
    summary = bench.summarize([verdicts[ex.id] for ex in examples])
    results = {"dataset": dataset, **summary, "num_examples": len(examples_all), "limit": limit,
               "test_file": None if test_file is None else str(test_file),
               "reused_generations": len(reused), "new_generations": len(todo),
               "seconds": round(time.monotonic() - started, 3), "settings": stored_settings,
               "versions": package_versions(), "generations": str(gen_path)}
    atomic_write_text(out_dir / RESULTS, json.dumps(results, indent=2, default=str) + "\n")
    return results


def _record(bench, examples, completions, prompts, options, verdicts, finished) -> list[dict]:
    """Score `completions` of `examples` into `verdicts` and `finished` (id -> record); returns the records."""
    records = []
    for ex, c, v in zip(examples, completions, bench.score(examples, completions, **options), strict=True):
        verdicts[ex.id] = v
        finished[ex.id] = {"id": ex.id, "prompt": prompts[ex.id], "completion": c, **v, "gold": ex.gold}
        records.append(finished[ex.id])
    return records


def _generate_missing(bench, todo, generate_fn, chunk, prompts, options, verdicts, finished, gen_path, bar):
    """Generate and score `todo` in chunks, appending each finished record to the generations file at once."""
    with gen_path.open("a", encoding="utf-8") as log:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            completions = generate_fn([prompts[ex.id] for ex in part])
            if not isinstance(completions, list) or len(completions) != len(part) or \
                    not all(isinstance(c, str) for c in completions):
                raise TypeError(f"generate_fn returned {type(completions).__name__} of length "
                                f"{len(completions) if hasattr(completions, '__len__') else '?'} for {len(part)} "
                                f"prompts; it must return one completion string per prompt")
            for record in _record(bench, part, completions, prompts, options, verdicts, finished):
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
            log.flush()
            os.fsync(log.fileno())
            bar.advance(len(part), verdicts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("sorsa.eval.runner is a library; run the benchmarks through run.py --test, or score a file with "
             "python -m sorsa.eval.score")
