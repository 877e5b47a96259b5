"""Pure functions about storages and views: how a saved tensor is identified and rebuilt.

ssdoffload offloads *storages*, not tensors: q, k and v of a fused projection are three views
of one storage, a tensor saved by two ops is one storage, ``W.t()`` is a transposed view. Each
saved tensor keeps a ``ViewSpec`` (offset, size, stride, dtype) and is rebuilt with
``as_strided``-equivalent ``set_`` over the reloaded storage, so every view comes back exactly.

Storage identity: a raw ``data_ptr`` is not an identity, because the caching allocator hands the
same address to a new tensor as soon as the old one dies. Torch preserves the Python object of a
live ``UntypedStorage`` (``t.untyped_storage() is t.untyped_storage()`` while the storage lives),
so a weak reference to that object is a token that dies exactly with the storage: a key is a
match only if its weak reference still points to the very storage object being saved.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class ViewSpec:
    """Where a tensor lives inside its storage."""

    dtype: torch.dtype
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "ViewSpec":
        return cls(tensor.dtype, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())

    def describe(self) -> str:
        return f"{tuple(self.size)} {str(self.dtype).replace('torch.', '')}"


def storage_nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def storage_key(tensor: torch.Tensor) -> Tuple[str, int]:
    """A hashable key for the storage of ``tensor``: (device, address).

    Only meaningful together with ``StorageToken.matches``: the address may be reused.
    """
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr())


class StorageToken:
    """A weak reference to a storage object that says whether a tensor still uses it."""

    __slots__ = ("_ref", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self._ref = weakref.ref(tensor.untyped_storage())
        self.version = tensor._version

    def matches(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` is a view of the same live storage at the same version."""
        return self._ref() is tensor.untyped_storage() and tensor._version == self.version

    @property
    def alive(self) -> bool:
        return self._ref() is not None


def rebuild(storage: torch.UntypedStorage, spec: ViewSpec) -> torch.Tensor:
    """The view described by ``spec`` over ``storage`` (no copy)."""
    out = torch.empty(0, dtype=spec.dtype, device=storage.device)
    out.set_(storage, spec.storage_offset, spec.size, spec.stride)
    return out


def check_fits(storage_nbytes_: int, spec: ViewSpec) -> None:
    """Raise if the view reaches outside its storage (a corrupted handle, never a user error)."""
    if any(s == 0 for s in spec.size):
        return
    itemsize = torch.empty(0, dtype=spec.dtype).element_size()
    last = spec.storage_offset + sum((n - 1) * st for n, st in zip(spec.size, spec.stride))
    if spec.storage_offset < 0 or (last + 1) * itemsize > storage_nbytes_:
        raise ValueError(
            f"view {spec.describe()} stride {spec.stride} offset {spec.storage_offset} does not fit "
            f"in a storage of {storage_nbytes_} bytes"
        )


def base_of(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor ``tensor`` is a view of, if any."""
    return tensor._base
