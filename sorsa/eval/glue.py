"""GLUE (Wang et al. 2019, arXiv 1804.07461) as benchmarks: one per task ("glue-sst2", ..., "glue-mnli" and
"glue-mnli-mm" for MNLI's matched and mismatched validation splits), each with the five functions of
sorsa/eval/benchmarks.py, scored on the validation split (GLUE's test labels are hidden).

Metrics, as GLUE defines them: accuracy for every classification task; F1 of the positive class for MRPC
and QQP; Matthews correlation for CoLA; Pearson and Spearman correlation for STS-B (a regression task).
`score` / `metric` name each task's headline number as the LoRA paper (arXiv 2106.09685, Table 2) and PiSSA
report it: Matthews correlation (CoLA), Pearson correlation (STS-B), accuracy (the others). `accuracy` is the
share of `correct` verdicts everywhere; for STS-B a verdict is `correct` when the predicted similarity is
within 0.5 of the gold one (on GLUE's 0-5 scale), a secondary number next to the correlations.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..tasks.glue import GLUE_TASKS, glue_task, load_glue_rows

from .data_files import Example
from ..core.errors import UserError

STSB_TOLERANCE = 0.5
HEADLINE = {"glue-cola": "matthews_correlation", "glue-stsb": "pearson"}


def f1_binary(predictions: list[int], labels: list[int]) -> float:
    """F1 of class 1 (MRPC: paraphrase, QQP: duplicate) = 2·TP / (2·TP + FP + FN)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def matthews_correlation(predictions: list[int], labels: list[int]) -> float:
    """(TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a factor is 0 (constant predictions)."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, predictions))


def correlations(predictions: list[float], labels: list[float]) -> dict:
    """Pearson and Spearman (Pearson of the average ranks) correlation; None where undefined (fewer than two
    examples, or a constant side)."""
    from scipy.stats import pearsonr, spearmanr

    if len(predictions) < 2 or len(set(predictions)) < 2 or len(set(labels)) < 2:
        return {"pearson": None, "spearman": None}
    return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}


class GlueBenchmark:
    """One GLUE task as a benchmark: `load_examples`, `prompt`, `score`, `summarize` and `NAME`."""

    def __init__(self, name: str):
        self.NAME = name
        self.task = glue_task(name)

    def load_examples(self, test_file: str | Path | None = None) -> list[Example]:
        """The task's validation rows from the hub (nyu-mll/glue), or a local .jsonl/.json/.parquet file with
        the hub's columns; `id` is the row index, `gold` the label as text."""
        rows = load_glue_rows(self.NAME, test_file)
        return [Example(id=i, question=self.prompt_text(row), gold=repr(row["label"]) if self.task.is_regression
                        else str(row["label"]), meta={"label": row["label"]}) for i, row in enumerate(rows)]

    def prompt_text(self, row: dict) -> str:
        """The classifier's input: the JSON list of the row's texts (one sentence or a pair)."""
        return json.dumps([row[c] for c in self.task.text_columns], ensure_ascii=False)

    def prompt(self, example: Example) -> str:
        return example.question

    def parse(self, completion: str, example: Example) -> int | float:
        """A prediction: a label 0..num_labels-1, or a finite number for STS-B; anything else is an error
        naming the example (predictions come from a classifier, not free text)."""
        text = completion.strip()
        try:
            value = float(text) if self.task.is_regression else int(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (
                not self.task.is_regression and not 0 <= value < self.task.num_labels):
            kind = "a number" if self.task.is_regression else f"a label 0..{self.task.num_labels - 1}"
            raise UserError(f"{self.NAME}: example {example.id}: prediction {completion[:40]!r} is not {kind}")
        return value

    def score(self, examples: list[Example], completions: list[str], **_: object) -> list[dict]:
        """Verdicts for completions[i] on examples[i]: the prediction, the label and whether they agree."""
        verdicts = []
        for ex, completion in zip(examples, completions, strict=True):
            value, label = self.parse(completion, ex), ex.meta["label"]
            correct = abs(value - label) <= STSB_TOLERANCE if self.task.is_regression else value == label
            verdicts.append({"extracted": value, "prediction": value, "label": label, "correct": bool(correct)})
        return verdicts

    def summarize(self, verdicts: list[dict]) -> dict:
        """accuracy, correct, total, the task's GLUE metrics and its headline `score` / `metric`."""
        n, correct = len(verdicts), sum(v["correct"] for v in verdicts)
        predictions, labels = [v["prediction"] for v in verdicts], [v["label"] for v in verdicts]
        out = {"accuracy": correct / n if n else 0.0, "correct": correct, "total": n, "split": self.task.eval_split}
        if self.task.is_regression:
            out.update(correlations(predictions, labels))
        elif self.NAME == "glue-cola":
            out["matthews_correlation"] = matthews_correlation(predictions, labels) if n else 0.0
        elif self.NAME in ("glue-mrpc", "glue-qqp"):
            out["f1"] = f1_binary(predictions, labels) if n else 0.0
        metric = HEADLINE.get(self.NAME, "accuracy")
        out["metric"], out["score"] = metric, out[metric]
        return out


BENCHMARKS: dict[str, GlueBenchmark] = {name: GlueBenchmark(name) for name in GLUE_TASKS}
