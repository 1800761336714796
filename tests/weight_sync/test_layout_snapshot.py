"""Fast tests of the bucket layout, the shared-memory snapshot and the publisher (no servers)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from asyncgrpo.sglang.buckets import unpack_bucket
from asyncgrpo.weight_sync.checkpoint import write_checkpoint
from asyncgrpo.weight_sync.layout import BUCKET_ALIGN, Layout, TensorSpec, plan_layout, tensor_views
from asyncgrpo.weight_sync.publisher import WeightPublisher
from asyncgrpo.weight_sync.snapshot import OWNER, READER, SnapshotInUse, SnapshotDir


def _weights(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("a.weight", torch.randn(3, 5, generator=g)),  # 60 bytes fp32
        ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),  # 14 bytes, 2-byte aligned
        ("c.weight", torch.randn(100, 10, generator=g)),  # 4000 bytes: bigger than the bucket
        ("d.count", torch.arange(3, dtype=torch.int64)),  # 8-byte aligned after an odd size
        ("e.weight", torch.randn(2, 2, generator=g)),
    ]


def test_plan_layout_buckets_order_alignment_and_oversized_tensor() -> None:
    specs = [TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in _weights()]
    layout = plan_layout(specs, bucket_bytes=128)
    names = [b.names for b in layout.buckets]
    # order kept; the 4000-byte tensor gets a bucket of its own; no bucket over the limit unless it holds one tensor
    assert [n for b in names for n in b] == [s.name for s in specs]
    assert ["c.weight"] in names
    assert all(b.nbytes <= 128 or len(b.specs) == 1 for b in layout.buckets)
    for b in layout.buckets:
        assert b.offset % BUCKET_ALIGN == 0
        for s, off in zip(b.specs, b.tensor_offsets):
            elem = torch.empty((), dtype=getattr(torch, s.dtype)).element_size()
            assert off % elem == 0
    assert Layout.from_json(json.loads(json.dumps(layout.to_json()))) == layout


def test_plan_layout_splits_a_bucket_where_a_dtype_would_be_unaligned() -> None:
    """Buckets are unpadded (SGLang's flattened_bucket): a float32 after an odd number of bfloat16 elements
    starts a new bucket; aligned neighbours share one; every bucket passes the receiver's alignment check."""
    specs = [TensorSpec("a", "bfloat16", (3,)), TensorSpec("b", "float32", (2,)), TensorSpec("c", "bfloat16", (1,)),
             TensorSpec("d", "bfloat16", (1,)), TensorSpec("e", "float32", (1,))]
    layout = plan_layout(specs, bucket_bytes=1 << 20)
    assert [b.names for b in layout.buckets] == [["a"], ["b", "c", "d", "e"]]
    assert [b.tensor_offsets for b in layout.buckets] == [(0,), (0, 8, 10, 12)]
    assert [b.nbytes for b in layout.buckets] == [6, 16]
    one_dtype = plan_layout([TensorSpec(n, "bfloat16", (3,)) for n in "abc"], bucket_bytes=1 << 20)
    assert len(one_dtype.buckets) == 1 and one_dtype.buckets[0].tensor_offsets == (0, 6, 12)


def test_plan_layout_rejects_duplicates_and_empty() -> None:
    with pytest.raises(ValueError, match="twice"):
        plan_layout([TensorSpec("x", "float32", (1,)), TensorSpec("x", "float32", (1,))], 1024)
    with pytest.raises(ValueError, match="empty"):
        plan_layout([], 1024)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_layout([TensorSpec("x", "float32", (1,))], 0)


def test_publish_snapshot_buckets_unpack_like_the_server(tmp_path: Path) -> None:
    pub = WeightPublisher(tmp_path / "snap", bucket_bytes=128)
    w = _weights(1)
    res = pub.publish(iter(w), version=1)
    assert res.version == 1 and not res.notified and res.blocked_s >= 0
    snap = SnapshotDir(tmp_path / "snap")
    with snap.read_latest() as got:
        assert got is not None
        manifest, data = got
        assert manifest.version == 1
        got_tensors = {}
        for b in manifest.layout.buckets:
            # exactly what a server does with a flattened_bucket it received
            for name, t in zip(b.names, unpack_bucket(data[b.offset:b.offset + b.nbytes].clone(), b.dtypes, b.shapes)):
                got_tensors[name] = t
    for name, t in w:
        assert torch.equal(got_tensors[name], t), name


def test_publish_double_buffer_alternates_slots_and_casts(tmp_path: Path) -> None:
    pub = WeightPublisher(tmp_path, dtype="bfloat16", bucket_bytes=1 << 20)
    slots = [pub.publish(_weights(v), version=v).slot for v in (1, 2, 3)]
    assert slots == [0, 1, 0]
    with SnapshotDir(tmp_path).read_latest() as (manifest, data):
        views = dict((s.name, v) for s, v in tensor_views(data, manifest.layout))
        assert manifest.version == 3 and views["a.weight"].dtype == torch.bfloat16
        assert torch.equal(views["a.weight"], _weights(3)[0][1].to(torch.bfloat16))
    # slot 1 still holds version 2 untouched (the service may be broadcasting it)
    m1 = json.loads((tmp_path / "slot1.json").read_text())
    assert m1["version"] == 2


def test_publish_errors_name_the_problem(tmp_path: Path) -> None:
    pub = WeightPublisher(tmp_path, bucket_bytes=1024)
    pub.publish(_weights(), version=1)
    with pytest.raises(ValueError, match="not newer"):
        pub.publish(_weights(), version=1)
    with pytest.raises(ValueError, match="keep its order"):
        pub.publish(list(reversed(_weights())), version=2)
    with pytest.raises(ValueError, match="ended after 2 of 5"):
        pub.publish(_weights()[:2], version=3)


def _kill(pub: WeightPublisher) -> None:
    """What a SIGKILL does to a publisher: its owner lock is released, nothing is cleaned up."""
    os.close(pub.snapshot._roles.pop(OWNER))


def test_new_publisher_forgets_the_old_versions_and_continues_the_slot_cycle(tmp_path: Path) -> None:
    """A restarted trainer (new publisher) must not let the service serve its predecessor's versions (finding
    8: a new run found the last run's snapshot and served it), writes the slot the service is not reading,
    and may publish a lower version than the last one (resumed from an older checkpoint)."""
    old = WeightPublisher(tmp_path)
    old.publish(_weights(), version=4)  # slot 0
    _kill(old)
    assert SnapshotDir(tmp_path).latest() is None, "a dead trainer's snapshot is not served"
    pub = WeightPublisher(tmp_path)
    assert SnapshotDir(tmp_path).latest() is None, "the new trainer forgot version 4"
    res = pub.publish(_weights(), version=3)
    assert res.slot == 1 and SnapshotDir(tmp_path).latest() == {"slot": 1, "version": 3}


def test_one_live_trainer_and_one_live_service_per_snapshot(tmp_path: Path) -> None:
    pub = WeightPublisher(tmp_path)
    with pytest.raises(SnapshotInUse, match=f"pid {os.getpid()}"):
        WeightPublisher(tmp_path)
    reader = SnapshotDir(tmp_path)
    reader.claim(READER)
    with pytest.raises(SnapshotInUse, match="weight-sync"):
        SnapshotDir(tmp_path).claim(READER)
    pub.publish(_weights(), version=1)
    # the last of the two to leave removes the directory: nothing stays behind in /dev/shm
    pub.close()
    assert tmp_path.exists() and reader.latest() is None
    reader.release(READER)
    assert not tmp_path.exists()


def _hold_shared_lock(path: str, ready, release) -> None:  # type: ignore[no-untyped-def]
    with SnapshotDir(path).read_latest():
        ready.set()
        release.wait(30)


@pytest.mark.slow
def test_writer_waits_for_a_reader_of_the_slot_it_needs(tmp_path: Path) -> None:
    """Versions 1 (slot 0) and 2 (slot 1) published; while a reader holds slot 1, version 3 goes to slot 0
    freely, and version 4 (slot 1) must wait for the reader."""
    import threading

    pub = WeightPublisher(tmp_path)
    pub.publish(_weights(), 1)
    pub.publish(_weights(), 2)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    reader = ctx.Process(target=_hold_shared_lock, args=(str(tmp_path), ready, release))
    reader.start()
    try:
        assert ready.wait(60)
        pub.publish(_weights(), 3)  # slot 0: not blocked
        done = threading.Event()
        t = threading.Thread(target=lambda: (pub.publish(_weights(), 4), done.set()))
        t.start()
        assert not done.wait(1.0)  # blocked on slot 1
        release.set()
        assert done.wait(30)
        t.join()
    finally:
        release.set()
        reader.join(30)
    assert SnapshotDir(tmp_path).latest() == {"slot": 1, "version": 4}


def test_disk_checkpoint_loads_as_hf(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    named = [(n, p.detach() + 1.0) for n, p in model.named_parameters()]
    pub = WeightPublisher(tmp_path / "snap", bucket_bytes=4096)
    pub.publish(named, version=7)
    with SnapshotDir(tmp_path / "snap").read_latest() as (manifest, data):
        out = write_checkpoint(manifest, data, tmp_path / "ckpt", str(tiny_model_dir), keep=1)
    assert out.name.startswith("v00000007-")  # version, then the publish time (a version may be published again)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    sd = loaded.state_dict()
    for n, t in named:
        assert torch.equal(sd[n], t), n
    assert set(load_file(str(out / "model.safetensors"))) == {n for n, _ in named}


def test_removing_a_snapshot_deletes_only_its_own_files(tmp_path: Path) -> None:
    """weight_sync.snapshot_dir is the user's to choose (e.g. /dev/shm itself): what else lives there stays."""
    (tmp_path / "someone_elses.bin").write_bytes(b"x")
    pub = WeightPublisher(tmp_path)
    pub.publish(_weights(), version=1)
    pub.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["someone_elses.bin"]
