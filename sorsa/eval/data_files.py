"""Reading benchmark test data: local .jsonl / .json / .parquet files, or a Hugging Face hub dataset.

Every benchmark loads through here, so a local file and the hub give the same list of row dicts.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..core.fileio import parse_json_lines
from ..core.errors import MissingFileError, UnreachableError, UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Example:
    """One test item: `id` is the row index in the test data (the HumanEval task_id for HumanEval),
    `question` what goes into the prompt template, `gold` the reference answer (or code)."""

    id: int | str
    question: str
    gold: str
    meta: dict = field(default_factory=dict)


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a local .jsonl, .json (a list of objects, or {"data": [...]}) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"test file {str(path)!r} does not exist; pass an existing .jsonl, .json or "
                                f".parquet file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [row for _, row in parse_json_lines(path.read_text(encoding="utf-8"), str(path))]
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{path} holds a JSON {type(data).__name__}; expected a list of row objects "
                             f"(or {{\"data\": [...]}})")
        rows = data
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`, so always installed with it

        rows = pq.read_table(path).to_pylist()
    else:
        raise UserError(f"test file {str(path)!r} has suffix {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i} is a {type(row).__name__}, expected a JSON object")
    return rows


def load_hub_rows(name: str, config: str | None, split: str) -> list[dict]:
    """Rows of a hub dataset through `datasets.load_dataset` (needs the network or a warm HF cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the library's errors are long; name what failed and the offline alternative
        raise UnreachableError(f"could not load hub dataset {name!r} ({config}, {split}): {type(e).__name__}: {e}; "
                           f"pass a local file with --test-file instead") from None
    return [dict(row) for row in ds]


def is_hub_id(source: str | Path) -> bool:
    """True for "owner/name" strings that are not an existing local path (a hub dataset id)."""
    text = str(source)
    return (not Path(text).exists() and Path(text).suffix.lower() not in LOCAL_SUFFIXES
            and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None)


def require_columns(rows: list[dict], columns: tuple[str, ...], source: str) -> None:
    """Raise a clear error unless every row has all of `columns`."""
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise UserError(f"{source}: row {i} lacks column(s) {missing} (has {sorted(row)}); "
                             f"expected columns {list(columns)}")
