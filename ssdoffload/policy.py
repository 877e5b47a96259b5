"""What to offload: a pure decision per saved tensor.

Never offload what offloading cannot free or must not touch:

* parameters, recognised at pack time whatever wraps them: an ``nn.Parameter`` (FSDP2's
  unsharded parameters are fresh ``nn.Parameter`` objects made during forward; PEFT's frozen
  weights are parameters with ``requires_grad=False``), a view of one (``W.t()`` saved by
  ``Linear``), any leaf that requires grad and its views (the user holds it anyway); and the
  storages of the model's parameters and buffers (a ``.detach()``/``.data`` alias of a weight):
  the module keeps them alive, so writing them only costs I/O — and FSDP2 frees and refills
  them (``resize_(0)``) behind our back;
* autocast copies of parameters (``grad_fn`` is ``ToCopyBackward0`` whose next function is
  ``AccumulateGrad``): autocast's cache holds them for the whole forward;
* tensor subclasses, sparse/nested/meta tensors and devices other than CPU and CUDA;
* tensors whose storage is smaller than ``min_offload_bytes``;
* anything saved during backward (reentrant checkpoint recompute, double backward): it is used
  right away.
"""
from __future__ import annotations

import enum
from typing import Iterable, Optional, Set, Tuple

import torch

from .views import storage_key


class Decision(enum.Enum):
    __hash__ = object.__hash__  # singletons: identity, in C (see cache.State)

    OFFLOAD = "offload"
    PARAMETER = "parameter"
    AUTOCAST_PARAMETER_COPY = "autocast copy of a parameter"
    TOO_SMALL = "below min_offload_bytes"
    UNSUPPORTED = "unsupported tensor kind"
    IN_BACKWARD = "saved during backward"
    LAYER_KEPT = "plan keeps its layer on the device"
    NO_SCOPE = "saved outside any step or micro-batch scope"
    CLOSED = "offloader closed"


def parameter_storages(modules: Iterable[torch.nn.Module]) -> Set[Tuple[str, int]]:
    """``views.storage_key`` of every parameter and buffer storage of ``modules`` (plain
    tensors, and the local tensors of sharded ones). Empty storages are left out: they all share
    address 0, and an empty saved tensor is kept as too small anyway."""
    keys = set()
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            key = storage_key(t)
            if key is not None and key[1] != 0:  # address 0: an empty storage
                keys.add(key)
    return keys


def module_storages(modules: Iterable[torch.nn.Module]) -> Set[Tuple[int, int]]:
    """``parameter_storages`` over an already flattened list of modules (each module's own
    parameters and buffers; no recursion): what the offloader refreshes at every scope."""
    keys = set()
    plain = (torch.Tensor, torch.nn.Parameter)
    strided = torch.strided
    for m in modules:
        for table in (m._parameters, m._buffers):
            for t in table.values():
                if t is None:
                    continue
                if type(t) in plain and t.layout is strided and not t.is_meta and not t.is_nested:
                    key = (t.get_device(), t.untyped_storage().data_ptr())  # storage_key's rule, inline
                else:
                    key = storage_key(t)
                if key is not None and key[1] != 0:
                    keys.add(key)
    return keys


def is_parameter_like(tensor: torch.Tensor) -> bool:
    """An ``nn.Parameter``, a leaf that requires grad, or a view of either."""
    base = tensor._base
    if base is not None:
        tensor = base
    if tensor.requires_grad and tensor.grad_fn is None:
        return True
    # A plain tensor is a Parameter only when marked so (Parameter's isinstance is slow).
    if type(tensor) is torch.Tensor:
        return bool(getattr(tensor, "_is_param", False))
    return isinstance(tensor, torch.nn.Parameter)


def saved_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the storage behind ``tensor`` for the statistics; 0 for layouts without one
    (sparse, nested) or subclasses whose storage is not real memory."""
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return 0


def is_autocast_parameter_copy(tensor: torch.Tensor) -> bool:
    """A cast of a leaf that requires grad (autocast's weight copy), or a view of one."""
    if tensor._base is not None:
        tensor = tensor._base
    fn = tensor.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return any(nxt is not None and type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions)


def classify(tensor: torch.Tensor, param_keys: Set[Tuple[int, int]], min_offload_bytes: int,
             in_backward: bool) -> Tuple[Decision, Optional[Tuple[int, int]], int]:
    """``decide``, with the storage key and storage bytes it looked at (the pack hook needs
    them next: computed once). Key and bytes are None and 0 where the decision came first."""
    if in_backward:
        return Decision.IN_BACKWARD, None, 0
    if type(tensor) is torch.Tensor:  # the common case: plain tensor, key computed inline
        if tensor.layout != torch.strided or not (tensor.is_cpu or tensor.is_cuda) or tensor.is_nested:
            return Decision.UNSUPPORTED, None, 0
        if is_parameter_like(tensor):
            return Decision.PARAMETER, None, 0
        storage = tensor.untyped_storage()
        key = (tensor.get_device(), storage.data_ptr())  # = views.storage_key(tensor)
    else:
        if not isinstance(tensor, torch.nn.Parameter) or tensor.layout != torch.strided \
                or tensor.device.type not in ("cpu", "cuda") or tensor.is_nested:
            return Decision.UNSUPPORTED, None, 0
        return Decision.PARAMETER, None, 0  # a Parameter (is_parameter_like)
    if param_keys and key in param_keys:
        return Decision.PARAMETER, key, 0
    if is_autocast_parameter_copy(tensor):
        return Decision.AUTOCAST_PARAMETER_COPY, key, 0
    nbytes = storage.nbytes()
    if nbytes < max(min_offload_bytes, 1):
        return Decision.TOO_SMALL, key, nbytes
    return Decision.OFFLOAD, key, nbytes


def decide(tensor: torch.Tensor, param_keys: Set[Tuple[int, int]], min_offload_bytes: int,
           in_backward: bool) -> Decision:
    """Whether ``tensor`` (just saved by autograd) should be offloaded, and if not, why."""
    return classify(tensor, param_keys, min_offload_bytes, in_backward)[0]
