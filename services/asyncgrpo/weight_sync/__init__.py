"""Weight sync: the trainer hands each policy version over (WeightPublisher, a shared-memory snapshot)
and the weight-sync service broadcasts it to the generation servers (SGLang's distributed update API)."""

from asyncgrpo.weight_sync.publisher import PublishResult, WeightPublisher

__all__ = ["PublishResult", "WeightPublisher"]
