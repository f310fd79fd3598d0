#!/usr/bin/env bash
# The benchmark's one entry point: ours vs TRL 1.16.0, time per step, equal-work counters, learning efficiency and
# per-phase profiles and peak memory per step. Usage (from anywhere):
#
#   bash benchmarks/run.sh                   # full run: ~29 min measuring + up to 5 min waiting for a quiet machine
#   bash benchmarks/run.sh --only realistic  # SmolLM2-135M's shape, 128-token responses: ~15 min
#   bash benchmarks/run.sh --quick           # smoke run, ~3 min
#   bash benchmarks/gpu.sh                   # (separate) one-GPU bf16 steps on a ~0.5B Qwen2 shape; see gpu_bench.py
#
# TRL is a benchmark-only dependency: it is installed with --no-deps into its own folder, $RLHF_HOME/trl-1.16.0 (its
# other requirements are already in the project environment), and put on PYTHONPATH only for the benchmark's TRL
# processes. It is never added to requirements.txt nor installed into the project environment.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/.ci/env.sh"
TRL_VERSION=1.16.0
export TRL_HOME="$RLHF_HOME/trl-$TRL_VERSION"
if [ ! -f "$TRL_HOME/.complete" ]; then
  echo "[bench] installing trl==$TRL_VERSION into $TRL_HOME (benchmark only)" >&2
  rm -rf "$TRL_HOME"
  python -m pip install -q --no-deps --target "$TRL_HOME" "trl==$TRL_VERSION"
  touch "$TRL_HOME/.complete"
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled PYTHONWARNINGS=ignore
cd "$ROOT"
exec python benchmarks/bench.py "$@"
