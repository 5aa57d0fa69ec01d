"""SORSA: singular values and orthonormal regularized singular vectors adaptation (arXiv 2409.00055)."""
import logging

# bitsandbytes (0.50, an optional dependency that transformers and peft import when it is installed) warns on
# import, on CPUs with AVX512-BF16, that an optional `kernels` package is missing; its fallback kernel is the
# one the tests check, so the note would only break the CLI's one-line errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
from .adapter_io import export_lora, load_adapter, save_adapter
from .config import SORSAConfig
from .layer import SORSALinear
from .model import (apply_sorsa, disable_adapter, format_parameter_summary, merge_adapter, merge_and_unload,
                    orthonormal_loss, parameter_summary, sorsa_layers, unmerge_adapter)
from .svd_cache import SVDCache

__all__ = ["SORSAConfig", "SORSALinear", "apply_sorsa", "orthonormal_loss", "merge_and_unload", "save_adapter",
           "load_adapter", "export_lora", "parameter_summary", "format_parameter_summary", "sorsa_layers",
           "SVDCache", "merge_adapter", "unmerge_adapter", "disable_adapter"]
__version__ = "0.1.0"
