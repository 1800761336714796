"""The trainer in-process at world size 1 (gloo): logits, temperature log-probs, the GRPO step, HF save, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from asyncgrpo.trainer.train_step import Batch, GRPOTrainer, Sample, staleness_histogram
from trainer import numerics
from trainer.workers import capture_grads, make_batch, make_config, with_steps

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
        diff = float((forward_logits(model, ids) - _hf(llama_untied_dir)(ids).logits).abs().max())
    assert diff < numerics.LOGIT_ATOL, f"max|logits - HF logits| {diff:.3e} >= {numerics.LOGIT_ATOL:g}"


def test_logprobs_and_entropy_at_temperature(tiny_model_dir: Path) -> None:
    from asyncgrpo.trainer.logprobs import token_logprobs

    trainer = GRPOTrainer(make_config(tiny_model_dir))
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp, ent = token_logprobs(trainer.model, ids, 0.7, 384, with_entropy=True)
        ref = torch.log_softmax(_hf(tiny_model_dir)(ids).logits / 0.7, dim=-1)[:, :-1]
    want = ref.gather(-1, ids[:, 1:, None])[..., 0]
    # assert_close's message names the observed max |diff| and its index.
    torch.testing.assert_close(lp[:, 1:], want, rtol=0, atol=numerics.LOGP_ATOL)
    torch.testing.assert_close(ent[:, 1:], -(ref.exp() * ref).sum(-1), rtol=0, atol=numerics.ENTROPY_ATOL)
    assert torch.all(lp[:, 0] == 0)  # exact by construction: position 0 has no prediction and is filled with 0


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


@pytest.mark.parametrize(("agg", "loss"), [("seq-mean-token-mean", "ppo"), ("token-mean", "ppo"), ("seq-mean-token-mean", "gspo")])
def test_behav_equal_prox_is_plain_grpo(tiny_model_dir: Path, agg: str, loss: str) -> None:
    """First step: pi_theta = pi_prox so ratio = 1 and the loss is -(aggregate of A). With behav = prox the
    behaviour weight is 1 (plain GRPO); with behav = prox - 0.1 every token is weighted by e^0.1.

    behav is prox from a pass over the whole batch, the trainer's prox one over micro-batches of another
    padded length: the two differ by kernel rounding, a few ulp(6) = 4.8e-7 (plus the fp32 rounding of
    prox + offset), observed <= 4e-8. That moves w = exp(prox - behav) ~ 1 and the loss ~ 1 relatively by
    the same amount; 1e-5 (20 ulp(6)) bounds it and is 4 orders below the e^0.1 effect under test. GSPO's
    sequence ratio is 1 too at the first step (its clip range 3e-4 is 3 orders above the rounding)."""
    from asyncgrpo.trainer.train_step import batch_advantages

    results = {}
    for offset in (0.0, -0.1):
        cfg = make_config(tiny_model_dir, loss_agg_mode=agg, behav_imp_weight_cap=None, eps_clip=3e-4 if loss == "gspo" else 0.2,
                          eps_clip_higher=4e-4 if loss == "gspo" else None, policy_loss=loss)
        cfg.actor.adv_norm.mean_level = "none"  # uncentred advantages, so the plain loss is not 0
        trainer = GRPOTrainer(cfg)
        batch = _with_behav(trainer, make_batch(7), offset)
        adv = batch_advantages(batch, trainer.cfg)
        n = torch.tensor([len(s.completion_ids) for s in batch.samples], dtype=torch.float64)
        plain = -float(adv.double().mean()) if agg == "seq-mean-token-mean" else -float((adv.double() * n).sum() / n.sum())
        stats = trainer.train_step(batch)
        results[offset] = stats
        assert stats["clip_frac"] == 0.0  # exact: ratio is 1 up to rounding, 0.2 from the clip boundary
        want = plain * math.exp(-offset)
        assert abs(stats["loss"] - want) <= 1e-5, f"offset {offset}: loss {stats['loss']!r}, want {want!r}: |diff| {abs(stats['loss'] - want):.3e}"
    bw = results[0.0]["behav_weight_mean"]
    assert abs(bw - 1.0) <= 1e-5, f"behav_weight_mean {bw!r}: |diff from 1| {abs(bw - 1.0):.3e}"
    assert abs(results[0.0]["loss"]) > 1e-3  # the check is not vacuous


def test_process_advantages_reach_the_loss_at_their_tokens(tiny_model_dir: Path) -> None:
    """adv_estimator=grpo_process: first step, behav = prox, so ratio = behaviour weight = 1 and the loss is
    -(mean over sequences of the mean over its tokens of A_t) with A_t the process advantages. Placing them one
    position off (onto the prompt's last token, or past the end) changes that mean by the first step's A (O(1)),
    far above the 1e-5 rounding bound argued in test_behav_equal_prox_is_plain_grpo."""
    from asyncgrpo.trainer.train_step import batch_advantages

    cfg = make_config(tiny_model_dir, behav_imp_weight_cap=None, adv_estimator="grpo_process")
    trainer = GRPOTrainer(cfg)
    batch = with_steps(_with_behav(trainer, make_batch(7), 0.0))
    adv = batch_advantages(batch, trainer.cfg)
    assert [a.numel() for a in adv] == [len(s.completion_ids) for s in batch.samples]
    assert any(float(a[0]) != float(a[-1]) for a in adv)  # per-token: the steps differ
    want = -sum(float(a.double().mean()) for a in adv) / len(adv)
    stats = trainer.train_step(batch)
    assert abs(stats["loss"] - want) <= 1e-5, f"loss {stats['loss']!r}, want {want!r}: |diff| {abs(stats['loss'] - want):.3e}"
    assert abs(want) > 1e-3  # the check is not vacuous
    flat = torch.cat(adv)
    assert abs(stats["adv_max"] - float(flat.max())) <= 1e-6 and abs(stats["adv_min"] - float(flat.min())) <= 1e-6


def test_kl_to_reference_is_zero_at_first_step(tiny_model_dir: Path) -> None:
    trainer = GRPOTrainer(make_config(tiny_model_dir, kl_ctl=0.1))
    assert trainer.ref is not None
    first = trainer.train_step(make_batch(2))
    second = trainer.train_step(make_batch(3))
    # k3 = exp(-d) + d - 1 with d = logp - ref_logp: 0 where policy and reference compute the same forward
    # (observed exactly 0); were their kernels to differ, d ~ ulp(6) and fp32 k3 is ~ulp(1) = 1.2e-7 per
    # token, so 1e-6 bounds the noise. One Adam step (lr 1e-3) gives ~6e-4, far above it.
    assert abs(first["kl_ref"]) <= 1e-6, f"kl_ref at the first step {first['kl_ref']!r}"
    assert second["kl_ref"] > 1e-5, f"kl_ref after one step {second['kl_ref']!r}: the policy did not move from the reference"


def test_kl_in_reward_shapes_the_advantages_not_the_loss(tiny_model_dir: Path) -> None:
    """use_kl_in_reward: no KL term in the loss; each completion's reward less kl_ctl x its summed KL. At the first
    step policy = reference (KL exactly 0, see above); after one step (lr 1e-3) the KL is ~6e-4 per token, and
    with kl_ctl 10 over 2-8 tokens the rewards move by ~1e-2, so the advantages (fp32, ~1e-7) differ visibly."""
    from asyncgrpo.trainer.train_step import batch_advantages

    trainer = GRPOTrainer(make_config(tiny_model_dir, kl_ctl=10.0, use_kl_in_reward=True))
    assert trainer.ref is not None and trainer.loss_params.kl_ctl == 0.0
    first = trainer.train_step(make_batch(2))
    assert "kl_loss" not in first and abs(first["kl_reward_mean"]) <= 1e-6, first.get("kl_reward_mean")
    batch = make_batch(3)
    raw = batch_advantages(batch, trainer.cfg)
    second = trainer.train_step(batch)
    assert second["kl_reward_mean"] > 1e-5, f"kl_reward_mean after one step {second['kl_reward_mean']!r}"
    moved = max(abs(second["adv_max"] - float(raw.max())), abs(second["adv_min"] - float(raw.min())))
    assert moved > 1e-4, f"the advantages did not change with the KL in the reward (moved {moved:.2e})"


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
    # Bit-exact by construction: the resumed trainer replays the very same computation (weights, optimizer
    # state, LR, inputs, shapes, kernels and thread count of this one process), so nothing may differ.
    for key in ("loss", "lr", "grad_norm"):
        assert got[key] == want[key], f"{key}: resumed {got[key]!r} != uninterrupted {want[key]!r}"
    for k, v in dict(b.export_hf()).items():
        assert torch.equal(v, want_w[k]), f"{k}: max|diff| {float((v - want_w[k]).abs().max()):.3e}"
    # A fresh trainer that did NOT resume differs by far more than rounding: the check can fail.
    c = GRPOTrainer(cfg)
    fresh = c.train_step(make_batch(2))["loss"]
    assert abs(fresh - want["loss"]) > 1e-4, f"a non-resumed trainer's loss {fresh!r} is within 1e-4 of {want['loss']!r}"


def test_save_hf_checkpoint_loads_in_transformers(tiny_model_dir: Path, tmp_path: Path) -> None:
    from asyncgrpo.trainer.logprobs import forward_logits
    from asyncgrpo.trainer.model import save_hf_checkpoint

    trainer = GRPOTrainer(make_config(tiny_model_dir))
    trainer.train_step(make_batch(4))
    out = save_hf_checkpoint(trainer.model, trainer.arch, tiny_model_dir, tmp_path / "hf")
    assert out is not None and (out / "tokenizer.json").exists()
    ids = torch.randint(0, 384, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = float((forward_logits(trainer.model, ids) - _hf(out)(ids).logits).abs().max())
    assert diff < numerics.LOGIT_ATOL, f"max|logits - HF logits of the saved checkpoint| {diff:.3e} >= {numerics.LOGIT_ATOL:g}"


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
    """Global normalisers: mbs=1 and mbs=8 give the same step, also when the behaviour cap masks tokens out of
    the loss (mask mode changes the token count the normaliser must use). Compared on what the step defines:
    loss, statistics and gradients within fp32 rounding, and per run an update that is Adam's of its gradient
    (tolerances in trainer/numerics.py)."""
    from asyncgrpo.trainer.train_step import pack

    cap = 1.2
    batch = make_batch(11)
    runs: list[dict] = []
    margin = float("nan")
    for mbs in (1, 8):
        cfg = make_config(tiny_model_dir, mbs=mbs, loss_agg_mode=agg, behav_imp_weight_cap=cap, behav_imp_weight_mode="mask")
        trainer = GRPOTrainer(cfg)
        if not runs:
            # The mask is a threshold on w = exp(prox - behav): the same tokens are masked in both runs only if
            # no token's log w lies within the log-prob rounding (~1e-6) of log(cap). Checked, not assumed.
            packed = pack(batch.samples, 0)
            with torch.no_grad():
                prox = trainer._logp(trainer.model, packed["input_ids"])[0]
            log_w = (prox - packed["behav_logp"])[packed["loss_mask"]]
            margin = float((log_w - math.log(cap)).abs().min())
            assert margin > 1e-4, f"a token's log behaviour weight is {margin:.2e} from log(cap): the mask is a coin toss"
        before = dict(trainer.export_hf())
        grads = capture_grads(trainer)
        stats = trainer.train_step(batch)
        runs.append({"exported": before, "grads": dict(grads), "stats": stats, "updated": dict(trainer.export_hf())})
    one, eight = runs
    assert 0 < one["stats"]["behav_cap_frac"] < 1  # the cap really masked some tokens
    # The same tokens masked: a count, reported as a token-weighted mean of fp32 per-micro-batch fractions
    # (each off by ~u relative), so fraction * n_tokens is an integer to within ~n_tokens * u = 3e-6.
    masked = [r["stats"]["behav_cap_frac"] * r["stats"]["n_tokens"] for r in runs]
    assert round(masked[0]) == round(masked[1]) and all(abs(m - round(m)) < 1e-4 for m in masked), f"masked tokens {masked}"
    diffs = numerics.assert_stats_close(eight["stats"], one["stats"], "mbs=8 vs mbs=1")
    grad_rel = numerics.assert_grads_close(eight["grads"], one["grads"], "mbs=8 vs mbs=1")
    opt = make_config(tiny_model_dir).optimizer
    for name, run in (("mbs=1", one), ("mbs=8", eight)):
        numerics.assert_moved(run["exported"], run["updated"], run["stats"]["lr"], name)
        numerics.assert_adam_update(run["exported"], run["updated"], run["grads"], run["stats"], opt.eps, opt.gradient_clipping, name)
    update_diff, defined = numerics.assert_adam_updates_agree(eight, one, opt.eps, opt.gradient_clipping, "mbs=8 vs mbs=1")
    print(numerics.summary(f"mbs {agg} (cap margin {margin:.1e})", diffs, grad_rel, update_diff, defined))


@pytest.mark.parametrize("loss", ["ppo", "gspo"])
def test_prox_from_the_loss_forward_is_the_separate_pass(tiny_model_dir: Path, loss: str) -> None:
    """One optimizer step per batch: the loss's forward runs the proximal policy, so the step takes prox_logp from
    it instead of a no-grad pass of its own. The two must give the same step: the same loss, statistics and
    gradients within fp32 rounding (trainer/numerics.py: the same kernels on the same weights, a train-mode
    forward instead of an eval-mode one). The behaviour cap clamps some tokens, so prox_logp is used for more
    than a ratio of 1."""
    batch = make_batch(13)
    runs: list[dict] = []
    for separate in (True, False):
        cfg = make_config(tiny_model_dir, behav_imp_weight_cap=1.2, eps_clip=3e-4 if loss == "gspo" else 0.2,
                          eps_clip_higher=4e-4 if loss == "gspo" else None, policy_loss=loss)
        trainer = GRPOTrainer(cfg)
        assert not trainer.needs_prox_pass()  # clamp mode, no KL in the reward: the default recipe
        if separate:  # the pass the step skips, run anyway
            trainer.needs_prox_pass = lambda: True  # type: ignore[method-assign]
        before = dict(trainer.export_hf())
        grads = capture_grads(trainer)
        stats = trainer.train_step(batch)
        runs.append({"exported": before, "grads": dict(grads), "stats": stats, "updated": dict(trainer.export_hf())})
    separate_run, reused = runs
    assert 0 < separate_run["stats"]["behav_cap_frac"] < 1  # the cap clamped some tokens, not all
    diffs = numerics.assert_stats_close(reused["stats"], separate_run["stats"], "prox from the loss forward vs a pass")
    grad_rel = numerics.assert_grads_close(reused["grads"], separate_run["grads"], "prox from the loss forward vs a pass")
    opt = make_config(tiny_model_dir).optimizer
    update_diff, defined = numerics.assert_adam_updates_agree(reused, separate_run, opt.eps, opt.gradient_clipping,
                                                              "prox from the loss forward vs a pass")
    print(numerics.summary(f"prox reuse {loss}", diffs, grad_rel, update_diff, defined))


def test_prox_pass_runs_where_something_needs_prox_before_the_loss(tiny_model_dir: Path) -> None:
    """Mask mode drops tokens from the global counts, a floor too, and KL in the reward shapes the advantages: each
    needs prox_logp before the loss's forward, so the separate pass runs."""
    cases = {
        "clamp": (dict(behav_imp_weight_cap=5.0), False),
        "no cap": (dict(behav_imp_weight_cap=None), False),
        "mask": (dict(behav_imp_weight_cap=1.2, behav_imp_weight_mode="mask"), True),
        "mask, a floor only": (dict(behav_imp_weight_cap=None, behav_imp_weight_mode="mask", behav_imp_weight_floor=0.5), True),
    }
    for name, (kw, want) in cases.items():
        assert GRPOTrainer(make_config(tiny_model_dir, **kw)).needs_prox_pass() is want, name
    assert GRPOTrainer(make_config(tiny_model_dir, kl_ctl=0.1, use_kl_in_reward=True)).needs_prox_pass(), "KL in the reward"


def test_mask_mode_behav_weight_mean_independent_of_micro_batch_size(tiny_model_dir: Path) -> None:
    means = []
    for mbs in (1, 8):
        cfg = make_config(tiny_model_dir, mbs=mbs, loss_agg_mode="token-mean", behav_imp_weight_cap=1.2, behav_imp_weight_mode="mask")
        means.append(GRPOTrainer(cfg).train_step(make_batch(11))["behav_weight_mean"])
    # A mean of w ~ 1 over the same kept tokens: fp32 rounding only (numerics.BEHAV_WEIGHT_ATOL).
    assert abs(means[0] - means[1]) <= numerics.BEHAV_WEIGHT_ATOL, f"behav_weight_mean mbs=1 {means[0]!r}, mbs=8 {means[1]!r}"


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
