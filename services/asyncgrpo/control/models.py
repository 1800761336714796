"""Request and response bodies of the control plane's API (the OpenAPI is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RunStatus = Literal["running", "paused", "draining", "stopping", "stopped"]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerState(BaseModel):
    url: str
    healthy: bool = Field(description="GET /health answered 200 within control.server_timeout_s.")
    weight_version: int | None = Field(None, description="Policy version the server holds (null: unknown or unreachable).")
    running_requests: int | None = None
    waiting_requests: int | None = None
    error: str | None = Field(None, description="Why the server could not be asked, when it could not.")


class RunSummary(BaseModel):
    run_id: str
    experiment: str
    trial: str
    status: RunStatus
    version: int = Field(description="Policy version: optimizer steps taken.")
    updated_at: float | None = None


class RunDetail(RunSummary):
    paused: bool
    mode: Literal["run", "drain", "stop"]
    trainer_state: str = Field(description="training, paused (at a step boundary), draining, stopped or unknown.")
    trainer_alive: bool = Field(description="A trainer process holds the run's trainer claim now.")
    step: int = Field(description="Steps taken (equals version: one optimizer step per version).")
    max_steps: int | None = None
    started_at: float | None = None
    knobs: dict[str, Any] = Field(description="Live knob values in force (the config's value where never set).")
    servers: list[ServerState]
    config: dict[str, Any] = Field(description="The run's config as its trainer started it (secrets redacted).")


class DeadLetterSummary(BaseModel):
    count: int
    by_kind: dict[str, int]
    recent: list[dict[str, Any]] = Field(description="Newest dead letters: group_id, kind, reason, at.")


class Inspection(BaseModel):
    run_id: str
    version: int
    queue_depth: int = Field(description="Groups in the stream not yet acknowledged by the trainer.")
    waiting_groups: int = Field(description="Groups pushed and not yet trained (accepted minus trained).")
    running_groups: int = Field(description="Prompt leases held: groups being generated now.")
    pending_deliveries: int = Field(description="Deliveries to the trainer not acknowledged (trained and awaiting a checkpoint, or in its batch).")
    requeued_prompts: int
    dead_letters: DeadLetterSummary
    staleness_histogram: dict[str, int] = Field(description="The oldest 256 groups not yet delivered to the trainer, by the staleness they would train at now (policy version - oldest token version; queue/staleness.py).")
    counters: dict[str, float] = Field(description="Run counters: groups_started, stale_requeued, groups_filtered, reward_errors, ...")
    rollout: dict[str, dict[str, Any]] = Field(description="Each rollout process's last report (groups/s, tokens/s, ...).")
    trainer_tokens_per_s: float | None = None
    steps: list[dict[str, Any]] = Field(description="Recent step metrics, oldest first (reward_mean, loss, kl, clip_frac, grad_norm, tokens_per_s, ...).")
    completions: list[dict[str, Any]] = Field(description="Recent completions with their rewards, newest first.")
    servers: list[ServerState]


class ActionResult(BaseModel):
    run_id: str
    action: str
    status: RunStatus
    audit: dict[str, Any]


class KnobsRequest(Body):
    knobs: dict[str, Any] = Field(min_length=1, description="Dotted config key -> new value, e.g. {'actor.temperature': 0.8}.",
                                  json_schema_extra={"example": {"rollout.max_head_offpolicyness": 1}})


class KnobsResult(BaseModel):
    run_id: str
    knobs: dict[str, Any]
    changes: list[dict[str, Any]]


class AuditList(BaseModel):
    run_id: str
    entries: list[dict[str, Any]]


class StepSeries(BaseModel):
    run_id: str
    steps: list[dict[str, Any]]
