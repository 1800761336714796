"""The typed configuration of a run: one tree of sections, every knob with a default and a doc string.

Key names follow the anchors' vocabulary (AReaL's cli_args, verl's loss_agg_mode) so that a user coming
from them finds the same knob under the same name. Later services add their own sections here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NormLevel = Literal["group", "batch", "none"]
LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)


class AdvNormConfig(Section):
    mean_level: NormLevel = Field("group", description="Where the reward mean is taken: group, batch or none (no centering).")
    mean_leave1out: bool = Field(False, description="Leave-one-out mean (RLOO): each completion is compared with the mean of the others.")
    std_level: NormLevel = Field("group", description="Where the reward std is taken: group, batch or none (Dr.GRPO: no division).")
    std_unbiased: bool = Field(True, description="Use the unbiased (n-1) std, as verl and torch.std do.")
    eps: float = Field(1e-6, gt=0, description="Added to the std before dividing, so all-equal rewards give 0, not NaN.")


class OverlongPenaltyConfig(Section):
    enabled: bool = Field(False, description="Apply DAPO's soft overlong penalty to the reward.")
    max_len: int | None = Field(None, gt=0, description="L_max in tokens; null means rollout.max_new_tokens.")
    buffer_len: int = Field(64, gt=0, description="L_buf: the penalty ramps linearly over the last buffer_len tokens.")
    factor: float = Field(1.0, ge=0, description="Penalty reached at L_max (reward -= factor at full length).")


def _registered(registry_name: str, value: str) -> str:
    """`value` must be a name of asyncgrpo.core's registry (imported here, not at module level: loading a config
    must not pay for torch)."""
    from asyncgrpo import core

    getattr(core, registry_name).get(value)  # ValueError naming the knob and the registered names
    return value


class ActorConfig(Section):
    path: str = Field("", description="HF checkpoint directory of the policy (config.json, safetensors, tokenizer).")
    group_size: int = Field(8, ge=1, description="G: completions sampled per prompt.")
    adv_estimator: str = Field("grpo", description="Advantage estimator by registered name (asyncgrpo.core.ADV_ESTIMATORS, see docs/algorithms.md): grpo uses adv_norm; grpo_process (per-step rewards, a token's advantage from its step on) its std_unbiased and eps; the others fix their own normalisation.")
    adv_norm: AdvNormConfig = Field(default_factory=AdvNormConfig, description="Advantage normalisation of adv_estimator=grpo (REINFORCE++ uses its std_unbiased and eps).")
    policy_loss: str = Field("ppo", description="Policy loss by registered name (asyncgrpo.core.POLICY_LOSSES, see docs/algorithms.md): ppo clips the token ratio, gspo the sequence ratio.")
    eps_clip: float = Field(0.2, gt=0, lt=1, description="Lower clip: ratio clipped to [1 - eps_clip, ...] (GSPO uses 3e-4).")
    eps_clip_higher: float | None = Field(None, gt=0, description="Upper clip (DAPO clip-higher); null means eps_clip (GSPO uses 4e-4).")
    c_clip: float | None = Field(None, gt=1, description="Dual clip constant c > 1 for negative advantages (ppo only); null disables.")
    behav_imp_weight_cap: float | None = Field(5.0, gt=1, description="Cap on the behaviour weight pi_prox/pi_behave (staleness and engine mismatch); null disables.")
    behav_imp_weight_mode: Literal["clamp", "mask"] = Field("clamp", description="clamp: w = min(w, cap) (truncated IS); mask: drop what has w > cap (masked IS).")
    behav_imp_weight_floor: float | None = Field(None, gt=0, lt=1, description="Mask mode only: also drop what has a behaviour weight below this (e.g. 0.5 with cap 2, IcePop); null disables.")
    behav_imp_weight_level: Literal["token", "sequence", "geometric"] = Field("token", description="Behaviour weight per token, per sequence (product of token ratios) or geometric (their length-normalised mean); mask mode drops a whole sequence at the sequence levels.")
    loss_agg_mode: LossAggMode = Field("seq-mean-token-mean", description="How per-token losses become one number (verl's loss_agg_mode).")
    loss_agg_norm_len: int | None = Field(None, gt=0, description="Constant length for seq-mean-token-sum-norm; null means rollout.max_new_tokens.")
    kl_ctl: float = Field(0.0, ge=0, description="Weight beta of the KL to the reference policy; 0 disables the reference model.")
    kl_estimator: KLEstimator = Field("k3", description="KL estimator: k1 = logp - ref, k2 = 0.5 (logp - ref)^2, k3 = exp(ref - logp) - (ref - logp) - 1.")
    use_kl_in_reward: bool = Field(False, description="Subtract kl_ctl x the completion's summed KL from its reward (before advantages) instead of adding the KL to the loss.")
    temperature: float = Field(1.0, ge=0.01, le=100.0, description="Sampling temperature in [0.01, 100]; the trainer recomputes log-probs of logits / temperature (greedy decoding has no log-probs to correct).")
    overlong_penalty: OverlongPenaltyConfig = Field(default_factory=OverlongPenaltyConfig, description="DAPO overlong reward shaping.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward micro-batch (gradient accumulation).")

    @field_validator("adv_estimator")
    @classmethod
    def _known_estimator(cls, v: str) -> str:
        return _registered("ADV_ESTIMATORS", v)

    @field_validator("policy_loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        return _registered("POLICY_LOSSES", v)

    @model_validator(mode="after")
    def _consistent(self) -> "ActorConfig":
        if self.eps_clip_higher is not None and self.eps_clip_higher < self.eps_clip:
            raise ValueError(
                f"actor.eps_clip_higher ({self.eps_clip_higher}) is below actor.eps_clip ({self.eps_clip}); "
                "set it >= eps_clip or null"
            )
        # a knob set to its default (as an example config spells it out) changes nothing: only a real choice clashes
        grpo_only = sorted(k for k in self.adv_norm.model_fields_set & {"mean_level", "std_level", "mean_leave1out"}
                           if getattr(self.adv_norm, k) != AdvNormConfig.model_fields[k].default)
        if grpo_only and self.adv_estimator != "grpo":
            raise ValueError(f"actor.adv_norm.{grpo_only[0]} applies to adv_estimator=grpo only; adv_estimator="
                             f"{self.adv_estimator} fixes its own normalisation: remove the key or use grpo")
        if self.policy_loss == "gspo":
            if "eps_clip" not in self.model_fields_set:
                raise ValueError("actor.policy_loss=gspo clips the SEQUENCE ratio, which moves ~1e-3 a step, so the "
                                 "default eps_clip 0.2 would never clip: set actor.eps_clip (GSPO uses 3e-4) and "
                                 "actor.eps_clip_higher (4e-4)")
            if self.loss_agg_mode != "seq-mean-token-mean":
                raise ValueError(f"actor.policy_loss=gspo needs actor.loss_agg_mode=seq-mean-token-mean (its gradient "
                                 f"is the mean over a sequence's tokens), not {self.loss_agg_mode}")
            if self.c_clip is not None:
                raise ValueError("actor.c_clip (dual clip) is defined for policy_loss=ppo only; set it to null")
            from asyncgrpo import core

            if core.ADV_ESTIMATORS.trait(self.adv_estimator, "per_token"):
                raise ValueError(f"actor.policy_loss=gspo weighs whole sequences by one advantage; adv_estimator="
                                 f"{self.adv_estimator} gives one per token: use policy_loss=ppo with it")
        if self.behav_imp_weight_floor is not None and self.behav_imp_weight_mode != "mask":
            raise ValueError("actor.behav_imp_weight_floor drops samples below it: it needs actor.behav_imp_weight_mode=mask")
        if self.use_kl_in_reward and self.kl_ctl == 0:
            raise ValueError("actor.use_kl_in_reward needs actor.kl_ctl > 0 (the weight of the KL in the reward)")
        return self


class RefConfig(Section):
    path: str | None = Field(None, description="HF checkpoint of the frozen reference policy; null means actor.path.")


class OptimizerConfig(Section):
    type: Literal["adam", "sgd"] = Field("adam", description="Optimizer (megatron's Adam is AdamW).")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = Field("constant", description="LR decay after warmup.")
    warmup_steps_proportion: float = Field(0.0, ge=0, le=1, description="Fraction of total steps spent in linear warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final LR as a fraction of lr for linear/cosine decay.")
    gradient_clipping: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")


class DatasetConfig(Section):
    path: str = Field("", description="JSONL (or parquet) file of prompts.")
    batch_size: int = Field(8, ge=1, description="Prompts (groups) per training batch.")
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded by run seed and epoch).")
    prompt_key: str = Field("prompt", description="Field of a record that holds the prompt text.")
    answer_key: str = Field("answer", description="Field of a record that holds the reference answer.")
    prompt_template: str = Field("{prompt}", description="Python format string applied to a record to build the prompt text.")


class OrmConfig(Section):
    url: str | None = Field(None, description="Reward-model server of the built-in 'orm' reward (asyncgrpo reward-server, or SGLang --is-embedding): its /classify scores prompt + completion.")
    api_key: str | None = Field(None, description="Its bearer token; null: env ASYNCGRPO_REWARD_API_KEY, unset means none.")
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one scoring request to it.")


class PrmConfig(Section):
    url: str | None = Field(None, description="Reward-model server of the built-in 'prm' reward (asyncgrpo reward-server with a token-classification model): its /score_steps scores each step.")
    api_key: str | None = Field(None, description="Its bearer token; null: env ASYNCGRPO_REWARD_API_KEY, unset means none.")
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one scoring request to it.")


class RewardConfig(Section):
    fns: list[str] = Field(default_factory=lambda: ["gsm8k"], min_length=1, description="Reward functions: built-in names (exact, gsm8k, boxed, orm, prm) or your own as package.module:function (docs/rewards.md); weights below.")
    weights: list[float] | None = Field(None, description="Per-function weights; null means all 1.")
    timeout_s: float = Field(10.0, gt=0, description="A reward call running longer scores 0 and is counted.")
    orm: OrmConfig = Field(default_factory=OrmConfig, description="The reward-model server of the 'orm' reward function.")
    prm: PrmConfig = Field(default_factory=PrmConfig, description="The reward-model server of the 'prm' (process) reward function.")
    step_separator: str = Field("\n", min_length=1, description="Process rewards: a completion's steps end at runs of this string (kept with the step); a reward function returning a list scores each step.")

    @model_validator(mode="after")
    def _weights_match(self) -> "RewardConfig":
        from asyncgrpo.rewards import check_reward_spec

        for spec in self.fns:
            check_reward_spec(spec)  # the form only: the rollout imports plug-ins at start-up (`up` before it starts)
        if self.weights is not None and len(self.weights) != len(self.fns):
            raise ValueError(f"reward.weights has {len(self.weights)} entries but reward.fns has {len(self.fns)}; give one weight per function")
        if "orm" in self.fns and not self.orm.url:
            raise ValueError("reward.fns has 'orm' but reward.orm.url is not set: give the reward-model server's URL")
        if "prm" in self.fns and not self.prm.url:
            raise ValueError("reward.fns has 'prm' but reward.prm.url is not set: give the process reward server's URL")
        return self


class RolloutConfig(Section):
    max_head_offpolicyness: int = Field(2, ge=0, le=10_000, description="Max policy versions a sample may lag the trainer (staleness bound).")
    max_concurrent_rollouts: int = Field(64, ge=1, description="Groups generated at the same time.")
    max_new_tokens: int = Field(256, ge=1, description="Completion length limit in tokens.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(-1, description="Top-k sampling; -1 disables.")
    # Rollout service (asyncgrpo rollout): max_concurrent_rollouts above is its number of asyncio workers.
    server_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:30000"], min_length=1, description="Generation servers (SGLang or genserver) or one sglang-router URL; groups are spread round-robin.")
    request_timeout_s: float = Field(600.0, gt=0, description="Timeout of one /generate request.")
    max_resubmits: int = Field(8, ge=0, description="Partial rollouts: times a completion aborted by a weight update is resubmitted with its tokens so far.")
    lease_ttl_s: float = Field(120.0, gt=0, description="A prompt lease not renewed for this long (dead worker) is re-issued to another worker.")
    reward_executor: Literal["thread", "process"] = Field("thread", description="Where reward functions run: a thread pool, or a process pool (isolates hangs).")
    reward_workers: int = Field(4, ge=1, description="Size of the reward thread/process pool.")
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Size limit of one encoded group message in the queue.")
    dynamic_filtering: bool = Field(False, description="Drop groups whose rewards are all equal (zero advantage) instead of pushing them (DAPO dynamic sampling); counted as filtered.")
    exit_when_exhausted: bool = Field(False, description="Exit once every epoch's prompts are done and none is leased or re-queued (else wait for re-queued prompts).")
    metrics_port: int = Field(0, ge=0, description="Port of the rollout service's Prometheus /metrics (0 disables).")
    log_interval_s: float = Field(10.0, gt=0, description="Seconds between progress log lines (groups/s, tokens/s, reward mean).")
    worker_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^#\s]+$", description="Stable identity of this rollout process (no '#' or spaces): restarted with the same id it takes back its leases at once; one live process per id; null means the host name.")


class RedisConfig(Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis:// or unix://) holding the queue and run state.")
    outage_deadline_s: float = Field(300.0, gt=0, description="A service that cannot reach Redis this long exits with one line; until then it retries with backoff.")


class AuthConfig(Section):
    """Bearer tokens, exactly as SGLang's --api-key / --admin-api-key (sglang/srt/utils/auth.py)."""

    api_key: str | None = Field(None, description="Token for ordinary endpoints (generate, reads); null: env ASYNCGRPO_API_KEY, unset means none.")
    admin_api_key: str | None = Field(None, description="Token for admin endpoints (weight updates, pause, publish, membership); null: env ASYNCGRPO_ADMIN_API_KEY, unset means none.")


class TrainerConfig(Section):
    """The megatron-core trainer service (asyncgrpo trainer)."""

    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel size; data-parallel size = world size / this.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype (bfloat16 keeps fp32 master weights in the optimizer).")
    use_distributed_optimizer: bool = Field(False, description="Shard optimizer state over data-parallel ranks (megatron distributed optimizer).")
    total_steps: int = Field(1000, ge=1, description="Optimizer steps the LR schedule spans (warmup proportion and decay refer to it).")
    checkpoint_dir: str | None = Field(None, description="Where checkpoints go; null means {fileroot}/{experiment_name}/{trial_name}/checkpoints.")
    checkpoint_interval: int = Field(10, ge=0, description="Save a checkpoint every K steps (0 disables periodic saves).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk; older ones are deleted.")
    hf_save_interval: int = Field(0, ge=0, description="Also write an HF checkpoint (safetensors) every K steps (0 disables).")
    max_steps: int | None = Field(None, ge=1, description="Stop once the policy version (optimizer steps in all, resumes included) reaches this; null: run until stopped.")
    poll_timeout_s: float = Field(5.0, gt=0, description="Block this long waiting for groups before checking for shutdown.")
    metrics_port: int = Field(0, ge=0, description="Port of the trainer's Prometheus /metrics (0 disables).")


class WeightSyncConfig(Section):
    """The weight-sync service (asyncgrpo weight-sync): rank 0 of the broadcast group to the generation servers."""

    host: str = Field("127.0.0.1", description="Interface the service's HTTP API and the broadcast group's rendezvous store listen on.")
    port: int = Field(30100, ge=1, le=65535, description="Port of the service's HTTP API; the trainer's publisher POSTs here.")
    servers: list[str] | None = Field(None, description="Generation servers synced over the broadcast group; null means rollout.server_urls (list the workers, not a router).")
    disk_servers: list[str] = Field(default_factory=list, description="Servers that cannot join the group: synced by /update_weights_from_disk of an HF checkpoint.")
    tensor_servers: list[str] = Field(default_factory=list, description="Servers on this host (the trainer's GPU on GPU): synced by /update_weights_from_tensor, each bucket handed over by reference (CUDA IPC, or shared memory on CPU).")
    tensor_device: str = Field("auto", description="Where the tensor transport stages a bucket for its servers to map: auto (cuda if available, else cpu shared memory), cpu, or a cuda device such as cuda:0.")
    master_address: str = Field("127.0.0.1", description="Address the generation servers are told to reach the group's rendezvous at (may be a NAT or Service address; the store listens on host).")
    master_port: int = Field(0, ge=0, le=65535, description="Rendezvous port of the group; 0 picks a free port each time the group is (re)built.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend of the group; auto: nccl when CUDA is available, else gloo.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="dtype the weights travel in; auto: bfloat16 on nccl, the trainer's dtype on gloo.")
    bucket_size_mb: float = Field(512.0, gt=0, description="Bucket size in MiB (one flattened_bucket broadcast each); a larger tensor gets a bucket of its own.")
    pause_mode: Literal["abort", "retract", "in_place"] = Field("retract", description="How servers pause during an update: retract (in-flight requests go back to the server's queue with their tokens and continue on the new weights, their cache recomputed), abort (they return partial and the rollout resubmits each), in_place (they keep their cache from the old weights).")
    snapshot_dir: str | None = Field(None, description="Shared-memory dir of the double-buffered weight snapshot; null means /dev/shm/asyncgrpo/{experiment}/{trial}.")
    checkpoint_dir: str | None = Field(None, description="Where disk-fallback HF checkpoints go; null means {fileroot}/{experiment}/{trial}/weight_sync.")
    keep_checkpoints: int = Field(2, ge=1, description="Disk-fallback checkpoints kept; older ones are deleted.")
    base_model_path: str | None = Field(None, description="HF dir whose config and tokenizer files are copied into disk checkpoints; null means actor.path.")
    group_timeout_s: float = Field(60.0, gt=0, description="Limit on forming the group (rendezvous on both sides).")
    collective_timeout_s: float = Field(120.0, gt=0, description="Limit on one bucket's broadcast and its HTTP replies; a member exceeding it is dropped.")
    request_timeout_s: float = Field(60.0, gt=0, description="Limit on the other HTTP calls to a server (pause, begin, end, continue, init).")
    resync_interval_s: float = Field(2.0, gt=0, description="How often dropped or joining servers are health-checked and re-synced.")
    transport_fallback: bool = Field(True, description="A healthy server whose transport keeps failing (twice to join the group, or every retry of an update) moves to the next one: tensor -> distributed -> disk; false: it is dropped and retried on its own.")
    metrics_port: int = Field(0, ge=0, description="Port of the service's Prometheus /metrics (0 disables; /metrics is also on the HTTP API).")


class ControlConfig(Section):
    """The control plane (asyncgrpo control): REST under /v1, dashboard, and the CLI's default address."""

    host: str = Field("127.0.0.1", description="Interface the control plane listens on.")
    port: int = Field(30200, ge=1, le=65535, description="Port of the control plane's HTTP API and dashboard.")
    grpc_port: int = Field(30201, ge=0, le=65535, description="Port of the control plane's gRPC API (proto/asyncgrpo/v1); 0 disables it.")
    token: str | None = Field(None, description="Bearer token every mutation needs; null: env ASYNCGRPO_CONTROL_TOKEN; unset means mutations are refused.")
    protect_reads: bool = Field(False, description="Also require the token for reads (run list, status, inspection).")
    server_timeout_s: float = Field(2.0, gt=0, description="Limit on asking one generation server its health, load and weight version.")


class EvaluatorConfig(Section):
    """Held-out evaluation during `asyncgrpo up`, through a generation server (the policy it serves now)."""

    data_path: str | None = Field(None, description="Held-out JSONL (prompt and answer fields as train_dataset); null: test.jsonl beside train_dataset.path, if there.")
    freq_steps: int = Field(0, ge=0, description="Evaluate when the served policy reaches version 0, K, 2K, ... (0: only the before/after evaluation of the final model).")
    prompts: int = Field(200, ge=0, description="Held-out prompts evaluated each time (the first N records; 0 disables every evaluation).")
    samples: int = Field(4, ge=1, description="Completions sampled per prompt at actor.temperature for the sampled accuracy.")
    greedy: bool = Field(True, description="Also score one greedy (temperature 0) completion per prompt.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Sampling seed; the same prompts draw the same random numbers at every evaluation.")


class LaunchConfig(Section):
    """How `asyncgrpo up` starts the generation servers and the trainer on this machine."""

    engine: Literal["genserver", "sglang", "external"] = Field("genserver", description="Generation servers `up` starts: genserver (ours), sglang (python -m sglang.launch_server), or external (none: rollout.server_urls already run).")
    servers: int = Field(1, ge=1, le=64, description="Generation servers to start (engines genserver and sglang).")
    gpus_per_server: int = Field(1, ge=1, description="GPUs of one SGLang server (its --tp-size); server i gets the next ones after the trainer's.")
    trainer_gpus: int = Field(0, ge=0, description="GPUs of the trainer, the first ones visible (more than 1: torchrun, one rank each); 0: no GPU for the trainer.")
    sglang_python: str | None = Field(None, description="Python interpreter that has sglang installed; null: the one running `up`.")
    num_continuous_decode_steps: int = Field(3, ge=1, le=64, description="genserver: decode steps between admissions of waiting requests (SGLang's flag of that name; for engine sglang give it in sglang_args). More: fewer, larger prefills and more throughput, a few steps more until a request's first token.")
    sglang_args: list[str] = Field(default_factory=list, description="Extra flags for sglang.launch_server, e.g. ['--mem-fraction-static', '0.7'].")
    server_start_timeout_s: float = Field(900.0, gt=0, description="Limit on one generation server becoming healthy (SGLang loads weights and captures CUDA graphs).")


class RunConfig(Section):
    """The whole run. Load with asyncgrpo.config.load_config()."""

    experiment_name: str = Field("asyncgrpo", min_length=1, description="Name of the experiment (groups runs).")
    trial_name: str = Field("trial0", min_length=1, description="Name of this run within the experiment; with experiment_name it is the run id.")
    seed: int = Field(1, description="Seed for data order, sampling and initialisation.")
    fileroot: str = Field("runs", description="Directory for checkpoints, logs and generated artefacts.")
    bind_host: str = Field("127.0.0.1", min_length=1, description="Interface the trainer's and rollout's listeners bind (metrics, torch.distributed stores); 0.0.0.0 for all.")
    total_train_epochs: int = Field(1, ge=1, description="Passes over the training prompts.")
    preset: str | None = Field(None, description="A named algorithm recipe (grpo, dapo, dr_grpo, rloo, reinforce_plus_plus, gspo, grpo_process; asyncgrpo.config.presets): it fills its keys beneath yours, so a key you give wins.")
    actor: ActorConfig = Field(default_factory=ActorConfig, description="The policy being trained and its loss.")
    ref: RefConfig = Field(default_factory=RefConfig, description="The frozen reference policy for the KL term.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer and LR schedule.")
    train_dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Training prompts.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward functions.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Generation and staleness control.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="The Redis server shared by the services.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Bearer tokens of the HTTP services (SGLang's api-key contract).")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="The megatron-core trainer service.")
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig, description="The weight-sync service between trainer and generation servers.")
    control: ControlConfig = Field(default_factory=ControlConfig, description="The control plane: pause, resume and inspect the run.")
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig, description="Held-out evaluation during and after `asyncgrpo up`.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="What `asyncgrpo up` starts on this machine: generation engine, servers, GPUs.")

    @property
    def run_id(self) -> str:
        return f"{self.experiment_name}/{self.trial_name}"
