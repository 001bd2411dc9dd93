#!/usr/bin/env bash
# The five standard serving points (../shared/bench/run_suite.sh) for tgi-mp's default,
# tgi-mp --quantize int4 and vLLM-CPU (bf16, its best dtype on a bf16-native CPU), one
# after the other on the same machine, then the tables (../shared/bench/summarize.py).
#   usage: perf/side_by_side.sh [OUT_DIR]      (default /tmp/bench-side)
#   env:   VLLM_BIN (default /tmp/vllm-venv/bin/vllm, from setup_vllm.sh)
#          SMOL_HF_DIR (default /tmp/smol-hf, from convert_model.py)
#          MAX_DURATION (default 60 s per point) N (default 48 requests per point)
#          PEERS (default "tgimp tgimp-int4 vllm")
set -euo pipefail
B="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../shared/bench" && pwd)"
OUT="${1:-/tmp/bench-side}"
export BENCH_RUN_DIR="$OUT/run" LOADGEN_PY="${LOADGEN_PY:-python}"
export VLLM_BIN="${VLLM_BIN:-/tmp/vllm-venv/bin/vllm}" SMOL_HF_DIR="${SMOL_HF_DIR:-/tmp/smol-hf}"
export MAX_DURATION="${MAX_DURATION:-60}" GRACE="${GRACE:-20}"
n="${N:-48}"; export N_C1=$n N_C8=$n N_C32=$n N_LONG=$n N_PREFIX=$n
mkdir -p "$BENCH_RUN_DIR"

tgimp() {  # name, extra serve flags...
  local name="$1"; shift
  tgi-mp serve --port 18090 "$@" > "$BENCH_RUN_DIR/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    curl -sf http://127.0.0.1:18090/health > /dev/null && break
    kill -0 "$pid" || { tail "$BENCH_RUN_DIR/$name.log"; return 1; }
    sleep 1
  done
  SERVER_PID=$pid RESULTS_DIR="$OUT/$name" bash "$B/run_suite.sh" "$name" http://127.0.0.1:18090 tgi
  kill -TERM "$pid"; wait "$pid" || true
}

for peer in ${PEERS:-tgimp tgimp-int4 vllm}; do
  case "$peer" in
    tgimp) tgimp tgimp ;;
    tgimp-int4) tgimp tgimp-int4 --quantize int4 ;;
    vllm)
      url=$(DTYPE=bfloat16 bash "$B/peers/vllm.sh" start)
      RESULTS_DIR="$OUT/vllm" bash "$B/run_suite.sh" vllm "$url" openai-completions || true
      bash "$B/peers/vllm.sh" stop ;;
  esac
done
python "$B/summarize.py" "$OUT"
