"""What to offload: a pure decision per saved tensor.

Never offload what offloading cannot free or must not touch:

* parameters and buffers, and views of their storage (``W.t()`` saved by ``Linear``): the
  module keeps them alive anyway, so writing them only costs I/O;
* autocast copies of parameters (``grad_fn`` is ``ToCopyBackward0`` whose next function is
  ``AccumulateGrad``): autocast's cache holds them for the whole forward;
* tensor subclasses, sparse/nested/meta tensors and devices other than CPU and CUDA;
* tensors whose storage is smaller than ``min_offload_bytes``;
* anything saved during backward (reentrant checkpoint recompute, double backward): it is used
  right away.
"""
from __future__ import annotations

import enum
from typing import Iterable, Set, Tuple

import torch

from .views import storage_nbytes


class Decision(enum.Enum):
    OFFLOAD = "offload"
    PARAMETER = "parameter"
    AUTOCAST_PARAMETER_COPY = "autocast copy of a parameter"
    TOO_SMALL = "below min_offload_bytes"
    UNSUPPORTED = "unsupported tensor kind"
    IN_BACKWARD = "saved during backward"
    LAYER_KEPT = "layer kept on the device"


def parameter_storages(modules: Iterable[torch.nn.Module]) -> Set[Tuple[str, int]]:
    """(device, address) of every parameter and buffer storage of ``modules``."""
    keys = set()
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t is not None and t.layout == torch.strided and t.device.type != "meta":
                keys.add((str(t.device), t.untyped_storage().data_ptr()))
    return keys


def is_autocast_parameter_copy(tensor: torch.Tensor) -> bool:
    """A cast of a leaf that requires grad (autocast's weight copy), or a view of one."""
    if tensor._base is not None:
        tensor = tensor._base
    fn = tensor.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return any(nxt is not None and type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions)


def decide(tensor: torch.Tensor, param_keys: Set[Tuple[str, int]], min_offload_bytes: int,
           in_backward: bool) -> Decision:
    """Whether ``tensor`` (just saved by autograd) should be offloaded, and if not, why."""
    if in_backward:
        return Decision.IN_BACKWARD
    if (type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter)) \
            or tensor.layout != torch.strided or tensor.device.type not in ("cpu", "cuda") \
            or tensor.is_nested:
        return Decision.UNSUPPORTED
    if isinstance(tensor, torch.nn.Parameter):
        return Decision.PARAMETER
    if (str(tensor.device), tensor.untyped_storage().data_ptr()) in param_keys:
        return Decision.PARAMETER
    if is_autocast_parameter_copy(tensor):
        return Decision.AUTOCAST_PARAMETER_COPY
    if storage_nbytes(tensor) < max(min_offload_bytes, 1):
        return Decision.TOO_SMALL
    return Decision.OFFLOAD
