"""The megatron-core GRPO trainer: policy model, HF weight mapping, log-probs, training step, checkpoints.

Submodules import torch and megatron-core; this package import stays light.
"""
