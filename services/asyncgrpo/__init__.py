"""asyncgrpo: asynchronous, decoupled rollout/train service for GRPO on LLMs."""

__version__ = "0.1.0"
