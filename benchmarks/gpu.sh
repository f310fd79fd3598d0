#!/usr/bin/env bash
# One-GPU bf16 benchmark of train_sft.py, dpo.py, grpo.py and ppo_max.py on a ~0.5B Qwen2-shaped random model:
# tokens/s, peak GPU memory and the MFU of the policy update (benchmarks/gpu_bench.py says how each is counted).
#
#   bash benchmarks/gpu.sh --fetch     # HERE, with a package index: download the wheels a bare GPU machine lacks
#                                      # into benchmarks/wheels/ (git-ignored; ~14 MB), to carry beside the tree
#   bash benchmarks/gpu.sh             # ON THE GPU MACHINE: install what is missing from benchmarks/wheels/ (no index
#                                      # needed), then run the benchmark (~5 min on one H100/H200)
#   bash benchmarks/gpu.sh --tiny      # anywhere: the same code path on CPU with a tiny Qwen2 (tests/test_benchmarks.py)
#
# Any other arguments go to gpu_bench.py (--steps N, --scripts train_sft,grpo, --peak-tflops T, --out DIR).
# The GPU machine is assumed to have torch, transformers, accelerate and peft (and numpy, packaging, psutil, tqdm,
# typing-extensions, their requirements); it lacks tyro and DeepSpeed and their pure-Python requirements. Everything
# is installed with --no-deps from the carried wheels only, so nothing already installed (torch above all) changes.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
WHEELS=${GPU_BENCH_WHEELS:-$HERE/wheels}
PY=${PYTHON:-python}
# import name -> distribution (pinned to what the project's environment uses)
PKGS="tyro:tyro==1.0.17 docstring_parser:docstring-parser typeguard:typeguard deepspeed:deepspeed==0.19.8 hjson:hjson
cpuinfo:py-cpuinfo pydantic:pydantic pydantic_core:pydantic-core annotated_types:annotated-types
typing_inspection:typing-inspection msgpack:msgpack einops:einops ninja:ninja"

if [ "${1:-}" = "--fetch" ]; then
  mkdir -p "$WHEELS"
  pure=() binary=()
  for pair in $PKGS; do
    dist=${pair#*:}
    case $dist in
      deepspeed*) ;;
      pydantic-core*|msgpack*|ninja*) binary+=("$dist") ;;
      *) pure+=("$dist") ;;
    esac
  done
  # pydantic-core must match pydantic's pin: take the version the local pydantic requires
  core=$($PY - <<'EOF'
import importlib.metadata as md
print(next(r.split(";")[0].replace(" ", "") for r in md.requires("pydantic") if r.startswith("pydantic-core")))
EOF
)
  binary=("${binary[@]/pydantic-core/$core}")
  $PY -m pip download -q --no-deps -d "$WHEELS" "${pure[@]}"
  for v in 3.10 3.11 3.12 3.13; do  # the GPU machine's Python is not known in advance
    $PY -m pip download -q --no-deps --only-binary :all: --python-version "$v" --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" "${binary[@]}"
  done
  # DeepSpeed is published as an sdist only: build its (pure-Python, ops compiled at run time) wheel here
  $PY -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==0.19.8"
  du -sh "$WHEELS"
  exit 0
fi

TINY=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY=1; done
missing=()
for pair in $PKGS; do
  mod=${pair%%:*}
  $PY -c "import $mod" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ ! -d "$WHEELS" ]; then
    echo "[gpu.sh] missing: ${missing[*]}; no wheels in $WHEELS (run 'bash benchmarks/gpu.sh --fetch' where an index" \
         "is reachable and carry benchmarks/wheels with the tree)" >&2
    exit 2
  fi
  echo "[gpu.sh] installing from $WHEELS: ${missing[*]}" >&2
  $PY -m pip install -q --no-index --no-deps --find-links "$WHEELS" "${missing[@]}"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONWARNINGS=ignore DS_ACCELERATOR=${DS_ACCELERATOR:-}
[ -z "$DS_ACCELERATOR" ] && unset DS_ACCELERATOR
[ "$TINY" = 1 ] && export CUDA_VISIBLE_DEVICES=""  # the CPU check stays on the CPU even where a GPU is present
cd "$ROOT"
exec $PY benchmarks/gpu_bench.py "$@"
