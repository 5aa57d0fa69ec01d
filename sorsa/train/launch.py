"""The process group of a multi-process launch (torchrun, accelerate, deepspeed; gloo without CUDA)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from ..core.errors import MissingFileError, require_package


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
            raise MissingFileError(f"--deepspeed {deepspeed_config}: no such file; use one of configs/deepspeed/"
                             "zero2.json, zero3.json, zero3_offload.json or your own DeepSpeed JSON")
        require_package("deepspeed", "--deepspeed", "DS_BUILD_OPS=0 pip install -e '.[deepspeed]' (the ops build on "
                        "first use)")
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
