"""The genserver's receive path: one persistent receive buffer per group (reused, grown, freed with the
group) over a real gloo group, and the native-dtype finite check the engine validates with."""

from __future__ import annotations

import gc

import pytest
import torch

from asyncgrpo.genserver.engine import validate_tensors
from asyncgrpo.genserver.weights import all_finite, receive_broadcast, receive_buffer_bytes, release_receive_buffers
from asyncgrpo.sglang.buckets import bucket_layout
from asyncgrpo.sglang.dist_group import destroy_custom_process_group, init_custom_process_group

from .procs import free_port


@pytest.fixture
def group():
    # world size 1: a real gloo group whose broadcasts leave the receive buffer's bytes as they are
    pg = init_custom_process_group("gloo", master_address="127.0.0.1", master_port=free_port(), world_size=1, rank=0,
                                   group_name=f"rb-{free_port()}", timeout=10)
    yield pg
    destroy_custom_process_group(pg)


def _base_ptr(tensors: dict[str, torch.Tensor]) -> int:
    return next(iter(tensors.values())).untyped_storage().data_ptr()


def test_buckets_reuse_one_buffer_which_grows_and_is_freed(group) -> None:
    names, dtypes, shapes = ["a", "b"], ["float32", "bfloat16"], [[7], [3, 5]]
    first = receive_broadcast(group, names, dtypes, shapes, "flattened_bucket")
    assert [tuple(t.shape) for t in first.values()] == [(7,), (3, 5)]
    assert [t.dtype for t in first.values()] == [torch.float32, torch.bfloat16]
    _, total = bucket_layout(dtypes, shapes)
    assert receive_buffer_bytes(group) == total
    again = receive_broadcast(group, names, dtypes, shapes, "flattened_bucket")
    assert _base_ptr(again) == _base_ptr(first)  # same memory, no new allocation
    small = receive_broadcast(group, ["c"], ["float16"], [[2]], None)  # per tensor, smaller: same buffer
    assert _base_ptr(small) == _base_ptr(first) and receive_buffer_bytes(group) == total

    big = receive_broadcast(group, ["w"], ["float32"], [[1000]], "flattened_bucket")
    assert receive_buffer_bytes(group) == 4000  # grown (the old one dropped)
    assert tuple(big["w"].shape) == (1000,)
    assert release_receive_buffers(group) == 4000 and receive_buffer_bytes(group) == 0


def test_buffer_goes_with_the_group() -> None:
    before = receive_buffer_bytes()
    pg = init_custom_process_group("gloo", master_address="127.0.0.1", master_port=free_port(), world_size=1, rank=0,
                                   group_name=f"rb-{free_port()}", timeout=10)
    out = receive_broadcast(pg, ["x"], ["float32"], [[256]], "flattened_bucket")
    assert receive_buffer_bytes() == before + 1024
    del out
    destroy_custom_process_group(pg)  # what /destroy_weights_update_group does, then drops the group
    del pg
    gc.collect()
    assert receive_buffer_bytes() == before


def test_bad_requests_are_clear_errors(group) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        receive_broadcast(group, ["a"], ["float32", "float32"], [[1]], None)
    with pytest.raises(ValueError, match="load_format 'zip'"):
        receive_broadcast(group, ["a"], ["float32"], [[1]], "zip")
    with pytest.raises(ValueError, match="not a torch dtype"):
        receive_broadcast(group, ["a"], ["floaty"], [[1]], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_matches_isfinite(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(4096, generator=g) * 100).to(dtype)
    assert all_finite(t) and all_finite(t.view(64, 64)) and all_finite(t[::3])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 1234, 4095):
            u = t.clone()
            u[pos] = bad
            assert not all_finite(u), (dtype, bad, pos)
            assert bool(torch.isfinite(u.float()).all()) is False
    big = torch.full((10,), torch.finfo(dtype).max, dtype=dtype)  # largest finite values are finite
    assert all_finite(big) and all_finite(-big)


def test_all_finite_other_dtypes() -> None:
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5)) and all_finite(torch.ones(3, dtype=torch.bool))
    assert all_finite(torch.tensor(1.5)) and not all_finite(torch.tensor(float("nan")))
    assert not all_finite(torch.tensor([1 + 1j, complex(0, float("inf"))]))


def test_validate_rejects_non_finite_in_native_dtype() -> None:
    params = {"w": torch.zeros(4, dtype=torch.bfloat16), "b": torch.zeros(2)}
    ok = {"w": torch.ones(4, dtype=torch.bfloat16), "b": torch.ones(2)}
    assert validate_tensors(params, ok) == []
    bad = {"w": torch.tensor([1, 2, float("inf"), 4], dtype=torch.bfloat16), "b": torch.tensor([0.0, float("nan")])}
    assert validate_tensors(params, bad) == ["w: contains NaN or inf", "b: contains NaN or inf"]
