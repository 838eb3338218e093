#!/usr/bin/env bash
# `make gpu-check`: on a machine with one NVIDIA GPU and the project's .venv holding a CUDA build of torch (plus
# colossalai and the pins of requirements/), run the gpu-marked tests and print the throughput table of
# bench/train_throughput.py (zero2, zero2 + compile, gemini, 3d, the prune stage, plain PyTorch eager and
# torch.compile), within 8 minutes. `--dry_run`: the same on CPU at tiny sizes (tests/test_gpu_check.py runs it).
# PY=/path/to/python overrides the interpreter (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DRY=0
[[ "${1:-}" == "--dry_run" ]] && DRY=1
die() { echo "gpu-check: error: $*" >&2; exit 2; }

command -v "$PY" >/dev/null || die "no Python at $PY: run 'make setup TORCH=\"torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128\"' first, or pass PY=..."
"$PY" -c "import colossalai, transformers, pytest" 2>/dev/null \
    || die "$PY cannot import colossalai, transformers and pytest (make setup; see README, GPU)"
if (( ! DRY )); then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || die "$PY has torch $("$PY" -c 'import torch; print(torch.__version__)') and sees no CUDA GPU: it needs a CUDA build of torch and an NVIDIA GPU (--dry_run runs on CPU)"
fi

start=$SECONDS
echo "== gpu tests (pytest -m gpu)"
timeout 300 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests
tests_rc=$?
echo "== throughput (bench/train_throughput.py)"
bench_args=(--steps 8 --warmup 2)  # compile and HybridAdam's first build happen in the warm-up, not in the timing
(( DRY )) && bench_args=(--dry_run)
timeout 300 "$PY" bench/train_throughput.py "${bench_args[@]}"
bench_rc=$?
echo "gpu-check: $((SECONDS - start)) s; gpu tests exit $tests_rc, throughput exit $bench_rc"
(( tests_rc == 0 && bench_rc == 0 ))
