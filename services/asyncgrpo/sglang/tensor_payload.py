"""The payload of SGLang's POST /update_weights_from_tensor: tensors handed over by reference, not by value.

What travels over HTTP is a base64 string per TP rank (`serialized_named_tensors`), each a pickle made with
torch's multiprocessing reductions (SGLang's MultiprocessingSerializer): a CUDA tensor pickles as a CUDA IPC
handle, a CPU tensor in shared memory as the name of its shared-memory file. So the receiver maps the
sender's memory and copies from it; the sender must keep the tensor alive, unchanged, until the reply.

load_format "flattened_bucket" (what we send): one dict {"flattened_tensor": 1-D uint8, "metadata": [...]},
each metadata item with name, shape, dtype, start_idx, end_idx (byte offsets) and numel (bytes), the layout
of asyncgrpo.sglang.buckets (back to back, SGLang's FlattenedTensorBucket). The items are
types.SimpleNamespace, which SGLang's SafeUnpickler admits and its loader reads by attribute, so the same
payload loads into SGLang and into genserver without either importing the other.

Unpickling is restricted to an allowlist of data containers and torch's rebuild functions (the set SGLang's
SafeUnpickler allows, minus what we never send), because the bytes come from an HTTP body; beyond SGLang's
list, torch's tensor and storage classes cannot be called (a pickle could allocate any size with them), and a
shared-memory file must carry torch's own name and fit the caller's byte limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import pickle
import re
import types
from collections.abc import Sequence
from typing import Any

import torch

from asyncgrpo.sglang.buckets import bucket_layout, dtype_from_name

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
_ALLOWED: set[tuple[str, str]] = {
    ("builtins", n) for n in ("bool", "bytes", "dict", "float", "int", "list", "str", "tuple", "slice")} | {
    ("collections", "OrderedDict"), ("copyreg", "__newobj__"), ("types", "SimpleNamespace"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
    ("torch.nn.parameter", "Parameter"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
} | {("torch", n) for n in _DTYPES}
# SGLang's own senders pickle these classes; we read them as plain namespaces (the loader reads attributes only).
_SGLANG_DATA = {("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"),
                ("sglang.srt.model_executor.model_runner_components.weight_updater", "LocalSerializedTensor")}


class PayloadError(ValueError):
    """A serialized_named_tensors entry that is not a valid tensor payload."""


_CLASSES = {("torch", "Tensor"), ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
            ("torch", "UntypedStorage"), ("torch.nn.parameter", "Parameter")}
_SHM_HANDLE = re.compile(r"/torch_\d+_\d+_\d+")  # torch's names for its shared-memory files


class _Uncallable:
    """Stands for a torch class in a payload: the rebuild functions read its attributes and compare it, which
    work as on the class; calling it (allocating a tensor or storage of any size) is refused."""

    def __init__(self, cls: type) -> None:
        self._cls = cls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cls, name)

    def __eq__(self, other: object) -> bool:
        return other is self._cls or other is self

    def __hash__(self) -> int:
        return hash(self._cls)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise PayloadError(f"serialized_named_tensors: constructing {self._cls.__name__} is not allowed in a tensor payload")


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, max_bytes: int | None) -> None:
        super().__init__(io.BytesIO(data))
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SGLANG_DATA:
            return types.SimpleNamespace  # its fields come back as attributes
        if (module, name) == ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"):
            return _rebuild_cuda_tensor_by_uuid
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_storage_filename"):
            return self._storage_filename
        if (module, name) in _CLASSES:
            return _Uncallable(super().find_class(module, name))
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise PayloadError(f"serialized_named_tensors: {module}.{name} is not allowed in a tensor payload")

    def _storage_filename(self, cls: Any, manager: Any, handle: Any, size: Any, dtype: Any = None) -> Any:
        """torch's rebuild_storage_filename, for a torch shared-memory file of at most max_bytes only."""
        from torch.multiprocessing.reductions import rebuild_storage_filename

        ok_names = (isinstance(manager, bytes) and manager.startswith(b"/") and manager.endswith(b"manager.sock")
                    and isinstance(handle, bytes) and _SHM_HANDLE.fullmatch(handle.decode(errors="replace")) is not None)
        if not ok_names or not isinstance(size, int) or size < 0 or (dtype is not None and not isinstance(dtype, torch.dtype)):
            raise PayloadError("serialized_named_tensors: a shared-memory tensor must name a torch shared-memory file "
                               "(/torch_<pid>_<n>_<n>) and its torch_shm_manager socket")
        nbytes = size * (dtype.itemsize if dtype is not None else 1)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise PayloadError(f"serialized_named_tensors: a {nbytes}-byte shared-memory storage is larger than the "
                               f"{self.max_bytes} bytes this server accepts")
        return rebuild_storage_filename(cls, manager, handle, size, dtype)


def _rebuild_cuda_tensor_by_uuid(*args: Any) -> torch.Tensor:
    """SGLang's senders name the CUDA device by UUID (argument 6); map it back to an index here."""
    from torch.multiprocessing import reductions

    dev = args[6]
    if isinstance(dev, str):
        for i in range(torch.cuda.device_count()):
            if str(torch.cuda.get_device_properties(i).uuid) == dev:
                dev = i
                break
        else:
            raise PayloadError(f"serialized_named_tensors: no CUDA device with uuid {dev} here")
    return reductions.rebuild_cuda_tensor(*args[:6], dev, *args[7:])


def serialize(obj: Any) -> str:
    """base64 of the multiprocessing pickle of `obj`; its CPU tensors must already be in shared memory."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp

    # the file_system strategy names shared memory by file, which any process can open; the default
    # (file_descriptor) would hand a descriptor over a socket only a child of ours could connect to
    tmp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def deserialize(payload: str | bytes, max_bytes: int | None = None) -> Any:
    """The object of a payload; max_bytes bounds each shared-memory storage it maps."""
    try:
        raw = base64.b64decode(payload, validate=True) if isinstance(payload, str) else bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"serialized_named_tensors: not base64: {e}") from None
    try:
        return _Unpickler(raw, max_bytes).load()
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated pickle, a shared-memory file that is gone, ...
        raise PayloadError(f"serialized_named_tensors: cannot be loaded: {type(e).__name__}: {e}") from None


def bucket_payload(flat: torch.Tensor, names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                   shapes: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The flattened_bucket dict for `flat` (packed as asyncgrpo.sglang.buckets lays it out)."""
    offsets, total = bucket_layout(dtypes, shapes, names)
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"bucket must be a 1-D uint8 tensor of {total} bytes, got {flat.dtype} {tuple(flat.shape)}")
    if flat.device.type == "cpu" and not flat.is_shared():
        raise ValueError("a CPU bucket must be in shared memory (tensor.share_memory_()) to be sent by reference")
    meta = []
    for n, d, s, off in zip(names, dtypes, shapes, offsets):
        dt = dtype_from_name(d)
        nbytes = dt.itemsize * math.prod(int(x) for x in s)
        meta.append(types.SimpleNamespace(name=str(n), shape=torch.Size([int(x) for x in s]), dtype=dt,
                                          start_idx=off, end_idx=off + nbytes, numel=nbytes))
    return {"flattened_tensor": flat, "metadata": meta}


def bucket_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """name -> view of a received flattened_bucket dict, every field checked (views share the sender's memory)."""
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise PayloadError("serialized_named_tensors: a flattened_bucket payload is a dict with exactly "
                           "'flattened_tensor' and 'metadata'")
    flat, meta = obj["flattened_tensor"], obj["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise PayloadError("serialized_named_tensors: flattened_tensor must be a 1-D uint8 tensor")
    if not isinstance(meta, list) or not meta:
        raise PayloadError("serialized_named_tensors: metadata must be a non-empty list")
    out: dict[str, torch.Tensor] = {}
    for i, m in enumerate(meta):
        try:
            name, dt, start, end = str(m.name), m.dtype, int(m.start_idx), int(m.end_idx)
            shape = [int(x) for x in m.shape]
        except (AttributeError, TypeError, ValueError):
            raise PayloadError(f"serialized_named_tensors: metadata[{i}] needs name, shape, dtype, start_idx, "
                               "end_idx") from None
        if not isinstance(dt, torch.dtype) or any(x < 0 for x in shape):
            raise PayloadError(f"serialized_named_tensors: metadata[{i}] ({name}): bad dtype or shape")
        if name in out:
            raise PayloadError(f"serialized_named_tensors: {name!r} appears twice")
        if start < 0 or end > flat.numel() or end - start != dt.itemsize * math.prod(shape):
            raise PayloadError(f"serialized_named_tensors: {name!r} bytes [{start}, {end}) do not fit its shape "
                               f"{shape} {dt} inside the {flat.numel()}-byte bucket")
        if start % dt.itemsize:
            raise PayloadError(f"serialized_named_tensors: {name!r} starts at byte {start}, not a multiple of "
                               f"its {dt.itemsize}-byte elements (unaligned; SGLang refuses it too)")
        out[name] = flat[start:end].view(dt).view(shape)
    return out


def named_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """name -> tensor of a received plain payload (a list of (name, tensor) pairs)."""
    if not isinstance(obj, (list, tuple)) or not obj:
        raise PayloadError("serialized_named_tensors: a plain payload is a non-empty list of (name, tensor) pairs")
    out: dict[str, torch.Tensor] = {}
    for i, item in enumerate(obj):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise PayloadError(f"serialized_named_tensors: item {i} is not a (name, tensor) pair")
        out[str(item[0])] = item[1]
    return out
