#!/usr/bin/env bash
# GPU check for memsteer's CUDA path (issue: GPU scoring with hand-written CUDA kernels).
#
# On a machine with an NVIDIA GPU (driver for CUDA 13) and PyTorch + transformers in `python3`:
#   scripts/gpu-check.sh            # builds with `--features cuda` when cargo is present
#   MEMSTEER_GPU_BIN=DIR scripts/gpu-check.sh   # or uses prebuilt `memsteer` and `memsteer-gpu-check`
# Prints: parity with the CPU path, the fused output layer, scoring at Pythia shapes (T = 2048, B = 8),
# the same measurements by PyTorch on the same GPU, and `memsteer logprobs --device cuda` end to end.
# Output goes to stdout and, when $OUT is set, to $OUT/gpu-check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${MEMSTEER_GPU_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release -p memsteer-benches -p memsteer-cli \
    --features memsteer-benches/cuda,memsteer-cli/cuda --bin memsteer-gpu-check --bin memsteer || exit 1
  bin=target/release
fi
log="${OUT:-/tmp}/gpu-check.md"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "## memsteer"
  timeout 300 "$bin/memsteer-gpu-check" parity head logprobs --work "$work"
  status=$?
  echo
  echo "## Where the time goes (one synchronised forward per shape, MEMSTEER_GPU_PROFILE=1)"
  MEMSTEER_GPU_PROFILE=1 timeout 200 "$bin/memsteer-gpu-check" profile --work "$work"
  echo
  echo "## PyTorch on the same GPU"
  PYTHONUNBUFFERED=1 timeout 300 python3 scripts/torch_reference.py || echo "(PyTorch reference failed)"
  echo
  echo "## memsteer logprobs --device cuda, end to end (Pythia-70M shape, f16, 64 × 2048 tokens)"
  "$bin/memsteer-gpu-check" write-pythia70m "$work/p70"
  t0=$(date +%s.%N)
  "$bin/memsteer" logprobs --device cuda --checkpoint "0=$work/p70" --instances "$work/p70/instances.jsonl" \
    --out "$work/p70.csv" --batch-size 8 --quiet
  t1=$(date +%s.%N)
  python3 -c "import sys; t=float(sys.argv[2])-float(sys.argv[1]); print(f\"wall {t:.2f} s for 131072 tokens, load and NVRTC compile included: {131072/t:,.0f} tokens/s\")" "$t0" "$t1"
  head -3 "$work/p70.csv"
  echo "missing device in a CPU-only request:"; "$bin/memsteer" logprobs --device cuda:7 --checkpoint "0=$work/p70" \
    --instances "$work/p70/instances.jsonl" --out "$work/x.csv" 2>&1 | tail -2
  exit $status
} 2>&1 | tee "$log"
