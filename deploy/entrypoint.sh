#!/bin/sh
# Container entry point of the asyncgrpo images, then exec of the command (it gets SIGTERM directly).
#  - The services read their keys from the environment (ASYNCGRPO_API_KEY, ASYNCGRPO_ADMIN_API_KEY,
#    ASYNCGRPO_CONTROL_TOKEN, ASYNCGRPO_REWARD_API_KEY; services/asyncgrpo/utils/auth.py). Where they arrive as
#    files (docker compose's secrets under /run/secrets, a mounted Kubernetes Secret), NAME_FILE=/path sets NAME
#    to the file's content (trailing newlines dropped) and removes NAME_FILE; the file wins over a NAME already
#    set (said on stderr). The Helm chart sets NAME itself from its Secret (secretKeyRef): nothing to do here.
#    Exec probes do not pass through here: deploy/healthcheck.py reads NAME or NAME_FILE itself.
#  - ASYNCGRPO_RUN_ON_INDEX=K: run the command only in the pod whose index (ASYNCGRPO_POD_INDEX, else the
#    Job's JOB_COMPLETION_INDEX) is K, and idle elsewhere: the Helm chart's weight-sync sidecar is in every
#    trainer pod of the Indexed Job but belongs beside rank 0 only.
set -eu
for name in ASYNCGRPO_CONTROL_TOKEN ASYNCGRPO_API_KEY ASYNCGRPO_ADMIN_API_KEY ASYNCGRPO_REWARD_API_KEY; do
  file=$(printenv "${name}_FILE" || true)
  if [ -n "$file" ]; then
    if [ ! -r "$file" ]; then
      echo "asyncgrpo-entrypoint: ${name}_FILE=$file is not a readable file" >&2
      exit 2
    fi
    value=$(cat "$file")
    if [ -n "$(printenv "$name" || true)" ] && [ "$(printenv "$name")" != "$value" ]; then
      echo "asyncgrpo-entrypoint: both $name and ${name}_FILE are set; using the file's" >&2
    fi
    export "$name=$value"
    unset "${name}_FILE"
  fi
done
if [ -n "${ASYNCGRPO_RUN_ON_INDEX:-}" ]; then
  index=${ASYNCGRPO_POD_INDEX:-${JOB_COMPLETION_INDEX:-}}
  if [ "$index" != "$ASYNCGRPO_RUN_ON_INDEX" ]; then
    echo "asyncgrpo-entrypoint: pod index ${index:-unset}, this command runs in pod $ASYNCGRPO_RUN_ON_INDEX only: idle"
    trap 'kill "$pid" 2>/dev/null; exit 0' TERM INT
    while :; do sleep 3600 & pid=$!; wait "$pid"; done
  fi
fi
exec "$@"
