"""A real genserver process on the tiny model, driven through the project's SGLang client and raw HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from asyncgrpo.sglang.client import SGLangClient, SGLangError

from .conftest import teacher_forced_logprobs

pytestmark = pytest.mark.slow

PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]  # "Q: 1+1=?\nA:"
LONG = {"max_new_tokens": 900, "ignore_eos": True}  # runs for seconds: time to pause/abort it


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


async def wait_running(c: SGLangClient, n: int = 1) -> None:
    """Until the server has n requests in its running batch (each then has >= 1 token)."""
    for _ in range(600):
        load = (await c.loads())["loads"][0]
        if load["num_running_reqs"] >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never saw {n} running requests: {load}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forced_forward(genserver, hf_model, temperature) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            return await asyncio.gather(*[
                c.generate(PROMPT[: 4 + i], {"max_new_tokens": 40, "temperature": temperature, "sampling_seed": i,
                                             "top_p": 0.9, "top_k": 50, "ignore_eos": True}) for i in range(4)])

    for i, res in enumerate(run(main())):
        assert len(res.output_ids) == len(res.output_logprobs) == len(res.token_versions) == 40
        ref = teacher_forced_logprobs(hf_model, PROMPT[: 4 + i], res.output_ids, temperature)
        delta = (ref - torch.tensor(res.output_logprobs)).abs().max().item()
        assert delta < 1e-4, f"max |delta logprob| {delta} at T={temperature}"
        assert res.finish_reason == {"type": "length", "length": 40} and res.prompt_tokens == 4 + i


def test_greedy_is_the_argmax_and_top_k_1_is_greedy(genserver, hf_model) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            return (await c.generate(PROMPT, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}),
                    await c.generate(PROMPT, {"max_new_tokens": 12, "top_k": 1, "ignore_eos": True}))

    greedy, topk1 = run(main())
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy.output_ids == ids[len(PROMPT):] == topk1.output_ids


def test_sampling_seed_reproducible_alone_and_inside_a_batch(genserver) -> None:
    params = {"max_new_tokens": 30, "temperature": 1.0, "sampling_seed": 1234, "ignore_eos": True}

    async def main():
        async with SGLangClient(genserver.url) as c:
            alone = await c.generate(PROMPT, params)
            crowd = await asyncio.gather(c.generate(PROMPT, params), *[
                c.generate(PROMPT[:5], {"max_new_tokens": 30, "sampling_seed": k}) for k in range(6)])
            other = await c.generate(PROMPT, {**params, "sampling_seed": 99})
            return alone, crowd[0], other

    alone, batched, other = run(main())
    assert alone.output_ids == batched.output_ids
    assert alone.output_ids != other.output_ids


def test_concurrent_requests_are_batched(genserver) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            before = (await c.server_info())["internal_states"][0]
            await asyncio.gather(*[c.generate(PROMPT, {"max_new_tokens": 128, "ignore_eos": True}) for _ in range(8)])
            return before, (await c.server_info())["internal_states"][0]

    before, after = run(main())
    # 8 * 128 tokens in fewer decode steps than one request at a time would need
    assert after["max_batch_seen"] >= 2
    assert after["steps"] - before["steps"] < 8 * 128


def test_n_batch_and_rids(genserver) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            many = await c.generate_n(PROMPT, {"max_new_tokens": 5, "sampling_seed": 3}, n=3, rid="grp")
            return many

    many = run(main())
    assert [r.rid for r in many] == ["grp_0", "grp_1", "grp_2"]
    assert len({tuple(r.output_ids) for r in many}) == 3
    body = {"input_ids": [PROMPT, PROMPT[:3]], "sampling_params": {"max_new_tokens": 4}, "rid": ["a", "b"]}
    out = httpx.post(f"{genserver.url}/generate", json=body, timeout=60).json()
    assert [o["meta_info"]["id"] for o in out] == ["a", "b"] and [o["meta_info"]["prompt_tokens"] for o in out] == [11, 3]
    # ignore_eos: an unseeded sample ends at EOS within 3 tokens about 1 run in 120 on the tiny model
    out = httpx.post(f"{genserver.url}/generate", json={"text": "Q: 2+2=?", "sampling_params": {"max_new_tokens": 3,
                                                        "ignore_eos": True}}, timeout=60).json()
    assert out["meta_info"]["prompt_tokens"] == 8 and len(out["output_ids"]) == 3
    out = httpx.post(f"{genserver.url}/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 0}},
                     timeout=60).json()
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


def test_stop_conditions(genserver, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    greedy = {"max_new_tokens": 40, "temperature": 1.0, "sampling_seed": 5, "ignore_eos": True}  # seeded: repeatable

    async def main():
        async with SGLangClient(genserver.url) as c:
            free = await c.generate(PROMPT, greedy)
            third = free.output_ids[2]
            by_id = await c.generate(PROMPT, {**greedy, "stop_token_ids": [third]})
            # a stop string: the first printable ASCII byte the greedy completion emits after token 0
            ch = [tok.decode([t]) for t in free.output_ids]
            j = next(i for i, x in enumerate(ch) if i > 0 and len(x) == 1 and x.isascii() and x.isprintable()
                     and x not in "".join(ch[:i]))
            s = ch[j]
            by_str = await c.generate(PROMPT, {**greedy, "stop": [s]})
            kept = await c.generate(PROMPT, {**greedy, "stop": [s], "no_stop_trim": True})
            min_new = await c.generate(PROMPT, {**greedy, "stop_token_ids": [third], "min_new_tokens": 10})
            return free, by_id, by_str, kept, min_new, third, j, s

    free, by_id, by_str, kept, min_new, third, j, s = run(main())
    first_third = free.output_ids.index(third)
    assert by_id.output_ids == free.output_ids[: first_third + 1]
    assert by_id.finish_reason == {"type": "stop", "matched": third}
    assert by_str.finish_reason == {"type": "stop", "matched": s}
    assert by_str.output_ids == free.output_ids[: j + 1]
    assert by_str.text == tok.decode(free.output_ids[:j]) and kept.text == tok.decode(free.output_ids[: j + 1])
    assert len(min_new.output_ids) >= 10 and third not in min_new.output_ids[:9]


def test_unknown_sampling_key_is_400_and_client_error_names_it(genserver) -> None:
    r = httpx.post(f"{genserver.url}/generate", json={"input_ids": PROMPT, "sampling_params": {"max_tokens": 4}})
    assert r.status_code == 400 and "max_tokens" in r.json()["message"]

    async def main():
        async with SGLangClient(genserver.url) as c:
            await c.generate(PROMPT, {"max_tokens": 4})

    with pytest.raises(SGLangError, match=r"/generate failed: HTTP 400.*max_tokens") as ei:
        run(main())
    assert genserver.url in str(ei.value)


def test_stream_is_cumulative_and_ends_with_done(genserver) -> None:
    body = {"input_ids": PROMPT, "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
    chunks = []
    with httpx.stream("POST", f"{genserver.url}/generate", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    objs = [json.loads(c) for c in chunks[:-1]]
    assert [len(o["output_ids"]) for o in objs] == [1, 2, 3, 4, 5, 6]
    assert objs[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert len(objs[-1]["meta_info"]["output_token_logprobs"]) == 6


def test_abort_by_rid_prefix_returns_partial_tokens_with_logprobs(genserver, hf_model) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            keep = asyncio.create_task(c.generate(PROMPT, LONG, rid="keep-1"))
            task = asyncio.create_task(c.generate(PROMPT, LONG, rid="job7-sample-0"))
            await wait_running(c, 2)
            await c.pause("in_place")  # hold both where they are: the abort cannot race their completion
            await c.abort("job7-")
            res = await task
            await c.resume()
            return res, await keep

    res, kept = run(main())
    assert res.aborted and res.rid == "job7-sample-0"
    assert 0 < len(res.output_ids) < 900 and len(res.output_logprobs) == len(res.output_ids)
    ref = teacher_forced_logprobs(hf_model, PROMPT, res.output_ids, 1.0)
    assert (ref - torch.tensor(res.output_logprobs)).abs().max().item() < 1e-4
    assert not kept.aborted and len(kept.output_ids) == 900


def test_pause_abort_aborts_in_flight_and_new_requests_wait(genserver) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            task = asyncio.create_task(c.generate(PROMPT, LONG))
            await wait_running(c)
            await c.pause("abort")
            res = await task
            late = asyncio.create_task(c.generate(PROMPT, {"max_new_tokens": 5}))
            for _ in range(200):
                if (await c.loads())["loads"][0]["num_waiting_reqs"] == 1:
                    break
                await asyncio.sleep(0.02)
            waiting_done = late.done()
            health = await c.health_generate()
            await c.resume()
            return res, waiting_done, await late, health

    res, waiting_done, late, health = run(main())
    assert res.aborted and len(res.output_ids) > 0 and len(res.output_logprobs) == len(res.output_ids)
    assert res.finish_reason["message"] == "aborted by pause_generation"
    assert not waiting_done and not late.aborted and len(late.output_ids) >= 1 and health


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_keeps_in_flight_requests_and_resumes_them(genserver, hf_model, mode) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            task = asyncio.create_task(c.generate(PROMPT, {"max_new_tokens": 900, "ignore_eos": True, "temperature": 0.8}))
            await wait_running(c)
            await c.pause(mode)
            load1 = (await c.loads())["loads"][0]
            await asyncio.sleep(0.3)
            load2 = (await c.loads())["loads"][0]
            flush = None
            try:
                await c.flush_cache()
            except SGLangError as e:
                flush = e.status
            await c.resume()
            return await task, load1, load2, flush

    res, load1, load2, flush = run(main())
    if mode == "retract":
        assert load1["num_running_reqs"] == 0 and load1["num_waiting_reqs"] == 1
    else:
        assert load1["num_running_reqs"] == 1 and load1["num_waiting_reqs"] == 0
    assert load1 == {**load2, "num_total_tokens": load1["num_total_tokens"]} and load1["paused"]
    assert flush == 400  # requests are held: the cache cannot be flushed
    assert not res.aborted and len(res.output_ids) == 900 and res.finish_reason["type"] == "length"
    ref = teacher_forced_logprobs(hf_model, PROMPT, res.output_ids, 0.8)
    assert (ref - torch.tensor(res.output_logprobs)).abs().max().item() < 1e-4


def test_inspection_endpoints(genserver, tiny_model_dir) -> None:
    async def main():
        async with SGLangClient(genserver.url) as c:
            await c.flush_cache()  # idle: succeeds
            return (await c.health(), await c.health_generate(), await c.model_info(), await c.server_info(),
                    await c.loads())

    health, hg, info, sinfo, loads = run(main())
    assert health and hg
    assert info["model_path"] == str(tiny_model_dir) and info["weight_version"] == "default"
    assert info["architectures"] == ["Qwen2ForCausalLM"] and info["is_generation"]
    assert sinfo["max_context_length"] == 1024
    assert set(loads["loads"][0]) >= {"num_running_reqs", "num_waiting_reqs"}
    m = httpx.get(f"{genserver.url}/metrics").text
    for name in ("asyncgrpo_genserver_tokens_per_second", "asyncgrpo_genserver_running_requests",
                 "asyncgrpo_genserver_waiting_requests", "asyncgrpo_genserver_weight_version_info{version=\"default\"}",
                 "asyncgrpo_genserver_generated_tokens_total"):
        assert name in m, name
