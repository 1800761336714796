"""Flattened weight buckets: the layout the trainer packs and genserver unpacks."""

from __future__ import annotations

import pytest
import torch

from asyncgrpo.sglang.buckets import bucket_layout, dtype_from_name, pack_bucket, unpack_bucket


def test_round_trip_mixed_dtypes_is_exact_and_aligned() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
        torch.randn(5, 3, generator=g).to(torch.bfloat16),
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.randn(2, 2, generator=g),
        torch.randint(-5, 5, (1,), dtype=torch.int64, generator=g),
    ]
    dtypes = [str(t.dtype) for t in tensors]
    shapes = [list(t.shape) for t in tensors]
    flat = pack_bucket(tensors)
    offsets, total = bucket_layout(dtypes, shapes)
    assert flat.dtype == torch.uint8 and flat.numel() == total
    assert offsets == [0, 4, 40, 96, 112]  # each offset a multiple of its element size
    for off, t in zip(offsets, tensors):
        assert off % t.element_size() == 0
    for a, b in zip(tensors, unpack_bucket(flat, dtypes, shapes)):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


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
