"""Redis key names of a run, in one place. Every key of a run shares the hash tag {run_id}, so the Lua
scripts that touch several of them also work on Redis Cluster (all keys of a run land on one slot)."""

from __future__ import annotations

from dataclasses import dataclass


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
        """List of raw messages the consumer could not decode (kept for inspection)."""
        return self._k("dead_letter")

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
    def accepted(self) -> str:
        """Groups pushed to the stream, minus those the trainer dropped as stale (AReaL's 'accepted')."""
        return self._k("accepted")

    @property
    def leases(self) -> str:
        """Sorted set prompt-ref -> lease deadline (ms): the groups running now (AReaL's 'running')."""
        return self._k("leases")

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

    def all(self) -> list[str]:
        return [self.stream, self.group_ids, self.dead_letter, self.version, self.paused, self.accepted,
                self.leases, self.requeue, self.cursor, self.counters]
