"""RWKV6 "Finch" (Peng et al. 2024, arXiv 2404.05892) as a transformers causal LM in pure PyTorch.

    configuration.py  RWKV6Config
    wkv.py            the WKV: per-token recurrence and the chunk-parallel form used for training
    modeling.py       the model (time / channel mixing, recurrent generation, checkpoint loading and saving)
    convert.py        the official `.pth` and Hugging Face "-HF" layouts and the conversion between them
    tokenizer.py      the RWKV world tokenizer
"""
from .configuration import RWKV6Config
from .convert import config_from_state_dict, hf_to_official_state_dict, official_to_hf_state_dict
from .modeling import RWKV6ForCausalLM, RWKV6Model, RWKV6State, load_rwkv6
from .tokenizer import VOCAB_FILE, RWKVWorldTokenizer, load_rwkv_tokenizer
from .wkv import wkv6_chunked, wkv6_recurrent

__all__ = ["RWKV6Config", "RWKV6ForCausalLM", "RWKV6Model", "RWKV6State", "load_rwkv6", "RWKVWorldTokenizer",
           "load_rwkv_tokenizer", "VOCAB_FILE", "wkv6_chunked", "wkv6_recurrent", "official_to_hf_state_dict",
           "hf_to_official_state_dict", "config_from_state_dict"]

# `AutoConfig` / `AutoModelForCausalLM` resolve model_type "rwkv6" (e.g. a merged model directory) to this package.
try:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("rwkv6", RWKV6Config)
    AutoModelForCausalLM.register(RWKV6Config, RWKV6ForCausalLM)
except ValueError:  # already registered (e.g. a module reload)
    pass
