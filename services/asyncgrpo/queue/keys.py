"""Redis key names of a run, in one place. Every key of a run shares the hash tag {run_id}, so the Lua
scripts that touch several of them also work on Redis Cluster (all keys of a run land on one slot)."""

from __future__ import annotations

from dataclasses import dataclass

RUNS_KEY = "asyncgrpo:runs"  # set of the run ids a trainer has registered (the control plane lists them)


@dataclass(frozen=True)
class RunKeys:
    run_id: str

    def __post_init__(self) -> None:
        if not self.run_id or any(c in self.run_id for c in "{} \n"):
            raise ValueError(f"run_id {self.run_id!r}: must be non-empty without braces or whitespace (experiment/trial)")

    def _k(self, name: str) -> str:
        return f"asyncgrpo:{{{self.run_id}}}:{name}"

    @property
    def stream(self) -> str:
        """Redis Stream of encoded scored groups (field 'g'), read by a consumer group."""
        return self._k("groups")

    @property
    def group_ids(self) -> str:
        """Hash group_id -> stream id of every group ever pushed: makes push idempotent."""
        return self._k("group_ids")

    @property
    def dead_letter(self) -> str:
        """List of dead-letter records (msgpack: msg_id, group_id, kind, reason, at, payload): messages the
        trainer cannot train (undecodable, wrong shape, vocabulary or version), kept for inspection."""
        return self._k("dead_letter")

    @property
    def outcomes(self) -> str:
        """Hash group_id -> how a pushed group ended when not trained ('stale', 'dead'); trained groups are
        recorded in the trainer's checkpoint (the lineage of the model), which is the authority for them."""
        return self._k("outcomes")

    @property
    def version(self) -> str:
        """The trainer's policy version (int); set after each optimizer step."""
        return self._k("version")

    @property
    def paused(self) -> str:
        """'1' while the control plane has paused admission of new groups."""
        return self._k("paused")

    @property
    def events(self) -> str:
        """Pub/sub channel: version, pause, requeue and lease changes, so waiters wake instead of polling."""
        return self._k("events")

    @property
    def trained(self) -> str:
        """Groups trained into the trainer's current model (int, set by the trainer with the version).
        AReaL's 'accepted' is derived, never counted: trained + stream length - trained_in_stream."""
        return self._k("trained")

    @property
    def trained_in_stream(self) -> str:
        """Trained groups still in the stream, kept unacknowledged until a checkpoint holds them (int)."""
        return self._k("trained_in_stream")

    @property
    def leases(self) -> str:
        """Sorted set prompt-ref -> lease deadline (ms): the groups running now (AReaL's 'running')."""
        return self._k("leases")

    @property
    def lease_owners(self) -> str:
        """Hash prompt-ref -> 'worker_id#n' holding the lease: a restarted worker takes its own back at once."""
        return self._k("lease_owners")

    @property
    def requeue(self) -> str:
        """List of prompt refs to run again (their groups were dropped as stale)."""
        return self._k("requeue")

    @property
    def cursor(self) -> str:
        """Hash {epoch, position, size, seed}: the next prompt of the dataset order."""
        return self._k("cursor")

    @property
    def counters(self) -> str:
        """Hash of run counters (groups_pushed, groups_filtered, stale_requeued, reward_errors, ...)."""
        return self._k("counters")

    @property
    def info(self) -> str:
        """Hash describing the run for the control plane: config (JSON, secrets redacted), status, started_at,
        updated_at (unix seconds), written by the trainer."""
        return self._k("info")

    @property
    def mode(self) -> str:
        """'run' (or absent), 'drain' (admit nothing new, train what is admitted, then stop) or 'stop'."""
        return self._k("mode")

    @property
    def knobs(self) -> str:
        """Hash dotted config key -> JSON value: live knob values set through the control plane, read by the
        admission script (max_head_offpolicyness), rollout (sampling) and the trainer (at each step)."""
        return self._k("knobs")

    @property
    def audit(self) -> str:
        """List of JSON audit records of control-plane mutations (who, when, what, old -> new), newest first."""
        return self._k("audit")

    @property
    def step_metrics(self) -> str:
        """Capped stream of the trainer's per-step metrics (field 'm': JSON): the control plane's time series."""
        return self._k("step_metrics")

    @property
    def completions(self) -> str:
        """Capped list of recent completions (JSON: group id, version, reward, text), newest first."""
        return self._k("completions")

    @property
    def evals(self) -> str:
        """Capped list of held-out evaluations (JSON: version, reward, greedy_reward, their 95% half-widths), newest first."""
        return self._k("evals")

    @property
    def rollout_stats(self) -> str:
        """Hash worker_id -> JSON of that rollout process's last report (groups/s, tokens/s, at)."""
        return self._k("rollout_stats")

    def claim(self, role: str) -> str:
        """String holding the token of the live process that holds `role` (with a TTL: queue/claims.py)."""
        return self._k(f"claim:{role}")

    def all(self) -> list[str]:
        return [self.stream, self.group_ids, self.dead_letter, self.outcomes, self.version, self.paused, self.trained,
                self.trained_in_stream, self.leases, self.lease_owners, self.requeue, self.cursor, self.counters, self.info,
                self.mode, self.knobs, self.audit, self.step_metrics, self.completions, self.evals, self.rollout_stats]
