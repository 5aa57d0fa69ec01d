"""The LoRA family through the `peft` library: LoRA (Hu et al., 2021, arXiv 2106.09685) and PiSSA (arXiv 2404.02948),
as methods of the toolkit, over a full-precision or a quantized base (QLoRA, QPiSSA).

Both use alpha = r (scale 1) as the reference does. A trained PiSSA adapter is saved converted to a rank-2r LoRA of
the untouched base model (over a quantized residual, where W − B₀A₀ is not the base, it is saved as trained beside
its initial adapter), so LoRA and PiSSA runs merge and reload alike.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..core import functional as SF
from ..core.errors import UserError
from ..core.fileio import TensorReader
from ..core.targets import dense_weight
from .base import CAUSAL_LM, Method

PEFT_PREFIX = "base_model.model."  # the key prefix of a peft adapter file


def peft_init(method: str, svd: str = "full", niter: int = 4):
    """peft's `init_lora_weights` for an initialisation family: True (LoRA), "pissa" or "pissa_niter_N" (its
    randomized SVD), "olora"; False where this project initialises the layers itself after peft built them
    (`svd_init`): PiSSA with svd="fast", which peft does not have, and MiLoRA, which peft does not offer."""
    if method == "lora":
        return True
    if method == "pissa":
        return {"full": "pissa", "randomized": f"pissa_niter_{niter}"}.get(svd, False)
    if method == "olora":
        return "olora"
    if method == "milora":
        return False
    raise UserError(f"peft initialisation {method!r} is unknown; use 'lora', 'pissa', 'olora' or 'milora'")


def apply_peft_baseline(model: nn.Module, method: str, rank: int, target_modules: list[str] | str,
                        dropout: float = 0.0, svd: str = "full", niter: int = 4, task_type: str = "CAUSAL_LM",
                        modules_to_save: list[str] | None = None, svd_options: dict | None = None,
                        lora_options: dict | None = None):
    """Wrap `model` in a peft LoRA/PiSSA model with rank r, alpha r and the given targets; `task_type`
    "SEQ_CLS" with `modules_to_save` (peft's own: trained fully, saved with the adapter) for a classifier.
    PiSSA with svd="fast" and MiLoRA are initialised by `svd_init` with `svd_options` (svd_top's keywords);
    `lora_options`: further `LoraConfig` fields of a variant (e.g. use_rslora)."""
    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    from ..core.targets import ALL_LINEAR, find_target_modules

    if target_modules == [ALL_LINEAR]:
        target_modules = ALL_LINEAR  # peft's own spelling
    conv1d = any(isinstance(m, Conv1D) for _, m in find_target_modules(model, target_modules))  # GPT-2
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=target_modules,
                        bias="none", task_type=task_type, init_lora_weights=peft_init(method, svd, niter),
                        modules_to_save=modules_to_save, fan_in_fan_out=conv1d, **(lora_options or {}))
    peft_model = get_peft_model(model, config)
    if method == "pissa" and svd == "fast":
        svd_init(peft_model, svd, svd_options or {})
    elif method == "milora":
        svd_init(peft_model, svd, svd_options or {}, minor=True)
    return peft_model


@torch.no_grad()
def svd_init(peft_model, svd: str, options: dict, minor: bool = False) -> None:
    """Initialise every LoRA layer from the SVD of its weight W: PiSSA (arXiv 2404.02948, Sec. 3) takes the top-r
    triplets (this project's `svd_top`), MiLoRA (arXiv 2406.09044, Sec. 3) the r smallest (from the full SVD);
    either way A = √(S/s) Vh (r, in), B = U √(S/s) (out, r), and the base weight becomes the residual
    W_res = W − s · B A (s = lora_alpha / r), so the adapted model equals the base at the start."""
    from peft.tuners.lora import LoraLayer

    for _, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        base = module.get_base_layer()
        r, s = module.r["default"], module.scaling["default"]
        W = dense_weight(base)  # (out, in), also for GPT-2's Conv1D
        U, S, Vh = minor_components(W, r) if minor else SF.svd_top(W, r, svd, **options)  # (out, r), (r,), (r, in)
        A, B = SF.pissa_factors(U, S, Vh, s)  # (r, in), (out, r)
        module.lora_A["default"].weight.copy_(A)
        module.lora_B["default"].weight.copy_(B)
        W_res = SF.lora_residual(W, A, B, s, W.dtype)
        base.weight.data = W_res if isinstance(base, nn.Linear) else W_res.T.contiguous()
    if not minor:
        peft_model.peft_config["default"].init_lora_weights = "pissa"  # as peft's own PiSSA would say


def minor_components(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r smallest singular triplets of W (out, in), from the full SVD in float32: (out, r), (r,), (r, in)."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return U[:, -rank:].contiguous(), S[-rank:].contiguous(), Vh[-rank:].contiguous()


def save_initial_pissa(peft_model, init_dir: str | os.PathLike):
    """Save a freshly initialised PiSSA adapter, needed later to convert the trained one to LoRA."""
    config = peft_model.peft_config["default"]
    init_value = config.init_lora_weights
    config.init_lora_weights = True  # so that loading this file does not run PiSSA again
    try:
        peft_model.save_pretrained(str(init_dir))
    finally:
        config.init_lora_weights = init_value


def save_peft_adapter(peft_model, adapter_dir: str | os.PathLike, init_dir: str | os.PathLike | None = None):
    """Save the trained adapter; an adapter of a residual base (PiSSA, OLoRA, MiLoRA: with `init_dir`, its initial
    adapter) is converted to a rank-2r LoRA of the original base."""
    import warnings

    kwargs = {}
    if init_dir is not None and Path(init_dir).is_dir():
        kwargs["path_initial_model_for_weight_conversion"] = str(init_dir)
    with warnings.catch_warnings():
        # peft names the inits it knows; the conversion (ΔW = B A − B₀ A₀ as a rank-2r LoRA) holds for any adapter
        # of a residual base, MiLoRA's included
        warnings.filterwarnings("ignore", message=".*path_initial_model_for_weight_conversion` only works")
        peft_model.save_pretrained(str(adapter_dir), **kwargs)
    if kwargs:
        _restore_modules_to_save(peft_model, adapter_dir)


def _restore_modules_to_save(peft_model, adapter_dir: str | os.PathLike):
    """Put the trained `modules_to_save` (a classifier's head) into a converted PiSSA adapter: peft's PiSSA-to-LoRA
    conversion (0.21) writes the LoRA tensors only, and the adapter would not load (or would lose the head)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import load_file

    from ..core.fileio import atomic_save_safetensors

    extra = {k: v for k, v in get_peft_model_state_dict(peft_model).items() if ".lora_" not in k}
    if extra:
        path = Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME
        tensors = {**load_file(str(path)), **{k: v.detach().cpu().contiguous() for k, v in extra.items()}}
        atomic_save_safetensors(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- quantized base (QLoRA, QPiSSA)

def load_qpeft(model_dir, method: str, rank: int, targets, spec, iters: int = 1, svd: str = "full",
               svd_options: dict | None = None, init_factors: dict | None = None, dropout: float = 0.0,
               device="cpu", progress=True, adapter_dir=None):
    """QLoRA (method "lora": Q(W) everywhere, PEFT's LoRA init) or QPiSSA ("pissa": each target's residual
    W − B A quantized after `iters` alternating rounds, A = √S Vh and B = U √S; with `init_factors`
    ({layer: (A, B)}, from a saved initial adapter) the residual is rebuilt from those instead), as a peft model;
    with `adapter_dir`, the trained adapter saved there is loaded on top."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..core.quant import quantize_linear, quantizer
    from ..core.quant_model import stream_quantized

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def adapt(name, linear):
        if method != "pissa":
            return None
        W = linear.weight.to(torch.float32)
        if init_factors is not None:
            A, B = init_factors[name]
        else:
            U, S, Vh = SF.quantized_split(W, rank, *quantizer(spec), iters, 1.0, "tail", svd, **(svd_options or {}))
            A, B = SF.pissa_factors(U, S, Vh)  # (r, in), (out, r)
        factors[name] = (A, B)
        return quantize_linear(SF.lora_residual(W, A, B, 1.0, torch.float32), linear.bias, spec)

    model = stream_quantized(model_dir, spec, adapt, targets, rank, device=device, progress=progress)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, bias="none",
                                                  target_modules=targets, task_type="CAUSAL_LM",
                                                  init_lora_weights=method != "pissa"))
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name in factors:
                A, B = factors[name]
                module.lora_A["default"].weight.copy_(A)
                module.lora_B["default"].weight.copy_(B)
    return peft_model


def read_peft_factors(adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A (r, in), B (out, r))} of a saved peft LoRA adapter (its initial adapter, for QPiSSA)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    reader = TensorReader(Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME)
    return {n: (reader.get(f"{PEFT_PREFIX}{n}.lora_A.weight").float(),
                reader.get(f"{PEFT_PREFIX}{n}.lora_B.weight").float()) for n in adapter_layers(reader)}


def adapter_layers(reader: TensorReader) -> list[str]:
    """The adapted layers of a peft LoRA adapter file, sorted."""
    suffix = ".lora_A.weight"
    return sorted(k[len(PEFT_PREFIX):-len(suffix)] for k in reader.keys() if k.endswith(suffix))


@torch.no_grad()
def dequantize_peft(model, dtype: torch.dtype) -> nn.Module:
    """The inner model of a peft LoRA model over a quantized base, each LoRA layer folded into a plain nn.Linear
    deq(W_q) + ΔW in `dtype` (ΔW as peft computes it, `get_delta_weight`); the other quantized layers stay."""
    from peft.tuners.lora import LoraLayer

    from ..core.layer import plain_linear
    from ..core.model import replace_module
    from ..core.quant import dequantize_linear, is_quantized

    inner = model.base_model.model
    for name, module in list(inner.named_modules()):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            W = dequantize_linear(base) if is_quantized(base) else base.weight.float()  # (out, in)
            W = W + module.get_delta_weight("default").float()
            replace_module(inner, name, plain_linear(W.to(dtype), base.bias))
    return inner


class PeftWeights:
    """W_t = W_0 + s·B A for a LoRA adapter (or PiSSA converted to LoRA), and W_t = W_0 − s·B_0 A_0 + s·B_t A_t for a
    checkpoint of a residual-base method (PiSSA, OLoRA, MiLoRA), whose base was W_0 − s·B_0 A_0 (B_0, A_0 from its
    initial adapter); DoRA rescales the rows by its magnitude vector. s = lora_alpha / r (/ √r with rsLoRA). The SVD
    analysis reads a run's checkpoints through this."""

    def __init__(self, checkpoint: Path, init_dir: Path | None):
        import json

        self.scale, self.reader = self._open(checkpoint)
        config = json.loads((checkpoint / "adapter_config.json").read_text())
        # a checkpoint of a residual-base method (not yet converted to a LoRA of the base, which says True)
        self.relative_to_residual = init_dir is not None and config.get("init_lora_weights") is not True
        self.init = None
        if self.relative_to_residual:
            if not (init_dir / "adapter_config.json").is_file():
                from ..core.errors import MissingFileError

                raise MissingFileError(f"{checkpoint} is an adapter of the residual model; its initial adapter "
                                       f"({init_dir}) is needed to rebuild W_t and is missing")
            self.init = self._open(init_dir)
        self.layers = adapter_layers(self.reader)

    @staticmethod
    def _open(directory: Path) -> tuple[float, TensorReader]:
        import json

        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        config = json.loads((directory / "adapter_config.json").read_text())
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise UserError(f"{directory}: rank/alpha patterns are not supported by the analysis")
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
        return scale, TensorReader(directory / SAFETENSORS_WEIGHTS_NAME)

    @staticmethod
    def _delta(scale: float, reader: TensorReader, layer: str, device) -> torch.Tensor:
        A = reader.get(f"{PEFT_PREFIX}{layer}.lora_A.weight").to(device=device, dtype=torch.float32)  # (r, in)
        B = reader.get(f"{PEFT_PREFIX}{layer}.lora_B.weight").to(device=device, dtype=torch.float32)  # (out, r)
        return scale * (B @ A)  # (out, in)

    def weight(self, layer: str, W0: torch.Tensor) -> torch.Tensor:
        W = W0 + self._delta(self.scale, self.reader, layer, W0.device)
        if self.relative_to_residual:
            W = W - self._delta(*self.init, layer, W0.device)
        magnitude = f"{PEFT_PREFIX}{layer}.lora_magnitude_vector"
        if magnitude in self.reader:  # DoRA (arXiv 2402.09353, Eq. 5): W' = m · V / ‖V‖_row with V = W0 + s·B A
            m = self.reader.get(magnitude).to(device=W0.device, dtype=torch.float32)  # (out,)
            W = (m / torch.linalg.norm(W, dim=1)).unsqueeze(1) * W
        return W


# ----------------------------------------------------------------------------- the methods

class LoraMethod(Method):
    """LoRA through peft: B (out, r) = 0 and A (r, in) random at init, alpha = r (scale 1)."""

    name = "lora"
    label = "LoRA"
    color = "tab:green"
    source = "LoRA, Hu et al. 2021 (arXiv 2106.09685), through peft (init_lora_weights=True)"
    init_family = "lora"  # the initialisation apply_peft_baseline / load_qpeft give: "lora" or "pissa"
    lora_options: dict = {}  # further peft.LoraConfig fields of a variant (a subclass sets them)

    def prepare(self, model, cfg, targets, *, task_type=CAUSAL_LM, train_fully=()):
        return apply_peft_baseline(model, self.init_family, cfg.rank, targets, cfg.dropout, cfg.svd, cfg.svd_niter,
                                   task_type=task_type, modules_to_save=list(train_fully) or None,
                                   svd_options=cfg.sorsa_config(targets).svd_options(),
                                   lora_options=self.lora_options)

    def initial_adapter_dir(self, run) -> Path | None:
        """Where the run keeps its initial adapter (PiSSA), or None."""
        return None

    def load_quantized(self, model_dir, cfg, targets, device, run=None):
        sorsa_cfg = cfg.sorsa_config(targets)
        init_dir = self.initial_adapter_dir(run) if run is not None else None
        return load_qpeft(model_dir, self.init_family, cfg.rank, targets, sorsa_cfg.quant_spec(), cfg.quant_iters, cfg.svd,
                          sorsa_cfg.svd_options(), init_factors=read_peft_factors(init_dir) if init_dir else None,
                          dropout=cfg.dropout, device=device, adapter_dir=run.adapter_dir if run is not None else None)

    def save(self, trainer, run, cfg, tokenizer):
        # PiSSA converts to a LoRA of the untouched base, except over a quantized residual (see the module docstring)
        convert_from = None if cfg.quantize else self.initial_adapter_dir(run)
        with trainer.full_trainable_parameters():
            if trainer.is_world_process_zero():
                save_peft_adapter(trainer.model, run.adapter_dir, convert_from)

    def load_trained(self, base, run):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(run.adapter_dir))

    def merge(self, model):
        return model.merge_and_unload()

    def dequantize(self, model, dtype):
        return super().dequantize(dequantize_peft(model, dtype), dtype)

    def trainable_files(self, run):
        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        # PiSSA's saved adapter is converted to rank 2r: count its rank-r initial adapter instead
        folder = self.initial_adapter_dir(run) or run.adapter_dir
        return [(folder / SAFETENSORS_WEIGHTS_NAME, lambda key: ".lora_" in key)]

    def weight_reader(self, checkpoint: Path, run, layers=None):
        return PeftWeights(checkpoint, self.initial_adapter_dir(run))


class PissaMethod(LoraMethod):
    """PiSSA through peft: A = √S Vh and B = U √S from the top-r SVD, the base becomes the residual."""

    name = "pissa"
    init_family = "pissa"
    label = "PiSSA"
    color = "tab:blue"
    source = "PiSSA, arXiv 2404.02948, through peft (init_lora_weights='pissa' / 'pissa_niter_N')"

    def initial_adapter_dir(self, run) -> Path:
        return run.pissa_init_dir

    def on_fresh_start(self, model, run):
        save_initial_pissa(model, run.pissa_init_dir)  # needed to convert the trained adapter (and for QPiSSA)
