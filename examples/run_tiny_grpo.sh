#!/usr/bin/env bash
# GRPO on the tiny arithmetic task with every service as a local process (redis-server with AOF, a genserver,
# weight-sync, rollout and the megatron-core trainer): prepares the warm-started policy first (idempotent),
# then `asyncgrpo up` trains STEPS steps and evaluates the policy before and after on held-out prompts.
#
#   bash examples/run_tiny_grpo.sh [STEPS] [extra dotted overrides, e.g. --actor.group_size=16]
#
# The run directory (logs, checkpoints, the final model, eval.json) is printed at the start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS="${1:-40}"; shift || true
asyncgrpo prepare --out runs/tiny
exec asyncgrpo up --config examples/tiny_arithmetic.yaml --steps "$STEPS" "$@"
