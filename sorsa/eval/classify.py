"""The classification backend: a sequence classifier behind the same interface as a generation backend, so
GLUE goes through eval.runner (resumable, one JSON line per example, results.json) like the other benchmarks.

A prompt is the JSON list of the example's texts (eval.glue.prompt_text: one sentence or a pair); the "completion"
is the predicted label ("0", "1", "2") or, for a regression head (num_labels 1, STS-B), the predicted score.
"""
from __future__ import annotations

import json

import torch
from ..core.errors import UserError


class Classifier:
    """AutoModelForSequenceClassification over batches of `batch_size` text pairs, truncated to `max_length`
    tokens together; returns argmax labels, or the raw score of a one-output (regression) head."""

    def __init__(self, model, tokenizer, *, max_length: int = 512, batch_size: int = 8):
        if max_length < 1 or batch_size < 1:
            raise UserError(f"max_length = {max_length}, batch_size = {batch_size}; both must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.regression = model.config.num_labels == 1

    @torch.inference_mode()
    def logits(self, prompts: list[str]) -> torch.Tensor:
        """The classifier's logits (N, num_labels) in float32 for N prompts (JSON lists of texts)."""
        texts = [json.loads(p) for p in prompts]
        columns = list(zip(*texts))  # one tuple per text column: (sentences,) or (firsts, seconds)
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(*(list(c[start:start + self.batch_size]) for c in columns), truncation=True,
                                   max_length=self.max_length, padding=True, return_tensors="pt")
            out.append(self.model(**batch.to(device)).logits.float().cpu())  # (B, num_labels)
        return torch.cat(out)

    def __call__(self, prompts: list[str]) -> list[str]:
        logits = self.logits(prompts)
        if self.regression:
            return [repr(float(v)) for v in logits[:, 0]]
        return [str(int(i)) for i in logits.argmax(dim=-1)]


def make_classifier(model_path: str, *, num_labels: int, max_length: int = 512, batch_size: int = 8,
                    dtype: str | None = None, trust_remote_code: bool = False) -> Classifier:
    """A `Classifier` for a saved sequence classifier (a merged run or any hub id / directory) whose head has
    `num_labels` outputs (the task's; a mismatch is one error)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..core.dtypes import parse_dtype

    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=parse_dtype(dtype) or "auto",
                                                               trust_remote_code=trust_remote_code)
    if model.config.num_labels != num_labels:
        raise UserError(f"{model_path} has a {model.config.num_labels}-output head but the task has {num_labels} "
                         "label(s); score a classifier trained on this task")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return Classifier(model, tokenizer, max_length=max_length, batch_size=batch_size)
