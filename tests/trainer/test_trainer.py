"""The trainer in-process at world size 1 (gloo): logits, temperature log-probs, the GRPO step, HF save, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from asyncgrpo.trainer.train_step import Batch, GRPOTrainer, Sample, staleness_histogram
from trainer.workers import make_batch, make_config

pytestmark = pytest.mark.usefixtures("megatron_world1")


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")


def test_llama_untied_logits_match_hf(llama_untied_dir: Path) -> None:  # noqa: F811
    from asyncgrpo.trainer.hf_mapping import ModelArch
    from asyncgrpo.trainer.logprobs import forward_logits
    from asyncgrpo.trainer.model import build_gpt_model, load_hf_weights

    arch = ModelArch.from_dir(llama_untied_dir)
    model = build_gpt_model(arch, 1)
    load_hf_weights(model, llama_untied_dir, arch)
    ids = torch.randint(0, 384, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (forward_logits(model, ids) - _hf(llama_untied_dir)(ids).logits).abs().max()
    assert diff < 1e-5


def test_logprobs_and_entropy_at_temperature(tiny_model_dir: Path) -> None:
    from asyncgrpo.trainer.logprobs import token_logprobs

    trainer = GRPOTrainer(make_config(tiny_model_dir))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp, ent = token_logprobs(trainer.model, ids, 0.7, 384, with_entropy=True)
        ref = torch.log_softmax(_hf(tiny_model_dir)(ids).logits / 0.7, dim=-1)[:, :-1]
    want = ref.gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp[:, 1:], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[:, 1:], -(ref.exp() * ref).sum(-1), rtol=0, atol=1e-5)
    assert torch.all(lp[:, 0] == 0)


def _with_behav(trainer: GRPOTrainer, batch: Batch, offset: float) -> Batch:
    """The batch with behaviour log-probs = the current policy's log-probs + offset."""
    from asyncgrpo.trainer.train_step import pack

    packed = pack(batch.samples, 0)
    with torch.no_grad():
        prox = trainer._logp(trainer.model, packed["input_ids"])[0]
    out = []
    for i, s in enumerate(batch.samples):
        p = len(s.prompt_ids)
        lp = prox[i, p : p + len(s.completion_ids)] + offset
        out.append(Sample(s.prompt_ids, s.completion_ids, lp.tolist(), s.token_versions, s.reward, s.group_id))
    return Batch(out)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_behav_equal_prox_is_plain_grpo(tiny_model_dir: Path, agg: str) -> None:
    """First step: pi_theta = pi_prox so ratio = 1 and the loss is -(aggregate of A). With behav = prox the
    behaviour weight is 1 (plain GRPO); with behav = prox - 0.1 every token is weighted by e^0.1."""
    from asyncgrpo.trainer.train_step import batch_advantages

    results = {}
    for offset in (0.0, -0.1):
        cfg = make_config(tiny_model_dir, loss_agg_mode=agg, behav_imp_weight_cap=None)
        cfg.actor.adv_norm.mean_level = "none"  # uncentred advantages, so the plain loss is not 0
        trainer = GRPOTrainer(cfg)
        batch = _with_behav(trainer, make_batch(7), offset)
        adv = batch_advantages(batch, trainer.cfg)
        n = torch.tensor([len(s.completion_ids) for s in batch.samples], dtype=torch.float64)
        plain = -float(adv.double().mean()) if agg == "seq-mean-token-mean" else -float((adv.double() * n).sum() / n.sum())
        stats = trainer.train_step(batch)
        results[offset] = stats
        assert stats["clip_frac"] == 0.0
        assert stats["loss"] == pytest.approx(plain * math.exp(-offset), abs=1e-6)
    assert results[0.0]["behav_weight_mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(results[0.0]["loss"]) > 1e-3  # the check is not vacuous


def test_kl_to_reference_is_zero_at_first_step(tiny_model_dir: Path) -> None:
    trainer = GRPOTrainer(make_config(tiny_model_dir, kl_ctl=0.1))
    assert trainer.ref is not None
    first = trainer.train_step(make_batch(2))
    second = trainer.train_step(make_batch(3))
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    assert second["kl_ref"] > 0  # the policy moved away from the frozen reference


@pytest.mark.parametrize("dist_opt", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_resume_continues_like_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path, dist_opt: bool) -> None:
    from asyncgrpo.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    cfg = make_config(tiny_model_dir)
    cfg.trainer.use_distributed_optimizer = dist_opt
    cfg.optimizer.warmup_steps_proportion = 0.01  # a moving LR: the schedule state must be restored too
    cfg.trainer.total_steps = 200
    a = GRPOTrainer(cfg)
    a.train_step(make_batch(1))
    save_checkpoint(a, tmp_path, data_position={"stream_id": "5-0"})
    torch.manual_seed(123)  # RNG state is part of the checkpoint
    want = a.train_step(make_batch(2))
    want_w = dict(a.export_hf())

    b = GRPOTrainer(cfg)
    step_dir = latest_checkpoint(tmp_path)
    assert step_dir is not None and step_dir.name == "step_00000001"
    assert load_checkpoint(b, step_dir) == {"stream_id": "5-0"}
    assert b.version == 1
    got = b.train_step(make_batch(2))
    assert got["loss"] == want["loss"] and got["lr"] == want["lr"] and got["grad_norm"] == want["grad_norm"]
    for k, v in dict(b.export_hf()).items():
        assert torch.equal(v, want_w[k]), k
    # A fresh trainer that did NOT resume differs: the check can fail.
    c = GRPOTrainer(cfg)
    assert c.train_step(make_batch(2))["loss"] != want["loss"]


def test_save_hf_checkpoint_loads_in_transformers(tiny_model_dir: Path, tmp_path: Path) -> None:
    from asyncgrpo.trainer.logprobs import forward_logits
    from asyncgrpo.trainer.model import save_hf_checkpoint

    trainer = GRPOTrainer(make_config(tiny_model_dir))
    trainer.train_step(make_batch(4))
    out = save_hf_checkpoint(trainer.model, trainer.arch, tiny_model_dir, tmp_path / "hf")
    assert out is not None and (out / "tokenizer.json").exists()
    ids = torch.randint(0, 384, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (forward_logits(trainer.model, ids) - _hf(out)(ids).logits).abs().max()
    assert diff < 1e-5


def test_staleness_histogram_and_batch_validation() -> None:
    b = make_batch(0, n_groups=1, group_size=3, version=2)
    b.samples[0].token_versions[0] = 0
    h = staleness_histogram(b, trained_version=3)
    assert (h["staleness_le_1"], h["staleness_le_3"], h["staleness_max"]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="behav_logprobs"):
        Sample([1], [2, 3], [0.0], [0, 0], 1.0, "g")
    with pytest.raises(ValueError, match="group_size"):
        Batch([Sample([1], [2], [0.0], [0], 1.0, "a"), Sample([1], [2], [0.0], [0], 1.0, "a"), Sample([1], [2], [0.0], [0], 1.0, "b")])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_step_independent_of_micro_batch_size(tiny_model_dir: Path, agg: str) -> None:
    """Global normalisers: mbs=1 and mbs=8 give the same loss and the same weights, also when the behaviour
    cap masks tokens out of the loss (mask mode changes the token count the normaliser must use)."""
    results = []
    for mbs in (1, 8):
        cfg = make_config(tiny_model_dir, mbs=mbs, loss_agg_mode=agg, behav_imp_weight_cap=1.2, behav_imp_weight_mode="mask")
        trainer = GRPOTrainer(cfg)
        stats = trainer.train_step(make_batch(11))
        results.append((stats, dict(trainer.export_hf())))
    (s1, w1), (s8, w8) = results
    assert 0 < s1["behav_cap_frac"] < 1  # the cap really masked some tokens
    assert s1["loss"] == pytest.approx(s8["loss"], rel=1e-5, abs=1e-7)
    assert s1["grad_norm"] == pytest.approx(s8["grad_norm"], rel=1e-5)
    for k, v in w1.items():
        torch.testing.assert_close(w8[k], v, rtol=0, atol=2e-5, msg=k)


def test_compat_shims_map_cuda_to_cpu_only_without_cuda() -> None:
    from asyncgrpo.trainer import megatron_compat

    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        assert not megatron_compat.cpu_only()
        return
    with megatron_compat.cuda_on_cpu():
        t = torch.zeros(3, device="cuda")
        assert t.device.type == "cpu" and t.cuda() is t and t.type() == "torch.cuda.FloatTensor"
    assert t.type() == "torch.FloatTensor"  # outside the context nothing is rewritten
    assert torch.cuda.current_device() == torch.device("cpu")
