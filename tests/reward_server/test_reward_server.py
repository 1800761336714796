"""`asyncgrpo reward-server` as a real process: SGLang's /classify shapes, scores equal to the HF model's own
forward, requests from many clients batched together, auth as SGLang's, bad input a 400 naming the field."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest
import torch

from reward_server.conftest import KEY
from service_procs import free_port
TEXTS = ["Q: 2+3=?\nA: 2+3=5 #### 5", "Q: 2+3=?\nA: 2+3=6 #### 6", "Q: 10-4=?\nA:"]


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def _hf_scores(model_dir: Path, texts: list[str]) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for t in texts:  # one at a time: no padding, HF's own pooling is unambiguous
            out.append(float(model(torch.tensor([tok.encode(t)])).logits[0, 0]))
    return out


def test_classify_matches_the_hf_model_in_sglangs_shape(server, reward_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    want = _hf_scores(reward_model_dir, TEXTS)
    assert len(set(round(w, 4) for w in want)) == 3, want  # the texts score differently: the check below is not vacuous
    one = httpx.post(f"{url}/classify", json={"text": TEXTS[0]}, headers=_auth(), timeout=30).json()
    assert set(one) == {"embedding", "meta_info"} and len(one["embedding"]) == 1 and one["meta_info"]["prompt_tokens"] > 0
    batch = httpx.post(f"{url}/classify", json={"text": TEXTS, "rid": ["a", "b", "c"]}, headers=_auth(), timeout=30).json()
    assert [b["meta_info"]["id"] for b in batch] == ["a", "b", "c"]
    got = [b["embedding"][0] for b in batch]
    # a padded batch against one-at-a-time forwards: fp32 rounding of the same sums in other orders (~1e-6 of
    # scores ~1); 1e-4 is far below the gaps between the three scores (checked above)
    diffs = [abs(g - w) for g, w in zip(got, want)]
    assert max(diffs) < 1e-4, f"server {got} vs HF {want}: |diff| {diffs}"
    assert abs(one["embedding"][0] - want[0]) < 1e-4
    ids = httpx.post(f"{url}/classify", json={"input_ids": [[5, 6, 7], [5, 6]]}, headers=_auth(), timeout=30).json()
    assert len(ids) == 2 and ids[0]["meta_info"]["prompt_tokens"] == 3


def test_concurrent_clients_are_scored_in_batches(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server

    def batches() -> tuple[float, float]:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("asyncgrpo_reward_server_batch_size_count"))
        total = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("asyncgrpo_reward_server_batch_size_sum"))
        return count, total

    async def many(n: int) -> list[float]:
        async with httpx.AsyncClient(timeout=30, headers=_auth()) as c:
            rs = await asyncio.gather(*(c.post(f"{url}/classify", json={"text": TEXTS[i % 3]}) for i in range(n)))
        return [r.json()["embedding"][0] for r in rs]

    before = batches()
    scores = asyncio.run(many(24))
    after = batches()
    forwards, seqs = after[0] - before[0], after[1] - before[1]
    assert seqs == 24, (before, after)
    assert forwards < 24, f"24 concurrent requests took {forwards:.0f} forward passes: no batching"
    assert len({round(s, 4) for s in scores}) == 3  # each text kept its own score inside the batches


@pytest.mark.parametrize(("body", "fragment"), [
    ({}, "give exactly one of 'text' and 'input_ids'"),
    ({"text": "a", "input_ids": [1]}, "give exactly one of 'text' and 'input_ids'"),
    ({"text": []}, "text: empty batch"),
    ({"input_ids": [1, 99999]}, "input_ids: token id 99999 is outside the vocabulary"),
    ({"input_ids": [[1], []]}, "input_ids[1]: empty sequence"),
    ({"text": ["a", "b"], "rid": ["x"]}, "rid: 1 ids for 2 inputs"),
    ({"txt": "a"}, "txt"),
])
def test_bad_requests_get_400_naming_the_field(server, body: dict, fragment: str) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    r = httpx.post(f"{url}/classify", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 400 and fragment in r.text, (r.status_code, r.text)


def test_auth_as_sglang(server) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    assert httpx.post(f"{url}/classify", json={"text": "a"}, timeout=10).status_code == 401
    assert httpx.post(f"{url}/classify", json={"text": "a"}, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes stay open
    info = httpx.get(f"{url}/model_info", headers=_auth(), timeout=10).json()
    assert info["is_generation"] is False and info["num_labels"] == 1


def test_a_causal_lm_checkpoint_is_refused_with_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    import subprocess

    r = subprocess.run([sys.executable, "-m", "asyncgrpo.cli", "reward-server", "--model", str(tiny_model_dir),
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a reward model" in r.stderr and "ForTokenClassification" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
