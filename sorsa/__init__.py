"""SORSA: singular values and orthonormal regularized singular vectors adaptation (arXiv 2409.00055)."""
from .config import SORSAConfig
from .layer import SORSALinear
from .model import (SVDCache, apply_sorsa, export_lora, format_parameter_summary, load_adapter,
                    merge_and_unload, orthonormal_loss, parameter_summary, save_adapter, sorsa_layers)

__all__ = ["SORSAConfig", "SORSALinear", "apply_sorsa", "orthonormal_loss", "merge_and_unload", "save_adapter",
           "load_adapter", "export_lora", "parameter_summary", "format_parameter_summary", "sorsa_layers",
           "SVDCache"]
__version__ = "0.1.0"
