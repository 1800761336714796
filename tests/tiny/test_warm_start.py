"""Warm start: the loss masks, the schedule, determinism, and a checkpoint that transformers loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from asyncgrpo.tasks import write_task
from asyncgrpo.tiny.warm_start import IGNORE_INDEX, WarmStartConfig, collate, completion_loss, encode_pair, lr_at, warm_start

EOS = 256


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("task")
    write_task(out, n_train=2000, n_test=50, seed=0)
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_labels_cover_completion_and_eos_only(tok) -> None:
    ids, labels = encode_pair(tok, "Q: 1+2=?\nA:", " 1+2=3 #### 3", EOS)
    n_prompt = len("Q: 1+2=?\nA:")  # one token per byte
    assert len(ids) == len(labels) == n_prompt + len(" 1+2=3 #### 3") + 1
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == EOS and tok.decode(ids[n_prompt:-1]) == " 1+2=3 #### 3"


def test_collate_masks_padding() -> None:
    batch = collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=EOS)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_completion_loss_ignores_masked_positions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 10)
    labels = torch.tensor([[-100, -100, 7, 2]])
    # Position t predicts label t+1: only logits[0, 1] -> 7 and logits[0, 2] -> 2 count.
    expected = (torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([7, 2])))
    assert torch.allclose(completion_loss(logits, labels), expected)
    logits2 = logits.clone()
    logits2[0, 0] += 100.0  # predicts a masked label: must not change the loss
    logits2[0, 3] += 100.0  # the last position predicts nothing
    assert torch.allclose(completion_loss(logits2, labels), expected)


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    cfg = WarmStartConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="steps"):
        WarmStartConfig(steps=0).validate()
    with pytest.raises(ValueError, match="lr"):
        WarmStartConfig(lr=0).validate()


def test_short_warm_start_learns_and_checkpoint_loads(tiny_model_dir: Path, task_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "warm"
    res = warm_start(tiny_model_dir, task_dir / "train.jsonl", out,
                     WarmStartConfig(steps=120, batch_size=16, warmup_steps=10, log_every=20), log=lambda _: None)
    # Uniform over 384 tokens is ln 384 = 5.95; learning the fixed format alone gets well below half of that.
    assert res.first_loss > 5.0
    assert res.final_loss < res.first_loss / 2.5
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "asyncgrpo_warm_start.json"):
        assert (out / name).exists(), name
    assert not (tmp_path / "warm.partial").exists()
    import json

    import torch

    meta = json.loads((out / "asyncgrpo_warm_start.json").read_text())
    # which kernels ran: the weights depend on them (prepare.py's table)
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and meta["threads"] >= 1, meta

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["Q: 12+7=?\nA:"], return_tensors="pt", add_special_tokens=False)
    seq = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert seq.shape[1] > enc["input_ids"].shape[1]
    # After a little training the greedy continuation has the worked-answer shape " a+b=" (maybe wrong numbers).
    # Greedy is an argmax, and this barely trained model has near-ties among digits (top-2 logit gaps of 0.005
    # measured); 120 steps amplify kernel rounding to ~1e-3 in the logits (gaps moved by <= 3e-3 between AVX2
    # and non-vectorised kernels), so which digit wins is the CPU's choice. The shape must hold for every
    # continuation greedy could take under any logit perturbation of up to NEAR_TIE / 2 (30x the observed).
    texts = _near_greedy_texts(model, tok, enc["input_ids"][0].tolist(), 8, EOS)
    assert texts and all(re.match(SHAPE, t) for t in texts), texts


SHAPE = r"^ \d+[+\-]\d+="  # the worked answer " a+b=..." (maybe with wrong numbers)
SHAPE_PREFIX = r"^(?: (?:\d+(?:[+\-](?:\d+)?)?)?)?$"  # text that may still grow into SHAPE
NEAR_TIE = 0.1  # logits within this of the maximum count as a tie (see above)


def _near_greedy_texts(model, tok, prompt: list[int], n: int, eos: int, limit: int = 512) -> list[str]:  # noqa: ANN001
    """The texts of every continuation (up to n tokens) greedy decoding could produce if logits moved by up to
    NEAR_TIE / 2: each step follows every token within NEAR_TIE of the maximum logit. A branch ends at eos,
    at n tokens, or as soon as its text has SHAPE or can no longer get it."""
    done: list[str] = []

    def walk(seq: list[int]) -> None:
        text = tok.decode(seq[len(prompt):], skip_special_tokens=True)
        if len(seq) - len(prompt) == n or seq[-1] == eos or re.match(SHAPE, text) or not re.match(SHAPE_PREFIX, text):
            done.append(text)
            assert len(done) <= limit, f"more than {limit} near-greedy continuations"
            return
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1]
        for t in torch.nonzero(logits >= logits.max() - NEAR_TIE).flatten().tolist():
            walk(seq + [t])

    walk(list(prompt))
    return done


def test_same_seed_same_weights(tiny_model_dir: Path, task_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = dict(steps=8, batch_size=8, warmup_steps=2)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        warm_start(tiny_model_dir, task_dir / "train.jsonl", tmp_path / name, WarmStartConfig(seed=seed, **cfg), log=lambda _: None)
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "a different seed should change the data order"
