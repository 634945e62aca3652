#!/usr/bin/env bash
# GPU check for memsteer's CUDA path (issue: GPU scoring with hand-written CUDA kernels).
#
# On a machine with an NVIDIA GPU (driver for CUDA 13) and PyTorch + transformers in `python3`:
#   scripts/gpu-check.sh            # builds with `--features cuda` when cargo is present
#   MEMSTEER_GPU_BIN=DIR scripts/gpu-check.sh   # or uses prebuilt `memsteer` and `memsteer-gpu-check`
# On a GPU machine without cargo, build here and carry the binaries (`.gpu-bin` is git-ignored):
#   cargo build --release -p memsteer-benches -p memsteer-cli \
#     --features memsteer-benches/cuda,memsteer-cli/cuda --bin memsteer-gpu-check --bin memsteer --bin memsteer-serve-load
#   mkdir -p .gpu-bin && cp target/release/memsteer target/release/memsteer-gpu-check target/release/memsteer-serve-load .gpu-bin/
#   strip .gpu-bin/*
#   then there: MEMSTEER_GPU_BIN=.gpu-bin scripts/gpu-check.sh
# Prints: parity with the CPU path (scoring, decoding with KV caches on the device, `memsteer serve --device cuda`
# against the CPU server, and the LM-Steer training step) and, for the Llama family, with transformers' goldens; the fused output layer; scoring at Pythia shapes (f16) and at Qwen2.5-0.5B and Llama-3.2-1B shapes (bf16), T = 2048, B = 8;
# the same measurements by PyTorch on the same GPU, `memsteer logprobs --device cuda` end to end, and the server's
# throughput and latency at 1, 8 and 32 clients on the device.
# Output goes to stdout and, when $OUT is set, to $OUT/gpu-check.md.
# `scripts/gpu-check.sh quick` runs only the checks against the CPU (scoring, decoding with device caches, the
# server, the steer step) and the server under load (no speed of scoring, no profile, no PyTorch, no CLI runs):
# a few minutes, for a first look at new kernels.
set -uo pipefail
quick=0
[ "${1:-}" = quick ] && quick=1
cd "$(dirname "$0")/.."
bin="${MEMSTEER_GPU_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release -p memsteer-benches -p memsteer-cli \
    --features memsteer-benches/cuda,memsteer-cli/cuda --bin memsteer-gpu-check --bin memsteer --bin memsteer-serve-load \
    || exit 1
  bin=target/release
fi
log="${OUT:-/tmp}/gpu-check.md"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "## memsteer"
  status=0
  timeout 300 "$bin/memsteer-gpu-check" parity decode serve steer --work "$work" || status=1
  echo
  echo "## memsteer serve --device cuda under load (Pythia-70M shape, f16, 16-token prompts, 32 new tokens)"
  timeout 180 "$bin/memsteer-serve-load" --device cuda --dir "$work/serve-load" || status=1
  [ $quick = 1 ] && exit $status
  timeout 300 "$bin/memsteer-gpu-check" head logprobs families --work "$work" || status=1
  echo
  echo "## Where the time goes (one synchronised forward per shape, MEMSTEER_GPU_PROFILE=1)"
  MEMSTEER_GPU_PROFILE=1 timeout 200 "$bin/memsteer-gpu-check" profile --work "$work" || status=1
  echo
  echo "## PyTorch on the same GPU"
  PYTHONUNBUFFERED=1 timeout 300 python3 scripts/torch_reference.py || echo "(PyTorch reference failed)"
  echo
  echo "## memsteer logprobs --device cuda, end to end (Pythia-70M shape, f16, 64 × 2048 tokens)"
  "$bin/memsteer-gpu-check" write-pythia70m "$work/p70" || status=1
  t0=$(date +%s.%N)
  "$bin/memsteer" logprobs --device cuda --checkpoint "0=$work/p70" --instances "$work/p70/instances.jsonl" \
    --out "$work/p70.csv" --batch-size 8 --quiet || status=1
  t1=$(date +%s.%N)
  python3 -c "import sys; t=float(sys.argv[2])-float(sys.argv[1]); print(f\"wall {t:.2f} s for 131072 tokens, load and NVRTC compile included: {131072/t:,.0f} tokens/s\")" "$t0" "$t1"
  head -3 "$work/p70.csv"
  echo
  echo "## memsteer steer train: hidden states on the GPU against the CPU (Pythia-70M shape, 128 sequences of 256 tokens cached, 2 steps of 4)"
  for dev in cuda cpu; do
    t0=$(date +%s.%N)
    "$bin/memsteer" steer train --device $dev --model "$work/p70" --positive "$work/p70/instances.jsonl" \
      --negative "$work/p70/instances.jsonl" --out "$work/steer-$dev.safetensors" --rank 16 --steps 2 --batch-size 4 --quiet \
      || status=1
    t1=$(date +%s.%N)
    python3 -c "import sys; print(f'--device {sys.argv[3]}: {float(sys.argv[2]) - float(sys.argv[1]):.2f} s')" "$t0" "$t1" "$dev"
  done
  echo
  echo "## memsteer steer generate: every sample batched on the GPU against cached decoding on the CPU (Pythia-70M shape, 64 prompts × 4 samples, 16 new tokens)"
  python3 -c "import json,sys; [print(json.dumps({'id': i, 'tokens': json.loads(l)['tokens'][:8]})) for i, l in enumerate(open(sys.argv[1]))]" \
    "$work/p70/instances.jsonl" > "$work/prompts.jsonl"
  for dev in cuda cpu; do
    t0=$(date +%s.%N)
    "$bin/memsteer" steer generate --device $dev --model "$work/p70" --steer "$work/steer-cuda.safetensors:2" \
      --prompts "$work/prompts.jsonl" --samples 4 --max-new-tokens 16 --seed 3 --out "$work/gen-$dev.jsonl" || status=1
    t1=$(date +%s.%N)
    python3 -c "import sys; print(f'--device {sys.argv[3]}: {float(sys.argv[2]) - float(sys.argv[1]):.2f} s')" "$t0" "$t1" "$dev"
  done
  python3 -c "import json,sys; a,b=[[json.loads(l)['tokens'] for l in open(f)] for f in sys.argv[1:]]; print(f'{sum(x==y for x,y in zip(a,b))} of {len(a)} samples identical (f16 weights: the GPU rounds differently, and on this random model, whose distributions are nearly uniform, most sampled tokens move with it)')" \
    "$work/gen-cuda.jsonl" "$work/gen-cpu.jsonl" || status=1
  echo "a device that does not exist:"; "$bin/memsteer" logprobs --device cuda:7 --checkpoint "0=$work/p70" \
    --instances "$work/p70/instances.jsonl" --out "$work/x.csv" 2>&1 | tail -2
  exit $status
} 2>&1 | tee "$log"
