"""GLUE (Wang et al. 2019, arXiv 1804.07461) for sequence classification: the eight tasks PiSSA reports, their
columns, label counts and scored splits; rows from the hub (nyu-mll/glue) or a local .jsonl/.json/.parquet file
in the hub's schema; validation of labels; tokenization of a training set."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from ..core.errors import UserError

GLUE_HUB = "nyu-mll/glue"
GLUE_FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as this project names it ("glue-sst2"): the hub config, the text columns that make the
    input (one sentence or a pair), the number of labels (1: regression, STS-B) and the split that is scored.
    GLUE's test labels are hidden, so every task is scored on its validation split, as PiSSA and LoRA report."""

    name: str
    config: str
    text_columns: tuple[str, ...]
    num_labels: int
    eval_split: str
    label: str  # the name in tables

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("glue-mnli", "mnli", ("premise", "hypothesis"), 3, "validation_matched", "MNLI-m"),
    # The same MNLI model, scored on the mismatched-genre validation split.
    GlueTask("glue-mnli-mm", "mnli", ("premise", "hypothesis"), 3, "validation_mismatched", "MNLI-mm"),
    GlueTask("glue-sst2", "sst2", ("sentence",), 2, "validation", "SST-2"),
    GlueTask("glue-mrpc", "mrpc", ("sentence1", "sentence2"), 2, "validation", "MRPC"),
    GlueTask("glue-cola", "cola", ("sentence",), 2, "validation", "CoLA"),
    GlueTask("glue-qnli", "qnli", ("question", "sentence"), 2, "validation", "QNLI"),
    GlueTask("glue-qqp", "qqp", ("question1", "question2"), 2, "validation", "QQP"),
    GlueTask("glue-rte", "rte", ("sentence1", "sentence2"), 2, "validation", "RTE"),
    GlueTask("glue-stsb", "stsb", ("sentence1", "sentence2"), 1, "validation", "STS-B"),
)}
# What can be trained on (MNLI-mm is only a second validation split of MNLI).
GLUE_TRAIN_TASKS = tuple(n for n in GLUE_TASKS if n != "glue-mnli-mm")


def is_glue(name: str | None) -> bool:
    """Whether a dataset name is a GLUE task (a sequence-classification run or measurement)."""
    return name in GLUE_TASKS


def glue_task(name: str) -> GlueTask:
    if name not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {name!r}; use one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[name]


def _read_local(path: Path) -> list[dict]:
    """Rows of a local file: .jsonl / .json (the project's JSON reader, errors name the line) or .parquet."""
    from .data import DataError, _read_json_rows

    if not path.is_file():
        raise DataError(f"GLUE file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in GLUE_FILE_EXTENSIONS:
        raise DataError(f"GLUE file {path}: unknown extension {suffix or '(none)'!r}; use one of "
                        f"{', '.join(GLUE_FILE_EXTENSIONS)} with the hub's columns (the original GLUE .tsv layouts "
                        "are not read)")
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        try:
            return pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises many types; the user needs one line
            raise DataError(f"{path}: cannot read as parquet ({str(err).splitlines()[0]})") from None
    return [row for _, row in _read_json_rows(path)]


def _hub_rows(task: GlueTask, split: str, cache_dir: str | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(GLUE_HUB, task.config, split=split, cache_dir=cache_dir)
    except Exception as err:  # network, auth and hub errors come in many types; one line each
        from .data import DataError

        raise DataError(f"could not load {GLUE_HUB} ({task.config}, {split}) from the Hugging Face hub: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; without network, pass a "
                        "local .jsonl/.json/.parquet file in the hub's columns") from None
    return [dict(row) for row in ds]


def check_rows(rows: list[dict], task: GlueTask, source: str) -> list[dict]:
    """Rows reduced to the task's text columns and `label` (int in [0, num_labels), or a float for STS-B);
    a missing column, a non-text input or an unusable label is one error naming the row."""
    from .data import DataError

    if not rows:
        raise DataError(f"{source}: no rows")
    clean = []
    for i, row in enumerate(rows):
        missing = [c for c in (*task.text_columns, "label") if c not in row]
        if missing:
            raise DataError(f"{source}: row {i} lacks column(s) {missing} needed by {task.name} "
                            f"(has {sorted(row)}); expected {list(task.text_columns) + ['label']}")
        if not all(isinstance(row[c], str) for c in task.text_columns):
            raise DataError(f"{source}: row {i}: the columns {list(task.text_columns)} must be text")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            raise DataError(f"{source}: row {i}: label {label!r} is not a (finite) number")
        if not task.is_regression:
            if label == -1:
                raise DataError(f"{source}: row {i} has label -1 (GLUE's hidden test labels); score the "
                                "validation split instead")
            if label != int(label) or not 0 <= label < task.num_labels:
                raise DataError(f"{source}: row {i}: label {label!r} is not one of 0..{task.num_labels - 1}")
            label = int(label)
        clean.append({**{c: row[c] for c in task.text_columns}, "label": float(label) if task.is_regression else label})
    return clean


def load_glue_rows(name: str, path: str | Path | None = None, split: str | None = None,
                   cache_dir: str | None = None) -> list[dict]:
    """Checked rows of GLUE task `name`: from a local file when `path` is given, else the hub's `split`
    (default: the task's scored validation split)."""
    task = glue_task(name)
    if path is not None:
        return check_rows(_read_local(Path(path).expanduser()), task, str(path))
    split = split or task.eval_split
    return check_rows(_hub_rows(task, split, cache_dir), task, f"{GLUE_HUB}/{task.config} ({split})")


def load_glue_train(name: str, split: str | None = None, train_file=None, cache_dir=None):
    """The training set of a GLUE task as a `datasets.Dataset` (text columns + label): the hub's train split
    or `train_file`, sliced by `split` as the generation tasks are ("[:1000]", "train[:10%]"; None: all)."""
    import datasets

    from .data import _apply_slice, _parse_split

    hub_split, bounds = _parse_split(split)
    sliced = bounds != slice(None, None)
    if sliced:
        print(f"[run] training on rows {split} of {name} (--split); pass --split '' for the whole train split")
    # the hub slices while it loads ("train[:1000]" reads 1000 rows of MNLI's 393k); a local file is sliced here
    rows = load_glue_rows(name, train_file, split=hub_split, cache_dir=cache_dir)
    ds = datasets.Dataset.from_list(rows)
    return _apply_slice(ds, bounds, str(train_file)) if sliced and train_file is not None else ds


def tokenize_glue(ds, tokenizer, name: str, max_length: int):
    """Tokenize a GLUE training set: input_ids / attention_mask (and token_type_ids where the tokenizer makes
    them) of the sentence or the pair, truncated to `max_length` tokens together, and `labels`."""
    task = glue_task(name)

    def tokenize(batch: dict) -> dict:
        out = tokenizer(*(batch[c] for c in task.text_columns), truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return dict(out)

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {name}")
