"""Pure functions about storages and views: how a saved tensor is identified and rebuilt.

ssdoffload offloads *storages*, not tensors: q, k and v of a fused projection are three views
of one storage, a tensor saved by two ops is one storage, ``W.t()`` is a transposed view. Each
saved tensor keeps a ``ViewSpec`` (offset, size, stride, dtype) and is rebuilt with
``as_strided``-equivalent ``set_`` over the reloaded storage, so every view comes back exactly.

Storage identity: a raw ``data_ptr`` is not an identity, because the caching allocator hands the
same address to a new tensor as soon as the old one dies. Torch preserves the Python object of a
live ``UntypedStorage`` (``t.untyped_storage() is t.untyped_storage()`` while the storage lives),
so a weak reference to that object is a token that dies exactly with the storage.

Sharing a storage is not sharing bytes over time. Two tensors may share a storage without
sharing autograd's version counter: ``unsafe_split``/``unsafe_chunk`` pieces, ``.data``,
``set_`` and ``detach()``-then-``set_`` aliases. An in-place op on one of them does not bump the
other's version, so "same storage, same version" does not mean "same bytes as when it was saved"
(``nn.GRU``'s CPU kernel saves two ``unsafe_split`` gates, each after its own ``add_``/``sigmoid_``).
Only *views* provably share the counter: a view's ``_base`` is the root tensor whose counter all
its views use. So a saved tensor may reuse another's entry only if both have the same storage
object, the same root tensor object and the same version (``StorageToken.matches``).

In-place detection: autograd skips its own saved-tensor version check when saved-tensor hooks
are set, so ours is the only guard. ``version_witness`` makes a tensor that shares the saved
tensor's version counter but none of its memory (a ``detach()`` alias re-pointed at an empty
storage, with the counter put back to its value), so the check works for an offloaded tensor
whose memory is gone and for a temporary view (``y.t()`` inside ``mm``) that died right after
it was saved.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Tuple

import torch


class ViewSpec(NamedTuple):
    """Where a tensor lives inside its storage."""

    dtype: torch.dtype
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "ViewSpec":
        return cls(tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset())

    def describe(self) -> str:
        return f"{tuple(self.size)} {str(self.dtype).replace('torch.', '')}"


def storage_nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def storage_key(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """A hashable key for the storage of ``tensor``: (device index, address), the device index
    being ``Tensor.get_device()`` (-1 for CPU); None for anything but a plain strided tensor.
    The one rule for "the same storage" (the offloader, the planner's measurement and the
    benchmark's meter use it). Only meaningful together with ``StorageToken.matches``: the
    address may be reused.

    Tensor subclasses (FSDP2's ``DTensor`` shards) are looked through to their local tensor
    where they have one; the address of a subclass's own storage is meaningless (torch raises
    "Attempted to access the data pointer on an invalid python storage").
    """
    if type(t) is not torch.Tensor:  # the common case (a plain tensor) skips all of this
        local = getattr(t, "_local_tensor", None)
        if local is not None:
            t = local
        if not isinstance(t, torch.Tensor) or (type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)):
            return None
    if t.layout != torch.strided or t.is_meta or t.is_nested:
        return None
    try:
        return (t.get_device(), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def root_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose version counter ``tensor`` uses: its view base, or itself."""
    base = tensor._base
    return tensor if base is None else base


class StorageToken:
    """Weak references to a storage object and to the root tensor (the owner of the version
    counter) of a saved tensor, with the version and the storage's address and size at pack
    time."""

    __slots__ = ("_ref", "_root", "version", "data_ptr", "nbytes")

    def __init__(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        self._ref = weakref.ref(storage)
        self._root = weakref.ref(root_of(tensor))
        self.version = tensor._version
        self.data_ptr = storage.data_ptr()
        self.nbytes = storage.nbytes()

    def matches(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` provably holds the bytes the token's tensor had when saved: a
        view of the same live storage object, of the same root tensor (so the same version
        counter), at the same version, and the storage has not been resized or moved since."""
        storage = tensor.untyped_storage()
        return (self._ref() is storage and self._root() is root_of(tensor)
                and tensor._version == self.version and storage.data_ptr() == self.data_ptr
                and storage.nbytes() == self.nbytes)

    def unchanged(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage`` still has the address and size it had at pack time (a storage
        that was resized — FSDP frees gathered weights with ``resize_(0)`` — or moved must not
        be written: its bytes are not the saved ones, or not there at all)."""
        return storage.data_ptr() == self.data_ptr and storage.nbytes() == self.nbytes

    @property
    def alive(self) -> bool:
        return self._ref() is not None


def version_witness(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that shares ``tensor``'s version counter and none of its memory.

    ``detach()`` shares the counter (and the storage); ``set_()`` then points the alias at a
    new empty storage. ``set_`` is an in-place op and bumps the shared counter, so the counter is
    put back to the value it had: nobody else can observe the bump (the compute thread is
    inside autograd's pack hook).
    """
    version = tensor._version
    witness = tensor.detach()  # never requires grad: set_ needs no no_grad() (which costs ~1 us)
    witness.set_()             # a new empty storage of the same device and dtype
    _set_version(witness, version)
    return witness


def _set_version(tensor: torch.Tensor, version: int) -> None:
    try:
        torch._C._autograd._unsafe_set_version_counter((tensor,), (version,))
    except TypeError:  # torch < 2.6 takes one tensor and one version
        torch._C._autograd._unsafe_set_version_counter(tensor, version)


def rebuild(storage: torch.UntypedStorage, spec: ViewSpec) -> torch.Tensor:
    """The view described by ``spec`` over ``storage`` (no copy)."""
    out = torch.empty(0, dtype=spec.dtype, device=storage.device)
    out.set_(storage, spec.storage_offset, spec.size, spec.stride)
    return out
