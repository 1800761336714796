"""Every CPU-only compatibility shim megatron-core needs, in one place (see notes/megatron-core-on-cpu.md).

megatron-core assumes CUDA in a handful of spots: `torch.cuda.current_device()` used as a device,
`device="cuda"` in the optimizer / DDP buffers / grad clipping, `.cuda()` calls, `param.type() ==
"torch.cuda.FloatTensor"` checks, and `torch.cuda.synchronize()`. On a machine without CUDA:

* `install()` (idempotent) patches the torch.cuda query functions to answer with the CPU device and
  makes synchronize / empty_cache no-ops;
* `cuda_on_cpu()` is a context manager that additionally maps `device="cuda"` to cpu, turns `.cuda()`
  into a no-op and reports `.type()` of CPU float tensors as the cuda type. Wrap megatron DDP and
  optimizer construction and `optimizer.step()` in it.

With CUDA present both do nothing. Nothing happens at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def cpu_only() -> bool:
    """True when the shims are needed (no CUDA device)."""
    return not torch.cuda.is_available()


def install() -> None:
    """Patch torch.cuda's device queries for CPU; safe to call many times; no-op with CUDA."""
    global _installed
    if _installed or not cpu_only():
        return
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.set_device = lambda *a, **k: None  # type: ignore[assignment]
    # Megatron's RNG tracker saves/restores CUDA RNG states around fork(); map them to the CPU generator
    # (dropout is 0 in GRPO, so this only has to not crash).
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, *a, **k: None  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    _installed = True


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
}


class _CudaOnCpuMode(TorchFunctionMode):
    """Maps CUDA device requests to the CPU for the torch calls megatron makes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """Run megatron code that assumes CUDA on the CPU (no-op with CUDA)."""
    if not cpu_only():
        yield
        return
    install()
    with _CudaOnCpuMode():
        yield
