"""SORSA as a PEFT method: `peft.get_peft_model(model, SorsaConfig(r=8, target_modules=[...]))`, `save_pretrained`,
`PeftModel.from_pretrained` (after `import sorsa.peft`), `merge_and_unload`, `unload`, `disable_adapter()`, and
several named adapters with `set_adapter`.

    import sorsa.peft  # registers "sorsa" with PEFT
    from sorsa.peft import SorsaConfig, orthonormal_loss
    model = peft.get_peft_model(base, SorsaConfig(r=8, target_modules=["q_proj", "v_proj"]))

The math is the core's (sorsa.core.functional): the top-r SVD of W gives U_0, S_0, Vh_0 (frozen, saved with the
adapter) and the trainable U_p, S_p, Vh_p, which start equal to them. The base weight is left untouched and the
layer computes W x + scale · (U_p (S_p ⊙ Vh_p x) − U_0 (S_0 ⊙ Vh_0 x)): the same function as the toolkit's
SORSALinear (W_res x + scale · U_p (S_p ⊙ Vh_p x) with W_res = W − scale · U_0 S_0 Vh_0), written so that several
adapters can share one base, `disable_adapter()` gives the base's output exactly and a reload needs no SVD and no
change of the base. The orthonormal regularizer (arXiv 2409.00055, Eq. 5) is `orthonormal_loss(model)`, or
`OrthonormalRegularizer(gamma)` as a transformers TrainerCallback.

PEFT's method types are a closed enum (`peft.utils.peft_types.PeftType`); registering a method outside PEFT's tree
needs a member added to it. That is done here, once, for the PEFT versions in TESTED_PEFT, and refused with a clear
error on others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .core import functional as SF
from .core.errors import MissingPackageError, UserError

TESTED_PEFT = ("0.22",)  # the releases whose PeftType / BaseTuner internals this module was tested against
NAME = "sorsa"
PREFIX = "sorsa_"


def _check_peft():
    try:
        import peft
    except ImportError:
        raise MissingPackageError("sorsa.peft needs the peft package: pip install peft") from None
    if ".".join(peft.__version__.split(".")[:2]) not in TESTED_PEFT:
        raise UserError(f"sorsa.peft registers SORSA inside PEFT's internals, tested with peft {', '.join(TESTED_PEFT)}"
                        f"; this is peft {peft.__version__}. Install one of those (pip install 'peft>=0.22,<0.23') "
                        "or use the toolkit's own adapters (sorsa.apply_sorsa)")
    return peft


peft = _check_peft()
from peft import PeftConfig  # noqa: E402
from peft.tuners._buffer_dict import BufferDict  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge  # noqa: E402
from peft.utils.peft_types import PeftType, register_peft_method  # noqa: E402


def _add_peft_type() -> None:
    """Add SORSA to PEFT's PeftType enum (a str Enum): the member maps and the class attribute, as the enum's own
    members are stored. register_peft_method refuses names that are not members."""
    if "SORSA" in PeftType.__members__:
        return
    member = str.__new__(PeftType, "SORSA")
    member._name_, member._value_ = "SORSA", "SORSA"
    PeftType._member_map_["SORSA"] = member
    PeftType._value2member_map_["SORSA"] = member
    PeftType._member_names_.append("SORSA")
    type.__setattr__(PeftType, "SORSA", member)


_add_peft_type()


@dataclass
class SorsaConfig(PeftConfig):
    """SORSA's settings as a PEFT config (task types as PEFT's: task_type="CAUSAL_LM", ...)."""

    r: int = field(default=8, metadata={"help": "the rank: how many singular triplets the adapter trains"})
    alpha: float | None = field(default=None, metadata={"help": "scale = alpha / r; None: 1, as the paper"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "layer names (as PEFT matches)"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "layer names left out"})
    svd: str = field(default="full", metadata={"help": "full, fast or randomized (sorsa.core.functional.svd_top)"})
    niter: int = field(default=4, metadata={"help": "randomized SVD: power iterations"})
    seed: int = field(default=0, metadata={"help": "randomized / fast SVD: the seed"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained fully and saved"})
    init_weights: bool = field(default=True, metadata={"help": "decompose the weights (False: zero factors, the "
                                                                 "state of a saved adapter before it is loaded)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SORSA
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        if not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"SorsaConfig: r must be an integer >= 1, got {self.r!r}")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


class SorsaLayer(BaseTunerLayer):
    """The SORSA factors of one nn.Linear, per adapter name: trainable U_p (out, r), S_p (r,), Vh_p (r, in) and the
    frozen initial U_0, S_0, Vh_0 (buffers, saved with the adapter)."""

    adapter_layer_names = ("sorsa_U", "sorsa_S", "sorsa_Vh")
    other_param_names = ("sorsa_U0", "sorsa_S0", "sorsa_Vh0", "sorsa_scale")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.sorsa_U, self.sorsa_S, self.sorsa_Vh = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.sorsa_U0, self.sorsa_S0, self.sorsa_Vh0 = (BufferDict({}, persistent=True) for _ in range(3))
        self.sorsa_scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, config: SorsaConfig) -> None:
        r = config.r
        if r > min(self.in_features, self.out_features):
            raise UserError(f"SorsaConfig: r = {r} exceeds min(out, in) = {min(self.in_features, self.out_features)}")
        if config.init_weights:  # the top-r SVD of W in float32 (never of a bf16 tensor)
            weight = self.get_base_layer().weight.detach().float()  # (out, in)
            U, S, Vh = SF.svd_top(weight, r, config.svd, niter=config.niter, seed=config.seed)
            S = S / config.scale  # S_p = σ / scale: scale · U S_p Vh is the rank-r part of W for any alpha
        else:
            U, S, Vh = torch.zeros(self.out_features, r), torch.zeros(r), torch.zeros(r, self.in_features)
        device = self.get_base_layer().weight.device
        self.sorsa_U[adapter_name] = nn.Parameter(U.clone().to(device))
        self.sorsa_S[adapter_name] = nn.Parameter(S.clone().to(device))
        self.sorsa_Vh[adapter_name] = nn.Parameter(Vh.clone().to(device))
        self.sorsa_U0[adapter_name], self.sorsa_S0[adapter_name], self.sorsa_Vh0[adapter_name] = \
            U.to(device), S.to(device), Vh.to(device)
        self.sorsa_scale[adapter_name] = config.scale
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scale · (U_p diag(S_p) Vh_p − U_0 diag(S_0) Vh_0), (out, in) in float32."""
        s = self.sorsa_scale[adapter_name]
        trained = SF.adapter_delta(self.sorsa_U[adapter_name], self.sorsa_S[adapter_name],
                                   self.sorsa_Vh[adapter_name], s)
        initial = SF.adapter_delta(self.sorsa_U0[adapter_name], self.sorsa_S0[adapter_name],
                                   self.sorsa_Vh0[adapter_name], s)
        return trained.float() - initial.float()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.sorsa_U:
                base = self.get_base_layer()
                merged = base.weight.data.float() + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise UserError(f"NaNs or infinities in the merged weights of adapter {name!r}")
                base.weight.data = merged.to(base.weight.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base = self.get_base_layer()
            base.weight.data = (base.weight.data.float() - self.get_delta_weight(name)).to(base.weight.dtype)


class SorsaLinear(nn.Module, SorsaLayer):
    """An nn.Linear with SORSA adapters: W x + Σ_active scale · (U_p (S_p ⊙ Vh_p x) − U_0 (S_0 ⊙ Vh_0 x))."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: SorsaConfig) -> None:
        super().__init__()
        SorsaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.sorsa_U:
                continue
            s, h = self.sorsa_scale[name], x.to(self.sorsa_U[name].dtype)  # the adapters' dtype (float32)
            trained = SF.adapter_forward(h, self.sorsa_U[name], self.sorsa_S[name], self.sorsa_Vh[name], s)
            initial = SF.adapter_forward(h, self.sorsa_U0[name], self.sorsa_S0[name], self.sorsa_Vh0[name], s)
            result = result + (trained - initial).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "sorsa." + super().__repr__()


class SorsaModel(BaseTuner):
    """The PEFT tuner: replaces each targeted nn.Linear with a SorsaLinear."""

    prefix: str = PREFIX
    tuner_layer_cls = SorsaLayer
    target_module_mapping = {}  # no per-architecture defaults: target_modules is required

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise UserError("SorsaConfig needs target_modules (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj', "
                            "'gate_proj', 'up_proj', 'down_proj'])")
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SorsaLayer):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, nn.Linear):
            raise UserError(f"SORSA adapts nn.Linear layers; {current_key} is a {type(target).__name__}")
        new_module = SorsaLinear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model, config, adapter_name):
        super()._post_injection_hook(model, config, adapter_name)
        # the factors exist now: the config saved with them says not to decompose again when they are loaded
        config.init_weights = False


def orthonormal_loss(model: nn.Module) -> torch.Tensor:
    """SORSA's orthonormal regularizer over the active adapters: the mean of ‖U_pᵀU_p − I‖_F and ‖Vh_p Vh_pᵀ − I‖_F
    over all of them (two terms per adapted layer), as sorsa.orthonormal_loss does for the toolkit's layers."""
    terms = []
    for module in model.modules():
        if isinstance(module, SorsaLayer):
            for name in module.active_adapters:
                if name in module.sorsa_U:
                    terms.extend(SF.orthonormal_loss_pair(module.sorsa_U[name], module.sorsa_Vh[name]))
    if not terms:
        raise UserError("orthonormal_loss: the model has no active SORSA adapter")
    return torch.stack(terms).mean()


def _regularized(model: nn.Module) -> list[torch.Tensor]:
    """The U_p and Vh_p of every active SORSA adapter of a model."""
    return [t for m in model.modules() if isinstance(m, SorsaLayer) for name in m.active_adapters
            if name in m.sorsa_U for t in (m.sorsa_U[name], m.sorsa_Vh[name])]


def OrthonormalRegularizer(gamma: float):  # noqa: N802 - it makes the callback, as a class would
    """SORSA's orthonormal regularizer as a transformers TrainerCallback, for any Trainer (TRL's SFTTrainer
    included): once per optimizer step, after gradient clipping and before the step, (gamma / lr / accumulation
    steps) · ∇L_o is added to the active adapters' U_p and Vh_p gradients, as the toolkit's own trainer does
    (sorsa.train.trainer; arXiv 2409.00055, Eq. 7). `trainer.add_callback(OrthonormalRegularizer(4e-4))`."""
    from .train.trainer import OrthonormalRegularizer as Callback

    return Callback(gamma, loss_fn=orthonormal_loss, params_fn=_regularized)


# ----------------------------------------------------------------------------- conversion to and from run.py's adapters

# the toolkit's tensor name (sorsa.core.adapter_io) -> this module's, per layer
TOOLKIT_NAMES = {"U_p": "sorsa_U", "S_p": "sorsa_S", "Vh_p": "sorsa_Vh", "U_0": "sorsa_U0", "S_0": "sorsa_S0",
                 "Vh_0": "sorsa_Vh0"}
PEFT_KEY_PREFIX = "base_model.model."


def from_toolkit_adapter(adapter_dir, out_dir, task_type: str | None = "CAUSAL_LM") -> SorsaConfig:
    """Write the toolkit's adapter folder (save_adapter, RUN/adapter) as a PEFT SORSA adapter that
    PeftModel.from_pretrained loads: the same factors, so the same function (the toolkit keeps W_res in the residual
    dtype, this form keeps W: equal up to that rounding)."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from .core.adapter_io import ADAPTER_WEIGHTS, read_adapter_config

    config, info = read_adapter_config(adapter_dir)
    if config.quantize:
        raise UserError(f"{adapter_dir} is a QSORSA adapter (a quantized residual); PEFT's SORSA keeps W itself")
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    out = {f"{PEFT_KEY_PREFIX}{layer}.{TOOLKIT_NAMES[f]}": tensors[f"{layer}.{f}"].float().contiguous()
           for layer in info["layers"] for f in TOOLKIT_NAMES}
    peft_config = SorsaConfig(r=config.rank, alpha=config.alpha, target_modules=sorted(info["layers"]), svd=config.svd,
                              niter=config.niter, seed=config.seed, init_weights=False, task_type=task_type)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(out_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config.save_pretrained(str(out_dir))
    return peft_config


def to_toolkit_adapter(peft_dir, out_dir) -> None:
    """Write a saved PEFT SORSA adapter (its default adapter) as the toolkit's adapter folder, which
    sorsa.load_adapter and run.py's --merge/--test read."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from .core.adapter_io import write_adapter
    from .core.options import SORSAConfig

    cfg = json.loads((Path(peft_dir) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "SORSA":
        raise UserError(f"{peft_dir} is a {cfg.get('peft_type')} adapter, not a SORSA one")
    tensors = load_file(str(Path(peft_dir) / "adapter_model.safetensors"))
    suffix = "." + TOOLKIT_NAMES["U_p"]
    layers = sorted(k[len(PEFT_KEY_PREFIX):-len(suffix)] for k in tensors if k.endswith(suffix))
    out = {f"{layer}.{f}": tensors[f"{PEFT_KEY_PREFIX}{layer}.{name}"] for layer in layers
           for f, name in TOOLKIT_NAMES.items()}
    config = SORSAConfig(rank=cfg["r"], alpha=cfg["alpha"], target_modules=layers, svd=cfg["svd"], niter=cfg["niter"],
                         seed=cfg["seed"])
    write_adapter(out_dir, config, out, layers)


register_peft_method(name=NAME, config_cls=SorsaConfig, model_cls=SorsaModel, prefix=PREFIX)
