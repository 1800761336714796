"""The /update_weights_from_tensor payload: tensors by reference (shared memory on CPU), read back through an
allowlist, in SGLang 0.5.23's own shape (checked against the wheel's SafeUnpickler and FlattenedTensorBucket)."""

from __future__ import annotations

import ast
import base64
import io
import os
import pickle
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from asyncgrpo.sglang import tensor_payload as tp
from asyncgrpo.sglang.buckets import pack_bucket

from . import sglang_wheel


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("w", torch.randn(3, 4, generator=g)), ("b", torch.randn(5, generator=g).to(torch.bfloat16)),
            ("n", torch.tensor([7], dtype=torch.uint8))]


def _payload() -> tuple[str, list[tuple[str, torch.Tensor]], torch.Tensor]:
    named = _tensors()
    flat = pack_bucket([t for _, t in named]).share_memory_()
    obj = tp.bucket_payload(flat, [n for n, _ in named], [t.dtype for _, t in named], [list(t.shape) for _, t in named])
    return tp.serialize(obj), named, flat


def test_a_bucket_round_trips_by_reference() -> None:
    payload, named, flat = _payload()
    assert len(payload) < 2000  # names and a shared-memory file name, not the bytes
    got = tp.bucket_tensors(tp.deserialize(payload))
    assert list(got) == [n for n, _ in named]
    for n, t in named:
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    flat[0:4] = 0  # the receiver maps the sender's memory: a write shows through
    assert got["w"].view(-1)[0].item() == 0.0


def test_a_cpu_bucket_must_be_in_shared_memory() -> None:
    named = _tensors()
    flat = pack_bucket([t for _, t in named])
    with pytest.raises(ValueError, match="shared memory"):
        tp.bucket_payload(flat, [n for n, _ in named], [t.dtype for _, t in named], [list(t.shape) for _, t in named])


def _pickled(obj: object) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


def test_hostile_payloads_are_refused_with_the_field_named() -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("true",))

    cases = [
        ("%%% not base64", "not base64"),
        (_pickled(Evil()), "posix.system is not allowed"),
        (base64.b64encode(b"\x80\x04\x95").decode(), "cannot be loaded"),
    ]
    for payload, match in cases:
        with pytest.raises(tp.PayloadError, match=match) as e:
            tp.deserialize(payload)
        assert "serialized_named_tensors" in str(e.value)
    flat = torch.zeros(8, dtype=torch.uint8)
    meta = types.SimpleNamespace(name="x", shape=torch.Size([1]), dtype=torch.float32, start_idx=2, end_idx=6, numel=4)
    with pytest.raises(tp.PayloadError, match="unaligned"):
        tp.bucket_tensors({"flattened_tensor": flat, "metadata": [meta]})
    meta.start_idx, meta.end_idx = 4, 12
    with pytest.raises(tp.PayloadError, match="do not fit"):
        tp.bucket_tensors({"flattened_tensor": flat, "metadata": [meta]})
    with pytest.raises(tp.PayloadError, match="exactly"):
        tp.bucket_tensors({"flattened_tensor": flat})
    with pytest.raises(tp.PayloadError, match="not a \(name, tensor\) pair"):
        tp.named_tensors([("x", 1)])


def test_a_payload_cannot_allocate_or_map_what_it_likes() -> None:
    """Beyond SGLang's allowlist: torch's classes cannot be called (a pickle could allocate any size), and a
    shared-memory storage must carry torch's file name and fit the receiver's byte limit."""
    class Alloc:
        def __reduce__(self):  # noqa: ANN204
            return (torch.Tensor, (1000, 1000))

    with pytest.raises(tp.PayloadError, match="constructing Tensor is not allowed"):
        tp.deserialize(_pickled(Alloc()))
    payload, named, _flat = _payload()
    with pytest.raises(tp.PayloadError, match="larger than the 10 bytes"):
        tp.deserialize(payload, max_bytes=10)
    assert tp.bucket_tensors(tp.deserialize(payload, max_bytes=1 << 20))  # the real size passes
    raw = base64.b64decode(payload)
    name = re.search(rb"/torch_\d+_\d+_\d+", raw).group(0)
    forged = raw.replace(name, b"/etc/pas" + b"s" * (len(name) - 8))  # same length: the pickle stays valid
    with pytest.raises(tp.PayloadError, match="torch shared-memory file"):
        tp.deserialize(base64.b64encode(forged).decode())


class _Recorder(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.globals: set[tuple[str, str]] = set()

    def find_class(self, module: str, name: str):  # noqa: ANN201
        self.globals.add((module, name))
        return super().find_class(module, name)


def _sglang_allowed_globals() -> set[tuple[str, str]]:
    """SafeUnpickler.ALLOWED_GLOBALS of sglang/srt/utils/common.py in the wheel, read from its source."""
    tree = ast.parse(sglang_wheel.read("sglang/srt/utils/common.py").decode())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "SafeUnpickler":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "ALLOWED_GLOBALS":
                    return set(ast.literal_eval(stmt.value))
    raise AssertionError("SafeUnpickler.ALLOWED_GLOBALS not found in the wheel")


def test_sglang_would_accept_our_payload_and_we_accept_its(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload, named, _flat = _payload()
    rec = _Recorder(base64.b64decode(payload))
    obj = rec.load()
    allowed = _sglang_allowed_globals()
    assert rec.globals <= allowed, f"globals SGLang's SafeUnpickler refuses: {rec.globals - allowed}"
    # SGLang's loader reads the metadata by attribute into its FlattenedTensorBucket and rebuilds our tensors
    for pkg in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):  # so pickle can import the class by its path
        monkeypatch.setitem(sys.modules, pkg, types.ModuleType(pkg))
    monkeypatch.delitem(sys.modules, "sglang.srt.weight_sync.tensor_bucket", raising=False)
    tb = sglang_wheel.load_module("sglang/srt/weight_sync/tensor_bucket.py", "sglang.srt.weight_sync.tensor_bucket", tmp_path)
    monkeypatch.setattr(sys.modules["sglang.srt.weight_sync"], "tensor_bucket", tb, raising=False)
    meta = [tb.FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                       end_idx=m.end_idx, numel=m.numel) for m in obj["metadata"]]
    rebuilt = dict(tb.FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=meta).reconstruct_tensors())
    for n, t in named:
        assert torch.equal(rebuilt[n], t), n
    # and a payload an SGLang sender builds (its own metadata class) loads here
    theirs = tp.serialize({"flattened_tensor": obj["flattened_tensor"], "metadata": meta})
    got = tp.bucket_tensors(tp.deserialize(theirs))
    for n, t in named:
        assert torch.equal(got[n], t), n
