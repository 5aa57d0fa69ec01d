"""SORSA: singular values and orthonormal regularized singular vectors adaptation (arXiv 2409.00055).

`import sorsa` loads the adapter library only (sorsa/core/); the training application (sorsa.train), the methods
(sorsa.methods), evaluation (sorsa.eval), the tools, experiments and RWKV6 are imported when a job needs them.
"""
import importlib
import logging

# Import-time notes of optional packages that transformers and peft import when installed, with nothing to act on:
# bitsandbytes 0.50 says its optional CPU kernels cannot be fetched (its fallback kernel is the one the tests
# check), and the `kernels` package it pulls in says "Skipping publisher trust check ... offline mode".
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .core.adapter_io import export_lora, load_adapter, save_adapter  # noqa: E402
from .core.options import SORSAConfig  # noqa: E402
from .core.layer import SORSALinear  # noqa: E402
from .core.model import (apply_sorsa, disable_adapter, format_parameter_summary, merge_adapter,  # noqa: E402
                         merge_and_unload, orthonormal_loss, parameter_summary, sorsa_layers, unmerge_adapter)
from .core.svd_cache import SVDCache  # noqa: E402

__all__ = ["SORSAConfig", "SORSALinear", "apply_sorsa", "orthonormal_loss", "merge_and_unload", "save_adapter",
           "load_adapter", "export_lora", "parameter_summary", "format_parameter_summary", "sorsa_layers",
           "SVDCache", "merge_adapter", "unmerge_adapter", "disable_adapter"]
__version__ = "0.1.0"

# `from sorsa import recipe` (the jobs as library calls), loaded on first use so the library stays light.
_LAZY = {"recipe": "sorsa.train.recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'sorsa' has no attribute {name!r}")
