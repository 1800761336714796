#!/usr/bin/env bash
# GRPO on the tiny arithmetic task with every service as a local process: redis-server, one genserver,
# weight-sync, rollout and the megatron-core trainer. Prepares the warm-started policy first (idempotent),
# trains STEPS steps, then evaluates the policy before and after on held-out prompts.
# (The later `asyncgrpo up` command replaces this script; the services and their config are the same.)
#
#   bash examples/run_tiny_grpo.sh [STEPS] [extra dotted overrides...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS="${1:-40}"; shift || true
OUT=runs/tiny
RUN="$OUT/grpo-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {  # url seconds
  for _ in $(seq 1 $(( $2 * 5 ))); do
    python3 -c "import httpx,sys; sys.exit(0 if httpx.get('$1', timeout=2).status_code == 200 else 1)" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "timed out waiting for $1; see the logs in $RUN" >&2; return 1
}

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install -y redis-server" >&2; exit 1; }
asyncgrpo prepare --out "$OUT"

REDIS_PORT=$(free_port); GEN_PORT=$(free_port); WS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$RUN" > "$RUN/redis.log" 2>&1 &
PIDS+=($!)
asyncgrpo genserver --model "$OUT/warm" --port "$GEN_PORT" --weight-version 0 > "$RUN/genserver.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$GEN_PORT/health" 120

CFG=(--config examples/tiny_arithmetic.yaml --fileroot="$RUN" --trial_name=run
     --redis.url="redis://127.0.0.1:$REDIS_PORT/0" --rollout.server_urls="[http://127.0.0.1:$GEN_PORT]"
     --weight_sync.port="$WS_PORT" --trainer.hf_save_interval="$STEPS" "$@")
asyncgrpo weight-sync "${CFG[@]}" > "$RUN/weight_sync.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$WS_PORT/health" 60
asyncgrpo rollout "${CFG[@]}" > "$RUN/rollout.log" 2>&1 &
PIDS+=($!)
echo "training $STEPS steps; logs in $RUN"
asyncgrpo trainer "${CFG[@]}" --max-steps "$STEPS" 2>&1 | tee "$RUN/trainer.log" | grep -E "step [0-9]+:|done" || true

FINAL="$RUN/tiny-arithmetic/run/hf/version_$STEPS"
[ -d "$FINAL" ] || { echo "no final HF checkpoint at $FINAL; see $RUN/trainer.log" >&2; exit 1; }
cleanup; PIDS=()
for m in "$OUT/warm" "$FINAL"; do
  echo "== $m"
  asyncgrpo evaluate --model "$m" --data "$OUT/task/test.jsonl" --max-prompts 200 --n-samples 4 --seed 0
done
