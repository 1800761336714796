"""Helpers shared by the trainer tests, importable in torch.multiprocessing spawn children."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from asyncgrpo.config.schema import RunConfig
from asyncgrpo.trainer.train_step import Batch, Sample


def make_config(model_dir: str | Path, tp: int = 1, mbs: int = 3, **actor: Any) -> RunConfig:
    cfg = RunConfig()
    cfg.actor.path = str(model_dir)
    cfg.actor.group_size = 4
    cfg.actor.micro_batch_size = mbs
    cfg.actor.temperature = 0.8
    for k, v in actor.items():
        setattr(cfg.actor, k, v)
    cfg.optimizer.lr = 1e-3
    cfg.trainer.tensor_parallel_size = tp
    return cfg


def make_batch(seed: int, n_groups: int = 2, group_size: int = 4, version: int = 0, behav_offset: float | None = None) -> Batch:
    """A deterministic batch of random token sequences with mixed rewards; behav log-probs are filled by
    the caller (behav_offset None) or are a fixed stale-looking value."""
    rng = random.Random(seed)
    samples = []
    for g in range(n_groups):
        prompt = [rng.randrange(256) for _ in range(rng.randint(3, 7))]
        for i in range(group_size):
            comp = [rng.randrange(256) for _ in range(rng.randint(2, 8))]
            behav = [-6.0 + rng.uniform(-0.5, 0.5) for _ in comp]
            samples.append(Sample(prompt, comp, behav, [version] * len(comp), float(i % 2 + rng.random() * 0.1), f"g{seed}-{g}"))
    return Batch(samples)


def intra_op_threads() -> int:
    """Intra-op threads of a test process: 1 (two cores in CI, several processes), or ASYNCGRPO_TEST_THREADS to
    check that nothing depends on the thread count (a different count changes the reduction order of kernels)."""
    return max(1, int(os.environ.get("ASYNCGRPO_TEST_THREADS", "1")))


def init_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ["OMP_NUM_THREADS"] = str(intra_op_threads())
    torch.set_num_threads(intra_op_threads())


def capture_grads(trainer: Any) -> dict[str, torch.Tensor]:
    """Make trainer.optimizer.step first record the gradients it is about to apply into the returned dict:
    full tensors in HF layout (gathered over TP), after the data-parallel reduction, before clipping.
    Collective over TP like export_hf, which every rank's step calls. Not for the distributed optimizer,
    whose reduce-scatter leaves each DP rank only its shard of main_grad."""
    from asyncgrpo.trainer.model import export_hf_state_dict

    grads: dict[str, torch.Tensor] = {}
    inner = trainer.optimizer.step

    def step():  # type: ignore[no-untyped-def]
        grads.clear()
        grads.update(export_hf_state_dict(trainer.model, trainer.arch, attr="main_grad"))
        return inner()

    trainer.optimizer.step = step
    return grads


def with_steps(batch: Batch) -> Batch:
    """Each completion of >= 2 tokens as two steps: [0, 1) rewarded 0.3, the rest its reward (process rewards; the
    two steps' normalised rewards do not sum to 0, as rewards mirrored around the pooled mean would)."""
    out = []
    for s in batch.samples:
        n = len(s.completion_ids)
        steps = dict(step_rewards=[0.3, s.reward], step_ends=[1, n]) if n >= 2 else {}
        out.append(Sample(s.prompt_ids, s.completion_ids, s.behav_logprobs, s.token_versions, s.reward, s.group_id, **steps))
    return Batch(out)


def step_worker(rank: int, world: int, tp: int, mbs: int, port: int, model_dir: str, out_path: str,
                ref_dir: str | None = None, process: bool = False) -> None:
    """Build the trainer at (world, tp), check logits against HF, export round trip, run one step (recording
    the gradients it applies); rank 0 saves the results to out_path. With `ref_dir` the step puts the KL to that
    reference into the rewards (each DP rank holds the log-probs of its own groups only). With `process` the batch
    has step rewards and the estimator is grpo_process (per-token advantages, sliced per DP rank)."""
    init_env(rank, world, port)
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    from asyncgrpo.trainer.logprobs import forward_logits
    from asyncgrpo.trainer.train_step import GRPOTrainer

    cfg = make_config(model_dir, tp=tp, mbs=mbs)
    if ref_dir is not None:
        cfg.ref.path = ref_dir
        cfg.actor.kl_ctl, cfg.actor.kl_estimator, cfg.actor.use_kl_in_reward = 1.0, "k1", True
    if process:
        cfg.actor.adv_estimator = "grpo_process"
    trainer = GRPOTrainer(cfg)
    # Logits equal HF's (fp32): gather the vocab-parallel shards.
    ids = torch.randint(0, 384, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        local = forward_logits(trainer.model, ids)
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        ours = torch.cat(shards, dim=-1)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        ref = hf(ids).logits
    exported = dict(trainer.export_hf())
    grads = capture_grads(trainer)
    stats = trainer.train_step(with_steps(make_batch(1)) if process else make_batch(1))
    updated = dict(trainer.export_hf())
    if rank == 0:
        torch.save({"logit_diff": float((ours - ref).abs().max()), "logit_scale": float(ref.abs().max()),
                    "exported": exported, "grads": dict(grads), "stats": stats, "updated": updated}, out_path)
    dist.barrier()
    from asyncgrpo.trainer.model import destroy_parallel

    destroy_parallel()


def service_worker(rank: int, world: int, port: int, model_dir: str, redis_url: str, out_dir: str) -> None:
    """DP=`world` trainer service: rank 0 reads Redis and broadcasts batches; every rank saves its weights."""
    init_env(rank, world, port)
    from asyncgrpo.queue import GroupQueue, RunState
    from asyncgrpo.trainer.model import destroy_parallel
    from asyncgrpo.trainer.service import TrainerService
    from asyncgrpo.trainer.train_step import GRPOTrainer

    cfg = make_config(model_dir)
    cfg.redis.url = redis_url
    cfg.train_dataset.batch_size = 2
    cfg.trainer.checkpoint_interval = 0
    cfg.fileroot = out_dir  # the run directory (metrics.jsonl)
    queue = GroupQueue.from_url(redis_url, cfg.run_id) if rank == 0 else None
    state = RunState.from_url(redis_url, cfg.run_id) if rank == 0 else None
    trainer = GRPOTrainer(cfg)
    service = TrainerService(cfg, trainer, queue, state)
    stats = service.run(max_steps=2)
    torch.save({"steps": stats.steps, "loss": stats.last["loss"], "weights": dict(trainer.export_hf())}, f"{out_dir}/rank{rank}.pt")
    destroy_parallel()
