"""The Redis side of a run: the stream of scored groups and the shared run state (version, pause,
prompt cursor and leases, re-queue list, counters)."""

from asyncgrpo.queue.claims import Claim, RoleTaken
from asyncgrpo.queue.connection import RedisGuard, RedisUnavailable, make_async_redis, make_redis
from asyncgrpo.queue.group_queue import DEFAULT_CONSUMER_GROUP, DeadLetter, GroupQueue
from asyncgrpo.queue.keys import RunKeys
from asyncgrpo.queue.run_state import Admission, CursorMismatchError, RunState
from asyncgrpo.queue.schema import (
    SCHEMA_VERSION,
    Completion,
    Group,
    GroupSchemaError,
    GroupTooLargeError,
    PromptRef,
    decode_group,
    encode_group,
    version_number,
)

__all__ = [
    "SCHEMA_VERSION", "Admission", "Claim", "Completion", "CursorMismatchError", "DEFAULT_CONSUMER_GROUP", "DeadLetter",
    "Group", "GroupQueue", "GroupSchemaError", "GroupTooLargeError", "PromptRef", "RedisGuard", "RedisUnavailable",
    "RoleTaken", "RunKeys", "RunState", "decode_group", "encode_group", "make_async_redis", "make_redis", "version_number",
]
