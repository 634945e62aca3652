#!/usr/bin/env bash
# `memsteer serve` against the official `openai` Python client (called by .ci/run; debug build, CPU).
# Usage: scripts/openai-check.sh [VENV_DIR]   (default: target/openai-venv; created with a pinned openai)
# Serves the tiny GPT-2 fixture with a chat template and a steer trained here, then runs
# scripts/openai_client_check.py against it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${1:-$(realpath -m "${CARGO_TARGET_DIR:-target}")/openai-venv}"
python="$venv/bin/python"
if [ ! -x "$python" ] || ! "$python" -c 'import openai' 2>/dev/null; then
  if python3 -m venv "$venv" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check openai==3.57.0
  else
    # No venv module (Debian without python3-venv): a private package directory instead.
    python3 -m pip install --quiet --disable-pip-version-check --target "$venv/site" openai==3.57.0
    python="python3"
    export PYTHONPATH="$venv/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if [ "$python" = python3 ] || [ ! -x "$python" ]; then
  python="python3"
  export PYTHONPATH="$venv/site${PYTHONPATH:+:$PYTHONPATH}"
fi

cargo build -q -p memsteer-cli
memsteer="$(realpath -m "${CARGO_TARGET_DIR:-target}")/debug/memsteer"
work="$(mktemp -d)"
server=""
cleanup() {
  if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

model="$work/tiny"
mkdir -p "$model"
cp fixtures/lm/tiny-gpt2-tokenizer/{config.json,model.safetensors,tokenizer.json} "$model/"
cat > "$model/tokenizer_config.json" <<'JSON'
{"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}
JSON
"$memsteer" steer train --model "$model" --positive fixtures/guide/positive.jsonl \
  --negative fixtures/guide/negative.jsonl --steps 20 --out "$work/sentiment.safetensors" --quiet

"$memsteer" --threads 2 serve --model "$model" --steer "sentiment=$work/sentiment.safetensors" --port 0 \
  2> "$work/serve.log" &
server=$!
for _ in $(seq 1 100); do
  grep -q "http://" "$work/serve.log" 2>/dev/null && break
  sleep 0.1
done
addr="$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -n 1)"
if [ -z "$addr" ]; then
  cat "$work/serve.log" >&2
  exit 1
fi
"$python" scripts/openai_client_check.py "$addr/v1" tiny sentiment
kill -TERM "$server"
wait "$server"
server=""
grep -q "memsteer serve: stopped" "$work/serve.log"
