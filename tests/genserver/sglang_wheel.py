"""Files of the sglang==0.5.23 wheel that .ci/run downloads (`pip download --no-deps sglang==0.5.23 -d
.cache/wheels`), read without installing SGLang: ASYNCGRPO_SGLANG_WHEEL_DIR, default .cache/wheels. Without
the wheel a test skips, except under CI=true where it fails."""

from __future__ import annotations

import importlib.util
import os
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def wheel() -> Path:
    wheel_dir = Path(os.environ.get("ASYNCGRPO_SGLANG_WHEEL_DIR", ROOT / ".cache" / "wheels"))
    wheels = sorted(wheel_dir.glob("sglang-0.5.23-*.whl"))
    if not wheels:
        msg = (f"sglang 0.5.23 wheel not found in {wheel_dir}; run "
               f"`python3 -m pip download -q --no-deps sglang==0.5.23 -d {wheel_dir}`")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return wheels[0]


def read(member: str) -> bytes:
    """One file of the wheel, e.g. 'sglang/srt/utils/auth.py'."""
    with zipfile.ZipFile(wheel()) as z:
        return z.read(member)


def load_module(member: str, name: str, tmp_dir: Path) -> ModuleType:
    """Import one self-contained module file of the wheel by path (it must not import the rest of SGLang)."""
    out = tmp_dir / Path(member).name
    out.write_bytes(read(member))
    spec = importlib.util.spec_from_file_location(name, out)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
