"""One GRPO optimizer step on the megatron policy: the batch -> tensors -> pi_prox / pi_ref -> loss -> update.

Every rank is handed the SAME global batch (the service broadcasts it). Advantages are computed on the
whole batch (batch-level normalisation sees everything), then each data-parallel rank keeps its slice of
groups and splits it into micro-batches. Each micro-batch loss is normalised by GLOBAL token / sequence
counts (all-reduced over DP), and megatron DDP sums gradients (calculate_per_token_loss), so the step is
the same for any micro-batch size and DP size. The math itself is asyncgrpo.core's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from asyncgrpo import core
from asyncgrpo.config.schema import RunConfig
from asyncgrpo.trainer import megatron_compat
from asyncgrpo.trainer.hf_mapping import ModelArch
from asyncgrpo.trainer.logprobs import token_logprobs
from asyncgrpo.trainer.model import DTYPES, build_gpt_model, compute_device, init_parallel, load_hf_weights

@dataclass
class Sample:
    """One completion of a prompt, as the rollout side scored it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    behav_logprobs: list[float]  # per completion token, from the generation server (at the sampling temperature)
    token_versions: list[int]  # policy version that produced each completion token
    reward: float
    group_id: str
    step_rewards: list[float] | None = None  # process rewards: one per step (None: the outcome reward only)
    step_ends: list[int] | None = None  # exclusive completion-token index where each step ends

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if not self.prompt_ids:
            raise ValueError(f"group {self.group_id}: prompt_ids is empty; a completion needs at least one prompt token")
        if self.step_rewards is not None or self.step_ends is not None:
            from asyncgrpo.queue.schema import check_steps

            check_steps(self.step_rewards, self.step_ends, n)  # ValueError naming what is wrong
        if len(self.behav_logprobs) != n or len(self.token_versions) != n:
            raise ValueError(
                f"group {self.group_id}: {n} completion tokens but {len(self.behav_logprobs)} behav_logprobs and "
                f"{len(self.token_versions)} token_versions; give one of each per completion token"
            )


@dataclass
class Batch:
    """A training batch: whole groups (equal size G), in order."""

    samples: list[Sample]
    group_ids: list[str] = field(init=False)

    def __post_init__(self) -> None:
        order: dict[str, list[Sample]] = {}
        for s in self.samples:
            order.setdefault(s.group_id, []).append(s)
        sizes = {len(v) for v in order.values()}
        if len(sizes) > 1:
            raise ValueError(f"batch groups have different sizes {sorted(sizes)}; every group needs actor.group_size samples")
        self.group_ids = list(order)
        self.samples = [s for v in order.values() for s in v]  # grouped contiguously

    @property
    def n_groups(self) -> int:
        return len(self.group_ids)

    @property
    def group_size(self) -> int:
        return len(self.samples) // max(self.n_groups, 1)


def pack(samples: Sequence[Sample], pad_id: int) -> dict[str, Tensor]:
    """Right-padded [B, S] tensors: input_ids, loss_mask (completion tokens), behav_logp at token positions."""
    lens = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    b, S = len(samples), max(lens)
    ids = torch.full((b, S), pad_id, dtype=torch.long)
    mask = torch.zeros((b, S), dtype=torch.bool)
    behav = torch.zeros((b, S), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        ids[i, : p + c] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
        mask[i, p : p + c] = True
        behav[i, p : p + c] = torch.tensor(s.behav_logprobs, dtype=torch.float32)
    return {"input_ids": ids, "loss_mask": mask, "behav_logp": behav}


def loss_params(cfg: RunConfig) -> core.LossParams:
    """The loss's settings, built once: the KL weight goes to the loss unless it goes into the reward."""
    a = cfg.actor
    return core.LossParams(
        policy_loss=a.policy_loss, eps_clip=a.eps_clip, eps_clip_higher=a.eps_clip_higher, c_clip=a.c_clip,
        behav_imp_weight_cap=a.behav_imp_weight_cap, behav_imp_weight_mode=a.behav_imp_weight_mode,
        behav_imp_weight_level=a.behav_imp_weight_level, behav_imp_weight_floor=a.behav_imp_weight_floor,
        loss_agg_mode=a.loss_agg_mode,
        loss_agg_norm_len=a.loss_agg_norm_len or cfg.rollout.max_new_tokens,
        kl_ctl=0.0 if a.use_kl_in_reward else a.kl_ctl, kl_estimator=a.kl_estimator,
    )


def adv_norm(cfg: RunConfig) -> core.AdvNorm:
    n = cfg.actor.adv_norm
    return core.AdvNorm(n.mean_level, n.std_level, n.mean_leave1out, n.std_unbiased, n.eps)


def batch_rewards(batch: Batch, cfg: RunConfig) -> Tensor:
    """Per-sample rewards [N] as scored, shaped by DAPO's overlong penalty when enabled."""
    a = cfg.actor
    rewards = torch.tensor([s.reward for s in batch.samples], dtype=torch.float32)
    if a.overlong_penalty.enabled:
        lengths = torch.tensor([len(s.completion_ids) for s in batch.samples], dtype=torch.float32)
        max_len = a.overlong_penalty.max_len or cfg.rollout.max_new_tokens
        rewards = core.overlong_penalty(rewards, lengths, max_len, a.overlong_penalty.buffer_len, a.overlong_penalty.factor)
    return rewards


def sample_steps(s: Sample, reward: float) -> core.Steps:
    """A sample's steps for a per-token estimator, its reward shaped to `reward`: a sample without step rewards is
    one step; the shaping (overlong penalty, KL in the reward) lands on the last step, where the outcome is."""
    n = len(s.completion_ids)
    if s.step_rewards is None or s.step_ends is None or n == 0:
        return core.Steps.outcome(reward, n)
    r = torch.tensor(s.step_rewards, dtype=torch.float32)
    r[-1] += reward - s.reward
    return core.Steps(r, torch.tensor(s.step_ends, dtype=torch.long))


def batch_advantages(batch: Batch, cfg: RunConfig, rewards: Tensor | None = None) -> Tensor | list[Tensor]:
    """Advantages of the whole batch by actor.adv_estimator (rewards: batch_rewards by default): a tensor [N] of
    one per sample, or for a per-token estimator (grpo_process) a list of N tensors, one per completion token."""
    r = batch_rewards(batch, cfg) if rewards is None else rewards
    name = cfg.actor.adv_estimator
    estimator = core.ADV_ESTIMATORS.get(name)
    if core.ADV_ESTIMATORS.trait(name, "per_token"):
        g = batch.group_size
        steps = [sample_steps(s, float(x)) for s, x in zip(batch.samples, r)]
        return estimator([steps[i : i + g] for i in range(0, len(steps), g)], adv_norm(cfg))
    return estimator(r.view(batch.n_groups, batch.group_size), adv_norm(cfg)).reshape(-1)


def micro_advantages(adv: Tensor | Sequence[Tensor], samples: Sequence[Sample], like: Tensor) -> Tensor:
    """A micro-batch's advantages for the loss: [b] as they are, or per-token ones placed at the completion
    tokens of a [b, S] tensor shaped like the packed input ids (0 elsewhere: those tokens are masked out)."""
    if isinstance(adv, Tensor):
        return adv
    out = torch.zeros(like.shape, dtype=torch.float32)
    for i, (a, s) in enumerate(zip(adv, samples, strict=True)):
        p = len(s.prompt_ids)
        out[i, p : p + a.numel()] = a
    return out


class GRPOTrainer:
    """The policy (megatron DDP), optional frozen reference, optimizer, LR schedule and policy version."""

    def __init__(self, cfg: RunConfig) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        if not cfg.actor.path:
            raise ValueError("actor.path is empty: set it to an HF checkpoint directory")
        self.cfg = cfg
        t = cfg.trainer
        init_parallel(t.tensor_parallel_size, cfg.seed, bind_host=cfg.bind_host)
        self.arch = ModelArch.from_dir(cfg.actor.path)
        self.dtype = DTYPES[t.dtype]
        # Where the model and every per-token tensor of a step live: the current CUDA device when there is one
        # (init_parallel set it from LOCAL_RANK), else the CPU. Batches are packed on the host and moved here;
        # statistics come back to the host (core.stat_sums accumulates there), collectives go through `_all_reduce`.
        self.device = compute_device()
        self._nccl = dist.get_backend() == "nccl"
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

        gpt = build_gpt_model(self.arch, t.tensor_parallel_size, self.dtype)
        load_hf_weights(gpt, cfg.actor.path, self.arch)
        gpt.config.calculate_per_token_loss = True  # DDP sums gradients; our losses carry the global normalisers
        module = gpt
        if self.dtype != torch.float32:
            from megatron.core.transformer.module import Float16Module

            module = Float16Module(gpt.config, gpt)
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=t.use_distributed_optimizer,
        )
        o = cfg.optimizer
        opt_cfg = OptimizerConfig(
            optimizer=o.type, lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
            adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.gradient_clipping,
            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=t.use_distributed_optimizer,
        )
        with megatron_compat.cuda_on_cpu():
            self.model = DistributedDataParallel(gpt.config, ddp_cfg, module)
            self.optimizer = get_megatron_optimizer(opt_cfg, [self.model])
        warmup = int(o.warmup_steps_proportion * t.total_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.lr * o.min_lr_ratio,
            lr_warmup_steps=warmup, lr_decay_steps=t.total_steps, lr_decay_style=o.lr_scheduler_type,
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=t.total_steps, wd_incr_style="constant",
        )
        # Optimizer step k (1-based) runs at the schedule's lr(k): megatron's lr(0) is init_lr = 0 under
        # warmup, which would make the first step a no-op.
        self.scheduler.step(increment=1)
        self.ref = None
        if cfg.actor.kl_ctl > 0:
            ref_path = cfg.ref.path or cfg.actor.path
            ref_arch = ModelArch.from_dir(ref_path)
            if ref_arch.vocab_size != self.arch.vocab_size:
                raise ValueError(f"ref.path vocab_size {ref_arch.vocab_size} != actor.path vocab_size {self.arch.vocab_size}; "
                                 "the reference must share the policy's tokenizer")
            ref = build_gpt_model(ref_arch, t.tensor_parallel_size, self.dtype)
            load_hf_weights(ref, ref_path, ref_arch)
            if self.dtype != torch.float32:  # as the policy: every weight (norms too) in bf16, fp32 logits out
                from megatron.core.transformer.module import Float16Module

                ref = Float16Module(ref.config, ref)
            self.ref = ref.eval().requires_grad_(False)
        self.version = 0  # policy version = optimizer steps taken
        self.pad_id = 0
        self.loss_params = loss_params(cfg)

    # -- helpers -------------------------------------------------------------------------------------------------

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
        """All-reduce a host tensor over DP (NCCL reduces device tensors only: it travels there and back)."""
        if self.dp_size > 1:
            if self._nccl and t.device.type != "cuda":
                dev = t.to(self.device)
                dist.all_reduce(dev, op=op, group=self.dp_group)
                t.copy_(dev.cpu())
            else:
                dist.all_reduce(t, op=op, group=self.dp_group)
        return t

    def _to_device(self, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}

    def _logp(self, model: torch.nn.Module, ids: Tensor, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        return token_logprobs(model, ids, self.cfg.actor.temperature, self.arch.vocab_size, with_entropy=entropy)

    def local_samples(self, batch: Batch) -> tuple[list[Sample], slice]:
        """This DP rank's contiguous slice of whole groups."""
        g = batch.n_groups
        if g % self.dp_size:
            raise ValueError(f"batch has {g} groups, not divisible by the data-parallel size {self.dp_size}; set train_dataset.batch_size to a multiple")
        per = g // self.dp_size * batch.group_size
        sl = slice(self.dp_rank * per, (self.dp_rank + 1) * per)
        return batch.samples[sl], sl

    def _kl_in_reward(self, rewards: Tensor, micro: list[dict[str, Tensor]], sl: slice) -> tuple[Tensor, float]:
        """Rewards less kl_ctl x each completion's KL (pi_prox vs pi_ref), for the whole batch: each DP rank has the
        log-probs of its own slice only, so the shaped slices are summed into the full vector across ranks."""
        a = self.cfg.actor
        shaped, kls = [], []
        local = rewards[sl]
        i = 0
        for mb in micro:
            n = mb["input_ids"].shape[0]
            r, kl = core.kl_in_reward(local[i : i + n].to(self.device), mb["prox_logp"], mb["ref_logp"], mb["loss_mask"],
                                      a.kl_ctl, a.kl_estimator)
            shaped.append(r.cpu())
            kls.append(kl.cpu())
            i += n
        full = torch.zeros(len(rewards) + 1, dtype=torch.float64)
        full[: len(rewards)][sl] = torch.cat(shaped).double()
        full[-1] = torch.cat(kls).double().sum()
        full = self._all_reduce(full)
        return full[:-1].to(rewards.dtype), float(full[-1]) / max(len(rewards), 1)

    def needs_prox_pass(self) -> bool:
        """Whether prox_logp needs a forward pass of its own before the loss's.

        The step takes one optimizer step per batch, so the proximal policy is the policy the loss's forward runs:
        its detached log-probs are prox_logp, and a separate no-grad pass computes the same numbers again (a third
        of the step's compute). The pass runs only when something needs prox_logp before the loss: the behaviour
        cap in mask mode (or a floor) drops tokens from the global counts, and KL in the reward shapes the rewards
        the advantages are made of."""
        lp = self.loss_params
        drops_tokens = lp.behav_imp_weight_mode == "mask" and (lp.behav_imp_weight_cap is not None
                                                              or lp.behav_imp_weight_floor is not None)
        return drops_tokens or bool(self.cfg.actor.use_kl_in_reward)

    # -- the step ------------------------------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on `batch`; returns scalar metrics (identical on every rank)."""
        t0 = time.perf_counter()
        a, lp = self.cfg.actor, self.loss_params
        samples, sl = self.local_samples(batch)
        mbs = a.micro_batch_size
        micro = []
        prox_pass = self.needs_prox_pass()
        self.model.eval()  # dropout is 0 anyway; eval only documents that the prox pass is a pure evaluation
        with torch.no_grad():
            for i in range(0, len(samples), mbs):
                mb = self._to_device(pack(samples[i : i + mbs], self.pad_id))
                if prox_pass:
                    mb["prox_logp"] = self._logp(self.model, mb["input_ids"])[0]
                if self.ref is not None:
                    mb["ref_logp"] = self._logp(self.ref, mb["input_ids"])[0]
                micro.append(mb)
        rewards = batch_rewards(batch, self.cfg)
        extra: dict[str, float] = {}
        if a.use_kl_in_reward:
            rewards, extra["kl_reward_mean"] = self._kl_in_reward(rewards, micro, sl)
        adv_all = batch_advantages(batch, self.cfg, rewards)
        adv_local = adv_all[sl]
        for j, mb in enumerate(micro):
            mb["adv"] = micro_advantages(adv_local[j * mbs : (j + 1) * mbs], samples[j * mbs : (j + 1) * mbs],
                                         mb["input_ids"]).to(self.device)
        # Global normalisers: tokens that enter the loss (cap-masked tokens leave it in mask mode) and sequences.
        counts = torch.zeros(2, dtype=torch.float64)
        for mb in micro:
            eff = (core.effective_mask(mb["prox_logp"], mb["behav_logp"], mb["loss_mask"], lp) if prox_pass
                   else mb["loss_mask"].bool())
            counts += torch.stack([core.count_tokens(eff), core.count_seqs(eff)]).double().cpu()
        counts = self._all_reduce(counts)
        g_tokens, g_seqs = float(counts[0]), float(counts[1])

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro_stats = []
        for mb in micro:
            logp, ent = self._logp(self.model, mb["input_ids"], entropy=True)
            if not prox_pass:
                mb["prox_logp"] = logp.detach()
            loss, stats = core.policy_objective(
                logp, mb["prox_logp"], mb["behav_logp"], mb["adv"], mb["loss_mask"], lp,
                global_token_count=g_tokens, global_seq_count=g_seqs, ref_logp=mb.get("ref_logp"), entropy=ent,
            )
            loss.backward()
            stats["n_completion_tokens"] = core.Stat.total(mb["loss_mask"].sum())
            micro_stats.append(_host_stats(stats))

        lr = float(self.optimizer.param_groups[0]["lr"])
        # the one optimizer step of this batch: needs_prox_pass() relies on there being no second one
        with megatron_compat.cuda_on_cpu():
            self.model.finish_grad_sync()
            ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.version += 1

        # every statistic says how it is reduced (core.Stat): one generic all-reduce of [numerator, denominator]
        sums = core.stat_sums(micro_stats)
        keys = sorted(sums)
        vec = self._all_reduce(torch.stack([sums[k] for k in keys]))
        out = core.finish_stats(dict(zip(keys, vec)))
        out["n_kept_tokens"] = out.pop("n_tokens")
        tot_tokens = out.pop("n_completion_tokens")
        out.pop("n_seqs")
        out.update(extra)
        rewards = torch.tensor([s.reward for s in batch.samples])
        if not isinstance(adv_all, Tensor):  # per-token advantages: their statistics over every completion token
            adv_all = torch.cat([torch.zeros(0), *(a.float() for a in adv_all)])
            adv_all = adv_all if adv_all.numel() else torch.zeros(1)
        out.update(
            reward_mean=float(rewards.mean()), reward_std=float(rewards.std()) if rewards.numel() > 1 else 0.0,
            adv_mean=float(adv_all.mean()), adv_std=float(adv_all.std()) if adv_all.numel() > 1 else 0.0,
            adv_max=float(adv_all.max()), adv_min=float(adv_all.min()),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            update_ok=float(bool(ok)), lr=lr,
            n_tokens=tot_tokens, n_seqs=float(len(batch.samples)), version=float(self.version),
        )
        all_tokens = sum(len(s.prompt_ids) + len(s.completion_ids) for s in batch.samples)
        dt = time.perf_counter() - t0
        out.update(step_time_s=dt, tokens_per_s=all_tokens / dt, completion_tokens_per_s=tot_tokens / dt)
        out.update(staleness_histogram(batch, self.version - 1))
        return out

    # -- weights out ---------------------------------------------------------------------------------------------

    def export_hf(self, dtype: torch.dtype | None = None):
        """(hf_name, tensor) pairs of the current policy, for weight sync (collective over TP)."""
        from asyncgrpo.trainer.model import export_hf_state_dict

        return export_hf_state_dict(self.model, self.arch, dtype)


def _host_stats(stats: dict[str, core.Stat]) -> dict[str, core.Stat]:
    """A micro-batch's statistics on the host, where core.stat_sums accumulates them (a no-op on the CPU)."""
    if all(s.value.device.type == "cpu" for s in stats.values()):
        return stats
    return {k: core.Stat(s.value.cpu(), None if s.weight is None else s.weight.cpu()) for k, s in stats.items()}


def staleness_histogram(batch: Batch, trained_version: int) -> dict[str, float]:
    """Counts of samples by staleness (queue/staleness.py) at the version being trained, bucketed; and the
    mean and worst."""
    from asyncgrpo.queue.staleness import STALENESS_BUCKETS, bucket, staleness

    out = {f"staleness_le_{b}": 0.0 for b in STALENESS_BUCKETS}
    out[f"staleness_gt_{STALENESS_BUCKETS[-1]}"] = 0.0
    values = [staleness(trained_version, min(s.token_versions)) if s.token_versions else 0 for s in batch.samples]
    for v in values:
        out[f"staleness_{bucket(v)}"] += 1
    out["staleness_max"] = float(max(values, default=0))
    out["staleness_mean"] = sum(values) / len(values) if values else 0.0
    return out
