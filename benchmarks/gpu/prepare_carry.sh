#!/usr/bin/env bash
# Run on a machine WITH internet (the CPU machine), from the repository root:
#     bash benchmarks/gpu/prepare_carry.sh
# Fills .cache/gpu/ (gitignored) with what the GPU machine lacks, as files to carry there:
#   - megatron-core as a cp312 wheel (the version pinned in constraints.txt), no deps (it needs only torch,
#     numpy and packaging, which the GPU machine has);
#   - the project's runtime packages the GPU machine lacks (the genserver's HTTP stack, redis-py, ...), as
#     cp312 wheels at the versions in constraints.txt (run_all.sh installs only those that do not import);
#   - Debian's redis-server + redis-tools .debs and the shared libraries they need that a plain
#     Debian/Ubuntu image may lack (checked with ldd after dpkg -x).
# Then `bash benchmarks/gpu/run_all.sh` on the GPU machine installs them from these files only.
# Prints the total size; it must stay under 64 MiB (the device tool's carry limit).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.cache/gpu
rm -rf "$OUT/redis" "$OUT/logs"  # what run_all.sh unpacks and logs: made again on the GPU machine, not carried
mkdir -p "$OUT/wheels" "$OUT/debs"
MCORE=$(sed -n 's/^megatron-core==//p' constraints.txt)
[ -n "$MCORE" ] || { echo "no megatron-core pin in constraints.txt" >&2; exit 2; }

echo "== megatron-core==$MCORE (cp312 wheel)"
rm -f "$OUT"/wheels/megatron_core-*.whl
python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any \
    -d "$OUT/wheels" "megatron-core==$MCORE"
# what the genserver, its client and the project's services import beyond torch/transformers/safetensors/
# prometheus-client/grpcio (which the GPU machine has), with their own dependencies
EXTRA="pydantic pydantic-core annotated-types typing-inspection typing-extensions fastapi starlette annotated-doc
uvicorn h11 click httpx httpcore anyio idna certifi redis msgpack pyyaml protobuf rich markdown-it-py mdurl pygments
opentelemetry-api"
for name in $EXTRA; do
    ver=$(sed -n "s/^$name==//p" constraints.txt)
    [ -n "$ver" ] || { echo "no pin for $name in constraints.txt" >&2; exit 2; }
    python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform linux_x86_64 --platform any -d "$OUT/wheels" "$name==$ver"
done
# the set must install on its own (no index): resolve it offline against these files alone
python3 -m pip install -q --dry-run --ignore-installed --no-index --find-links "$OUT/wheels" --python-version 3.12 \
    --only-binary=:all: --target "$(mktemp -d)" fastapi uvicorn httpx redis msgpack rich pyyaml protobuf pydantic
ls -l "$OUT/wheels"

echo "== redis-server .debs"
command -v apt-get >/dev/null || { echo "apt-get missing: cannot fetch the redis .debs" >&2; exit 2; }
( cd "$OUT/debs" && rm -f ./*.deb && (apt-get download redis-server redis-tools 2>/dev/null \
    || { apt-get update -qq && apt-get download redis-server redis-tools; }) )
# the libraries redis-server links against that are not in a base image: take their .debs too
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for d in "$OUT"/debs/*.deb; do dpkg -x "$d" "$tmp/root"; done
missing_libs() {  # libraries redis-server cannot resolve outside the usual system paths
    LD_LIBRARY_PATH="$tmp/root/usr/lib/x86_64-linux-gnu" ldd "$tmp/root/usr/bin/redis-server" | awk '/not found/ {print $1}'
}
echo "ldd of the unpacked redis-server:"; LD_LIBRARY_PATH="$tmp/root/usr/lib/x86_64-linux-gnu" ldd "$tmp/root/usr/bin/redis-server"
# libs resolved from this machine's /lib but possibly absent on the GPU machine: carry their packages
for lib in $(ldd "$tmp/root/usr/bin/redis-server" | awk '$3 ~ /^\// {print $3}'); do
    pkg=$(dpkg -S "$(readlink -f "$lib")" 2>/dev/null | head -1 | cut -d: -f1) || true
    [ -z "$pkg" ] && pkg=$(dpkg -S "$lib" 2>/dev/null | head -1 | cut -d: -f1) || true
    case "$pkg" in ""|libc6|libgcc-s1|libstdc++6|zlib1g|libssl3*|libcrypt1) ;;  # in every image (libssl3: python's ssl needs it)
        *) echo "also carrying $pkg (for $lib)"; (cd "$OUT/debs" && apt-get download "$pkg") ;; esac
done
[ -z "$(missing_libs)" ] || { echo "unresolved libraries: $(missing_libs)" >&2; exit 1; }
ls -l "$OUT/debs"

bytes=$(du -sb "$OUT" | cut -f1)
echo "== $OUT: $bytes bytes ($(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}') MiB; limit 64 MiB)"
[ "$bytes" -lt $((64 * 1024 * 1024)) ] || { echo "too big for the carry limit" >&2; exit 1; }
