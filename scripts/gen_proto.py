"""Generate the Python gRPC stubs from proto/ into services/ (asyncgrpo/v1/*_pb2*.py), reproducibly: the
pinned grpcio-tools' bundled protoc, fixed paths, sorted inputs. tests/control/test_grpc.py regenerates into a
temporary directory and fails when the committed stubs differ.

    python scripts/gen_proto.py            # write services/asyncgrpo/v1/
    python scripts/gen_proto.py --out DIR  # write DIR/asyncgrpo/v1/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from importlib.resources import files

    from grpc_tools import protoc

    protos = sorted(p.relative_to(PROTO).as_posix() for p in PROTO.rglob("*.proto"))
    include = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in out.rglob("*_pb2*.py*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "services")
    args = ap.parse_args()
    for p in generate(args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
