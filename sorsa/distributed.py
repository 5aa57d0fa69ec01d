"""Multi-process training: the process group of a launch (torchrun, accelerate, deepspeed; gloo without CUDA),
and DeepSpeed ZeRO-3's partitioned parameters, gathered whole one at a time where the math needs them."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

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


def init_distributed(deepspeed_config: str | None = None):
    """The accelerate state of a multi-process launch (torchrun, accelerate launch, deepspeed) or of a
    DeepSpeed run, created before anything else so the Trainer reuses it; None for one plain process.

    On a machine without CUDA the processes talk over gloo: the Trainer's `use_cpu` path would pick a
    CPU backend without DeepSpeed, so the state is made here, DeepSpeed-aware when a config is given.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not deepspeed_config:
        return None
    from accelerate import PartialState

    if deepspeed_config:
        if not Path(deepspeed_config).is_file():
            raise ValueError(f"--deepspeed {deepspeed_config}: no such file; use one of configs/deepspeed/"
                             "zero2.json, zero3.json, zero3_offload.json or your own DeepSpeed JSON")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ValueError("--deepspeed needs the deepspeed package: pip install -e '.[deepspeed]' "
                             "(DS_BUILD_OPS=0 builds its ops on first use)") from None
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        # one process without a launcher: DeepSpeed still wants a process group of one
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        return PartialState()
    # Without CUDA: gloo. DeepSpeed's CPU path wants cpu=False (accelerate then starts DeepSpeed's
    # process group); plain DDP wants cpu=True (otherwise accelerate leaves the processes unconnected).
    return PartialState(backend="gloo") if deepspeed_config else PartialState(cpu=True, backend="gloo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
