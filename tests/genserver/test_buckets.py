"""Flattened weight buckets: the layout the trainer packs and genserver unpacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncgrpo.sglang.buckets import UnalignedBucket, bucket_layout, dtype_from_name, pack_bucket, unpack_bucket
from .sglang_wheel import load_module


def _mixed() -> list[torch.Tensor]:
    """Ordered by falling element size, so back-to-back packing keeps every offset aligned."""
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.randint(-5, 5, (1,), dtype=torch.int64, generator=g),
        torch.randn(2, 2, generator=g),
        torch.randn(5, 3, generator=g).to(torch.bfloat16),
        torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
    ]


def test_round_trip_mixed_dtypes_is_exact_and_unpadded() -> None:
    tensors = _mixed()
    dtypes = [str(t.dtype) for t in tensors]
    shapes = [list(t.shape) for t in tensors]
    flat = pack_bucket(tensors)
    offsets, total = bucket_layout(dtypes, shapes)
    assert flat.dtype == torch.uint8 and flat.numel() == total
    assert offsets == [0, 56, 64, 80, 110] and total == 113  # back to back: 7*8, 1*8, 4*4, 15*2, 3*1
    for a, b in zip(tensors, unpack_bucket(flat, dtypes, shapes)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_an_unaligned_offset_is_refused_not_padded() -> None:
    # 3 bfloat16 elements end at byte 6: a float32 cannot start there
    with pytest.raises(UnalignedBucket, match=r"tensor b .*byte 6.*4-byte"):
        bucket_layout(["bfloat16", "float32"], [[3], [2]], names=["a", "b"])
    with pytest.raises(UnalignedBucket):
        pack_bucket([torch.ones(3, dtype=torch.bfloat16), torch.ones(2)])
    with pytest.raises(ValueError, match="negative"):
        bucket_layout(["float32"], [[-1]])


def test_layout_is_sglangs_flattened_tensor_bucket(tmp_path: Path) -> None:
    """Our offsets are exactly those SGLang 0.5.23's receiver allocates (FlattenedTensorBucket.empty), and
    both refuse the same unaligned bucket; and SGLang rebuilds our packed bytes into the same tensors."""
    tb = load_module("sglang/srt/weight_sync/tensor_bucket.py", "sglang_tensor_bucket", tmp_path)
    cases = [
        [t for t in _mixed()],
        [torch.ones(5, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16), torch.ones(1, dtype=torch.uint8)],
        [torch.ones(4, 6), torch.ones(0), torch.ones(2, dtype=torch.float16), torch.ones(1, dtype=torch.bool)],
    ]
    for tensors in cases:
        names = [f"t{i}" for i in range(len(tensors))]
        dtypes, shapes = [str(t.dtype).removeprefix("torch.") for t in tensors], [list(t.shape) for t in tensors]
        offsets, total = bucket_layout(dtypes, shapes)
        theirs = tb.FlattenedTensorBucket.empty(names, dtypes, shapes, "cpu")
        assert offsets == [m.start_idx for m in theirs.get_metadata()], (offsets, theirs.get_metadata())
        assert total == theirs.get_flattened_tensor().numel()
        rebuilt = tb.FlattenedTensorBucket(flattened_tensor=pack_bucket(tensors), metadata=theirs.get_metadata())
        for t, (name, r) in zip(tensors, rebuilt.reconstruct_tensors()):
            assert r.dtype == t.dtype and torch.equal(r, t), name
    bad = (["a", "b"], ["bfloat16", "float32"], [[3], [2]])
    with pytest.raises(ValueError, match="Unaligned"):
        tb.FlattenedTensorBucket.empty(*bad, "cpu")
    with pytest.raises(UnalignedBucket):
        bucket_layout(bad[1], bad[2])


def test_names_as_sglang_sends_them() -> None:
    assert dtype_from_name("bfloat16") is torch.bfloat16
    assert dtype_from_name("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="not a torch dtype"):
        dtype_from_name("float33")


def test_bucket_size_mismatch_is_a_clear_error() -> None:
    flat = pack_bucket([torch.ones(4)])
    with pytest.raises(ValueError, match="16 bytes but dtypes/shapes describe 20"):
        unpack_bucket(flat, ["float32"], [[5]])
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bucket(torch.ones(4), ["float32"], [[1]])
