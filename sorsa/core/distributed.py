"""DeepSpeed ZeRO-3's partitioned parameters, gathered whole one at a time where the math needs them, and the
rank of this process (the process group itself is started by sorsa.train.launch)."""
from __future__ import annotations

import contextlib
import os

import torch


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitions across ranks (its .data is a placeholder)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """The number of elements of the whole parameter (under ZeRO-3 not the local placeholder's; for a packed
    4-bit bitsandbytes weight, the weights it holds, not its bytes)."""
    if is_partitioned(p):
        return p.ds_numel
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None and hasattr(state, "shape") else p.numel()


def process_rank() -> int:
    """This process's global rank: the process group's, else the launcher's RANK, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def gathered_parameters(params, modifier_rank: int | None = None):
    """Whole ZeRO-3 parameters inside the block (read-only unless `modifier_rank`, whose changes are kept
    and re-partitioned on exit); parameters that are not partitioned pass through untouched.

    Collective under ZeRO-3: every rank must enter it with the same parameters in the same order.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def from_rank_zero(tensors):
    """The same tensors on every rank: rank 0's values, broadcast in place (a no-op for one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        tensors = tuple(t.contiguous() for t in tensors)
        for t in tensors:
            torch.distributed.broadcast(t, src=0)
    return tensors
