"""One bad request never affects another, on a real genserver process: while 8 seeded requests generate,
out-of-vocabulary prompts (384 for the 384-token vocabulary, -1, 2**63) and other hostile bodies arrive. Each bad
one answers 400 with SGLang's error body naming the field; each good one finishes normally with exactly the
tokens it produces alone with the same seed; the server stays healthy."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPT = [81, 58, 32, 49, 43, 49, 61, 63, 10, 65, 58]
GOOD_TOKENS = 160


def good_body(i: int) -> dict:
    return {"input_ids": PROMPT[: 4 + i], "rid": f"good-{i}", "return_logprob": True,
            "sampling_params": {"max_new_tokens": GOOD_TOKENS, "ignore_eos": True, "sampling_seed": 100 + i,
                                "temperature": 0.9}}


def raw(obj: object) -> str:
    return json.dumps(obj)


# (endpoint, raw body, content type, what the message must name)
HOSTILE = [
    ("/generate", raw({"input_ids": [1, 384]}), "application/json", "input_ids[1]: token id 384 is outside"),
    ("/generate", raw({"input_ids": [1, -1]}), "application/json", "input_ids[1]: Input should be greater than or equal to 0"),
    ("/generate", raw({"input_ids": [1, 2**63]}), "application/json", "input_ids[1]: Input should be less than or equal to"),
    ("/generate", raw({"input_ids": [[1, 2], [3, 384]]}), "application/json", "input_ids[1][1]: token id 384"),
    ("/generate", raw({"input_ids": [1], "sampling_params": {"stop_token_ids": [384]}}), "application/json",
     "sampling_params.stop_token_ids[0]: token id 384"),
    ("/generate", raw({"input_ids": [1], "sampling_params": {"min_new_tokens": 2, "stop_token_ids": [10**6]}}),
     "application/json", "sampling_params.stop_token_ids[0]: token id 1000000"),
    ("/generate", '{"input_ids": [1], "sampling_params": {"temperature": NaN}}', "application/json",
     "sampling_params.temperature: Input should be a finite number"),
    ("/generate", '{"input_ids": [1], "sampling_params": {"top_p": Infinity}}', "application/json",
     "sampling_params.top_p: Input should be a finite number"),
    ("/generate", raw({"input_ids": [1], "sampling_params": {"sampling_seed": 2**70}}), "application/json",
     "sampling_params.sampling_seed: Input should be less than or equal to 9223372036854775807"),
    ("/generate", raw({"input_ids": [1], "sampling_params": {"max_tokens": 3}}), "application/json",
     "sampling_params.max_tokens: unknown field"),
    ("/generate", raw({"input_ids": [1], "sampling_params": {"n": 0}}), "application/json",
     "sampling_params.n: Input should be greater than or equal to 1"),
    ("/generate", raw({"input_ids": [[1]] * 8, "sampling_params": {"n": 1024}}), "application/json",
     "8192 sequences"),
    ("/generate", raw({"input_ids": [1], "sampling_params": {"max_new_tokens": 1.5}}), "application/json",
     "sampling_params.max_new_tokens: Input should be a valid integer"),
    ("/generate", raw({"input_ids": [1], "bogus": 1}), "application/json", "bogus: unknown field"),
    ("/generate", raw({"text": "hi", "input_ids": [1]}), "application/json", "exactly one of text and input_ids"),
    ("/generate", raw({"input_ids": PROMPT * 100}), "application/json", "the model's context is 1024"),
    ("/generate", raw({"input_ids": []}), "application/json", "input_ids: List should have at least 1 item"),
    ("/generate", raw([1, 2]), "application/json", "body: Input should be a valid dictionary"),
    ("/generate", "{not json", "application/json", "the body is not valid JSON"),
    ("/generate", '{"input_ids": ' + "[" * 50_000 + "]" * 50_000 + "}", "application/json", "could not be parsed"),
    ("/generate", raw({"input_ids": [1]}), "text/plain", "Content-Type: application/json"),
    ("/pause_generation", "{not json", "application/json", "the body is not valid JSON"),
    ("/pause_generation", raw({"mode": "forever"}), "application/json", "mode: Input should be 'abort', 'retract' or 'in_place'"),
    ("/abort_request", "{not json", "application/json", "the body is not valid JSON"),
    ("/abort_request", raw({"rid": 5}), "application/json", "rid: Input should be a valid string"),
    ("/update_weights_from_disk", "{not json", "application/json", "the body is not valid JSON"),
    ("/update_weights_from_disk", raw({}), "application/json", "model_path: required field is missing"),
    ("/update_weight_version", raw({"new_version": 3}), "application/json", "new_version: Input should be a valid string"),
    ("/init_weights_update_group", raw({"master_address": "127.0.0.1", "master_port": 70000, "rank_offset": 1,
                                        "world_size": 2}), "application/json", "master_port: Input should be less than"),
    ("/update_weights_from_distributed", raw({"names": ["a"], "dtypes": ["float32", "float32"], "shapes": [[1]]}),
     "application/json", "names (1), dtypes (2) and shapes (1)"),
    ("/get_weights_by_name", raw({"name": "lm_head.weight", "truncate_size": -1}), "application/json",
     "truncate_size: Input should be greater than or equal to 0"),
]


async def send_hostile(c: httpx.AsyncClient, path: str, body: str, ctype: str, expect: str) -> str | None:
    """None when the server answered as it must, else what went wrong."""
    r = await c.post(path, content=body, headers={"content-type": ctype}, timeout=30)
    try:
        got = r.json()
    except ValueError:
        return f"{path} {body[:60]}: {r.status_code} {r.text[:200]}"
    want = {"object": "error", "type": "BadRequest", "code": 400}
    if r.status_code != 400 or {k: got.get(k) for k in want} != want or expect not in got.get("message", ""):
        return f"{path} {body[:60]}: {r.status_code} {r.text[:300]} (wanted 400 naming {expect!r})"
    return None


def test_bad_requests_get_400_and_never_touch_good_ones(genserver) -> None:
    async def main():
        async with httpx.AsyncClient(base_url=genserver.url, timeout=120) as c:
            goods = [asyncio.create_task(c.post("/generate", json=good_body(i))) for i in range(8)]
            for _ in range(1000):  # fire while they are in the running batch
                if (await c.get("/v1/loads")).json()["loads"][0]["num_running_reqs"] >= 4:
                    break
                await asyncio.sleep(0.01)
            problems: list[str] = []
            rounds = 0
            while not all(g.done() for g in goods) or rounds == 0:
                res = await asyncio.gather(*[send_hostile(c, *h) for h in HOSTILE])
                problems += [p for p in res if p]
                rounds += 1
            good = [(await g).json() for g in goods]
            # alone, one at a time, on the same server
            solo = [(await c.post("/generate", json=good_body(i))).json() for i in range(8)]
            health = (await c.get("/health")).status_code
            return problems, rounds, good, solo, health

    problems, rounds, good, solo, health = asyncio.run(main())
    assert not problems, "\n".join(problems[:10])
    assert rounds >= 1 and health == 200
    for i, (g, s) in enumerate(zip(good, solo)):
        assert g["meta_info"]["finish_reason"] == {"type": "length", "length": GOOD_TOKENS}, g["meta_info"]
        assert g["output_ids"] == s["output_ids"], f"good-{i} differs from its solo run"
        assert [lp[0] for lp in g["meta_info"]["output_token_logprobs"]] == pytest.approx(
            [lp[0] for lp in s["meta_info"]["output_token_logprobs"]], abs=1e-4)
