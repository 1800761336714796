"""Weight updates on a real genserver: over torch.distributed gloo from a separate trainer process
(per tensor and flattened bucket), from disk, and version-only; weights and version change only on success."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asyncgrpo.genserver.weights import load_safetensors_dir
from asyncgrpo.sglang.client import SGLangClient, SGLangError

from .conftest import teacher_forced_logprobs
from .procs import GenServer, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = GenServer(tiny_model_dir, tmp_path_factory.mktemp("gs_weights") / "server.log", "--dist-timeout-s", "5")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def new_ckpt(tmp_path_factory) -> Path:
    from asyncgrpo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_seed1"), preset="tiny", arch="qwen2", seed=1)


def trainer(url: str, ckpt: Path, mode: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "tests.genserver.trainer_side", url, str(free_port()), f"g-{mode}",
                        str(ckpt), mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def state(url: str, names: list[str]) -> tuple[str, dict[str, list]]:
    async def main():
        async with SGLangClient(url) as c:
            return ((await c.model_info())["weight_version"],
                    {n: await c.get_weights_by_name(n, truncate_size=4) for n in names})
    return asyncio.run(main())


def expect(t: torch.Tensor) -> torch.Tensor:
    return t[:4].float()


def test_update_over_gloo_from_a_separate_process(server, new_ckpt, tiny_model_dir) -> None:
    new = load_safetensors_dir(new_ckpt)
    old = load_safetensors_dir(tiny_model_dir)
    names = sorted(new)
    first, last = names[0], names[-1]  # one per-tensor (fp32), one from the bf16 bucket
    v0, w0 = state(server.url, [first, last])
    assert v0 == "default" and torch.allclose(torch.tensor(w0[first]), expect(old[first]))

    out = trainer(server.url, new_ckpt, "update")
    assert out["per_tensor"]["success"] and out["bucket"]["success"]
    assert out["version_after_first"] == "default"  # no version given: label unchanged
    v1, w1 = state(server.url, [first, last])
    assert v1 == "v2"
    assert torch.equal(torch.tensor(w1[first]), expect(new[first]))
    assert torch.equal(torch.tensor(w1[last]), expect(new[last].to(torch.bfloat16).float()))


def test_failed_updates_leave_weights_and_version(server, tiny_model_dir, new_ckpt) -> None:
    names = sorted(load_safetensors_dir(new_ckpt))
    before = state(server.url, names[:2])

    out = trainer(server.url, new_ckpt, "bad_shape")
    assert "weights rejected, unchanged" in out["error"] and "shape (3, 3)" in out["error"]
    assert state(server.url, names[:2]) == before

    out = trainer(server.url, new_ckpt, "die")  # announced, then the trainer died before broadcasting
    assert out == {"died": True}

    async def after_death():
        async with SGLangClient(server.url) as c:
            # waits until the server's receive has failed (peer gone, or the 5 s collective timeout)
            await c.destroy_weights_update_group("g-die")
            return await c.generate(PROMPT, {"max_new_tokens": 3, "ignore_eos": True})

    res = asyncio.run(after_death())
    assert state(server.url, names[:2]) == before and len(res.output_ids) == 3

    async def disk_fail():
        async with SGLangClient(server.url) as c:
            with pytest.raises(SGLangError, match="/nonexistent/ckpt.: not an HF checkpoint directory.*does not exist"):
                await c.update_weights_from_disk("/nonexistent/ckpt", weight_version="x")
            await c.end_weight_update()  # the dead trainer never closed its session
            with pytest.raises(SGLangError, match="no weight update session"):
                await c.update_weights_from_distributed(["a"], ["float32"], [[1]], "g-update")
    asyncio.run(disk_fail())
    assert state(server.url, names[:2]) == before


def test_update_from_disk_then_logprobs_follow_new_weights(server, tiny_model_dir, hf_model) -> None:
    async def main():
        async with SGLangClient(server.url) as c:
            await c.update_weights_from_disk(str(tiny_model_dir), weight_version="disk-1")
            info = await c.model_info()
            res = await c.generate(PROMPT, {"max_new_tokens": 20, "ignore_eos": True})
            return info, res

    info, res = asyncio.run(main())
    assert info["weight_version"] == "disk-1" and set(res.token_versions) == {"disk-1"}
    ref = teacher_forced_logprobs(hf_model, PROMPT, res.output_ids, 1.0)
    assert (ref - torch.tensor(res.output_logprobs)).abs().max().item() < 1e-4


def test_version_change_mid_request_is_recorded_per_token(server) -> None:
    async def main():
        async with SGLangClient(server.url) as c:
            task = asyncio.create_task(c.generate(PROMPT, {"max_new_tokens": 900, "ignore_eos": True}))
            for _ in range(500):
                if (await c.loads())["loads"][0]["num_running_reqs"]:
                    break
                await asyncio.sleep(0.02)
            await c.pause("in_place")
            await c.update_weight_version("7")
            await c.resume()
            return await task

    res = asyncio.run(main())
    assert not res.aborted and len(res.token_versions) == 900
    k = res.token_versions.index("7")
    assert 0 < k and set(res.token_versions[:k]) == {"disk-1"} and set(res.token_versions[k:]) == {"7"}
    assert res.weight_version == "7" and res.meta_info["weight_versions"][-1] == {"version": "7", "start": k, "end": 900}


def test_non_finite_bucket_after_a_good_one_leaves_the_good_weights(server, new_ckpt) -> None:
    new = load_safetensors_dir(new_ckpt)
    a, b = sorted(new)[:2]
    out = trainer(server.url, new_ckpt, "nan")
    assert out["good"]["success"], out
    assert "weights rejected, unchanged" in out["bad"]["error"] and f"{b}: contains NaN or inf" in out["bad"]["error"]
    version, w = state(server.url, [a, b])
    assert version == "finite"  # the rejected bucket's version was not taken
    assert torch.equal(torch.tensor(w[a]), expect(new[a]))  # not new[a] + 1 from the rejected bucket
    assert torch.equal(torch.tensor(w[b]), expect(new[b]))


def test_update_from_tensor_by_reference_and_bad_payloads(server, new_ckpt) -> None:
    """/update_weights_from_tensor with a shared-memory bucket from this process (the CPU form of the CUDA-IPC
    path): weights and version change on success; a bad payload is a 400 naming the field, weights unchanged."""
    import base64
    import pickle

    import httpx

    from asyncgrpo.sglang.buckets import pack_bucket
    from asyncgrpo.sglang.tensor_payload import bucket_payload, serialize

    new = load_safetensors_dir(new_ckpt)
    names = sorted(new)[:3]
    tensors = [(new[n] + 0.5).contiguous() for n in names]
    flat = pack_bucket(tensors).share_memory_()
    payload = serialize(bucket_payload(flat, names, [t.dtype for t in tensors], [list(t.shape) for t in tensors]))

    async def main():
        async with SGLangClient(server.url) as c:
            with pytest.raises(SGLangError, match="no weight update session"):
                await c.update_weights_from_tensor([payload], weight_version="t1", load_format="flattened_bucket")
            before = await c.model_info()
            await c.begin_weight_update()
            evil = base64.b64encode(pickle.dumps(print)).decode()
            for bad, match in ((["%%%"], "serialized_named_tensors: not base64"),
                               ([evil], "builtins.print is not allowed"),
                               ([payload, payload], "serialized_named_tensors")):
                with pytest.raises(SGLangError, match=match):
                    await c.update_weights_from_tensor(bad, weight_version="bad", load_format="flattened_bucket")
            assert (await c.model_info())["weight_version"] == before["weight_version"]
            await c.update_weights_from_tensor([payload], weight_version="t1", load_format="flattened_bucket")
            await c.end_weight_update()
            return (await c.model_info())["weight_version"], {n: await c.get_weights_by_name(n, truncate_size=4) for n in names}

    version, got = asyncio.run(main())
    assert version == "t1"
    for n, t in zip(names, tensors):
        assert torch.equal(torch.tensor(got[n]), expect(t)), n
    r = httpx.post(f"{server.url}/update_weights_from_tensor", json={"serialized_named_tensors": []}, timeout=10)
    assert r.status_code == 400 and "serialized_named_tensors" in r.text, r.text
