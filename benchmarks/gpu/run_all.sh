#!/usr/bin/env bash
# One command for a lent GPU machine, from the repository root, with .cache/gpu carried
# (made by `bash benchmarks/gpu/prepare_carry.sh` on a machine with internet):
#
#     bash benchmarks/gpu/run_all.sh
#
# 1. installs what the GPU machine lacks from the carried files only (no network): megatron-core (cp312 wheel,
#    --no-deps), the project's missing runtime packages (wheels in .cache/gpu/wheels), redis-server (the Debian
#    .debs unpacked with dpkg -x into .cache/gpu/redis, its bin put on PATH);
# 2. prints the device (nvidia-smi, torch.cuda.get_device_name);
# 3. runs `python -m pytest -q tests/gpu`, every benchmarks/gpu/*.py (each with --append docs/benchmarks.md) and
#    benchmarks/genserver_throughput.py --device cuda --dtype bfloat16 --append docs/benchmarks.md;
# 4. copies docs/benchmarks.md and the logs into $OUT when it is set.
#
# One failing part does not stop the others; the exit code is 0 only when every part passed. Each part has a
# time limit (RUN_ALL_TESTS_TIMEOUT, RUN_ALL_BENCH_TIMEOUT seconds) and the whole run a budget (RUN_ALL_BUDGET,
# 480 s: a part that would start past it is reported as not run), so that it stays under ~8 minutes, inside
# the device tool's 600 s per command; measured parts on an H100/H200 should take well under that. RUN_ALL_SMOKE=1 passes --smoke to the benchmarks (a quick check of this script on any machine);
# RUN_ALL_APPEND=FILE appends the rows there instead of docs/benchmarks.md; RUN_ALL_CARRIED_REDIS=1 uses the
# carried redis-server even where one is installed.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CARRY=$ROOT/.cache/gpu
LOGS=$CARRY/logs/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
TESTS_TIMEOUT=${RUN_ALL_TESTS_TIMEOUT:-150}
BENCH_TIMEOUT=${RUN_ALL_BENCH_TIMEOUT:-120}
BENCH_MD=${RUN_ALL_APPEND:-docs/benchmarks.md}
BUDGET=${RUN_ALL_BUDGET:-480}
SMOKE=()
[ "${RUN_ALL_SMOKE:-0}" = 1 ] && SMOKE=(--smoke)
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/services:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
declare -a RESULTS=()
FAILED=0

part() {  # part NAME TIMEOUT CMD...: run one part with its log; record pass/fail; never exit
    local name=$1 limit=$2; shift 2
    local log="$LOGS/$name.log" t=$(date +%s) rc
    # the whole run stays inside RUN_ALL_BUDGET seconds (the device tool allows 600 s per command)
    local left=$(( BUDGET - (t - T0) - 5 ))
    if [ "$left" -lt 20 ]; then
        FAILED=1; RESULTS+=("FAIL  $name (not run: the ${BUDGET}s budget is spent)"); echo "=== $name: skipped, no time left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    if declare -F "$1" >/dev/null; then  # a function of this script (installs): no timeout wrapper
        "$@" > >(tee "$log") 2>&1
    else
        timeout --kill-after=15 "$limit" "$@" > >(tee "$log") 2>&1
    fi
    rc=$?
    local dt=$(( $(date +%s) - t ))
    if [ $rc -eq 0 ]; then RESULTS+=("PASS  $name (${dt}s)"); else
        FAILED=1; RESULTS+=("FAIL  $name (rc $rc$([ $rc -eq 124 ] && echo ', timed out'), ${dt}s; $log)"); fi
    echo "=== $name: rc $rc in ${dt}s"
}

install_python_packages() {
    local whl
    if ! "$PY" -c "import megatron.core" 2>/dev/null; then
        whl=$(ls "$CARRY"/wheels/megatron_core-*.whl 2>/dev/null | head -1)
        [ -n "$whl" ] || { echo "no megatron-core wheel in $CARRY/wheels: run benchmarks/gpu/prepare_carry.sh"; return 1; }
        "$PY" -m pip install -q --no-deps "$whl" || return 1
    fi
    # the project's runtime packages: pip installs only those missing (or too old), from the carried wheels only
    "$PY" -m pip install -q --find-links "$CARRY/wheels" fastapi uvicorn httpx redis msgpack rich pyyaml protobuf \
        pydantic || return 1
    # the project itself: PYTHONPATH (set above) always works; an editable install too where it is not installed
    # and setuptools is there (no build isolation: there is no index)
    if ! PYTHONPATH= "$PY" -c "import asyncgrpo" 2>/dev/null && "$PY" -c "import setuptools" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed; PYTHONPATH is used"
    fi
    "$PY" -c "import megatron.core, fastapi, httpx, redis, asyncgrpo; print('megatron-core', megatron.core.__version__)"
}

unpack_deb() {  # unpack_deb DEB DIR: dpkg -x, or a plain ar + tar where dpkg is missing
    if command -v dpkg >/dev/null; then dpkg -x "$1" "$2"; return; fi
    "$PY" - "$1" "$2" <<'EOF'
import io, sys, tarfile
data, out = open(sys.argv[1], "rb").read(), sys.argv[2]
assert data[:8] == b"!<arch>\n", "not a .deb (ar archive)"
pos = 8
while pos < len(data):
    name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
    if name.startswith("data.tar"):
        tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size])).extractall(out, filter="tar")
    pos += 60 + size + (size & 1)
EOF
}

install_redis() {
    if [ "${RUN_ALL_CARRIED_REDIS:-0}" != 1 ] && command -v redis-server >/dev/null && redis-server --version; then
        return 0
    fi
    local dest=$CARRY/redis deb
    rm -rf "$dest" && mkdir -p "$dest/bin" "$dest/lib"
    ls "$CARRY"/debs/*.deb >/dev/null 2>&1 || { echo "no .debs in $CARRY/debs: run prepare_carry.sh"; return 1; }
    for deb in "$CARRY"/debs/*.deb; do unpack_deb "$deb" "$dest/root" || return 1; done
    local real=$dest/root/usr/bin/redis-server
    [ -x "$real" ] || { echo "redis-server not in the .debs"; return 1; }
    # use a carried library only where the system has none (never shadow the system's libc-level libraries)
    local lib
    for lib in $(ldd "$real" | awk '/not found/ {print $1}'); do
        ln -sf "$dest/root/usr/lib/x86_64-linux-gnu/$lib" "$dest/lib/$lib"
    done
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' "$dest/lib" "$real" \
        > "$dest/bin/redis-server"
    chmod +x "$dest/bin/redis-server"
    [ -x "$dest/root/usr/bin/redis-cli" ] && ln -sf "$dest/root/usr/bin/redis-cli" "$dest/bin/redis-cli"
    export PATH=$dest/bin:$PATH
    redis-server --version
}

show_device() {
    nvidia-smi || echo "(no nvidia-smi)"
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
}

echo "run_all: $(date -u) on $(hostname); logs in $LOGS; rows appended to $BENCH_MD"
part install-python 120 install_python_packages
install_redis > >(tee "$LOGS/install-redis.log") 2>&1 && RESULTS+=("PASS  install-redis") \
    || { FAILED=1; RESULTS+=("FAIL  install-redis ($LOGS/install-redis.log)"); }
show_device 2>&1 | tee "$LOGS/device.log"
# the device name and the command, for the benchmark rows and the log
export ASYNCGRPO_RUN_ALL="bash benchmarks/gpu/run_all.sh"

part tests-gpu "$TESTS_TIMEOUT" "$PY" -m pytest -q tests/gpu -p no:cacheprovider
for b in benchmarks/gpu/*.py; do
    part "$(basename "$b" .py)" "$BENCH_TIMEOUT" "$PY" "$b" --append "$BENCH_MD" ${SMOKE[@]+"${SMOKE[@]}"}
done
if [ "${RUN_ALL_SMOKE:-0}" = 1 ]; then
    GS=(--levels 1,8 --requests-per-level 4 --max-new-tokens 8)
else
    GS=(--device cuda --dtype bfloat16 --levels 1,8,32,128 --requests-per-level 4 --waves 2 --max-new-tokens 128)
fi
part genserver_throughput "$BENCH_TIMEOUT" "$PY" benchmarks/genserver_throughput.py "${GS[@]}" --append "$BENCH_MD"
# item 1's train/inference log-prob mismatch, on the GPU (its script lives beside the CPU benchmarks)
if [ -f benchmarks/logprob_mismatch.py ]; then
    if [ "${RUN_ALL_SMOKE:-0}" = 1 ]; then LM=(--device cpu --prompts 4 --max-new-tokens 8); else LM=(--device cuda --preset base); fi
    part logprob_mismatch "$BENCH_TIMEOUT" "$PY" benchmarks/logprob_mismatch.py "${LM[@]}" --append "$BENCH_MD"
fi

echo
echo "=== run_all summary ($(( $(date +%s) - T0 ))s)"
printf '%s\n' "${RESULTS[@]}" | tee "$LOGS/summary.txt"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/logs" && cp -r "$LOGS"/. "$OUT/logs/" && cp "$BENCH_MD" "$OUT/" && echo "copied $BENCH_MD and logs to $OUT"
fi
[ $FAILED -eq 0 ] && echo "run_all: all parts passed" || echo "run_all: some parts FAILED"
exit $FAILED
