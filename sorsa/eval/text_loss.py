"""Forgetting as PEFT's MetaMathQA method comparison measures it: the mean cross-entropy per token of a model on a
fixed sample of general text (every token predicted from the ones before it in its row), measured on the base
model and on each fine-tuned model; the increase is what fine-tuning cost on text it was not trained on.

The sample is the first `tokens` tokens of the text, cut into rows of `length` tokens (no padding, no special
tokens), so every model of an experiment sees exactly the same tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import UserError


def text_rows(tokenizer, text: str, tokens: int, length: int) -> torch.Tensor:
    """(tokens // length, length) token ids: the start of `text`, cut into rows. Only as much of the text is
    tokenized as the sample needs (a prefix, lengthened until it holds enough tokens)."""
    chars = 8 * tokens
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens + 16 or chars >= len(text):  # a margin: the prefix's last tokens may be cut mid-word
            break
        chars *= 2
    if len(ids) < tokens:
        raise UserError(f"the text sample has {len(ids)} tokens, fewer than the {tokens} asked for; "
                        "give a longer text or fewer tokens")
    rows = tokens // length
    return torch.tensor(ids[:rows * length], dtype=torch.long).view(rows, length)


@torch.no_grad()
def mean_cross_entropy(model, rows: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """(mean cross-entropy in nats per predicted token, number of predicted tokens) of `model` on `rows`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()  # (B, T, V)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count, count
