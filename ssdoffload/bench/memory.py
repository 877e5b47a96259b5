"""Memory figures that do not depend on a GPU.

* ``SavedBytesMeter``: the bytes of activation storages autograd holds for backward, live,
  and their peak. It wraps a strategy's own saved-tensor hooks (or none) in a separate,
  untimed pass, so it never distorts the timed steps. Parameter storages (and views of them)
  are not activations and are not counted; each storage is counted once however many views
  of it are saved.
* ``PeakRSS``: the process's peak resident set size, resettable per step on Linux
  (``/proc/self/clear_refs``).
"""
from __future__ import annotations

import logging
import resource
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch.utils._pytree import tree_flatten

from ..policy import parameter_storages, storage_key

log = logging.getLogger("ssdoffload")

Key = Tuple[str, int]


class _Counted:
    """What the meter's pack hook returns: the inner packed value plus the storages it holds."""

    __slots__ = ("meter", "packed", "keys", "__weakref__")

    def __init__(self, meter: "SavedBytesMeter", packed: object, keys: List[Key]) -> None:
        self.meter, self.packed, self.keys = meter, packed, keys

    def __del__(self) -> None:
        self.meter._release(self.keys)


class SavedBytesMeter:
    """Counts the bytes of activation storages held by saved tensors, live and peak.

    Args:
        modules: Their parameters and buffers are excluded.
        inner: The strategy's own (pack, unpack) pair to wrap, or ``None``.
        layers: Modules whose forward marks the current layer, to report bytes per layer.
        device: Count only storages on this device (``None``: all). For ``save_on_cpu`` on a
            GPU host the host copies are then not counted: they are not device memory.
        threshold: ``threshold_bytes`` sums the storages of at least this size (what
            ssdoffload would offload with ``min_offload_bytes=threshold``).

    Use ``with meter.hooks():`` around forward and backward, innermost (it must see every
    pack before the strategy's own hooks do).
    """

    def __init__(self, modules: Iterable[torch.nn.Module],
                 inner: Optional[Tuple[Callable, Callable]] = None,
                 layers: Iterable[torch.nn.Module] = (), device: Optional[torch.device] = None,
                 threshold: int = 0) -> None:
        self.device = torch.device(device) if device is not None else None
        self.threshold = threshold
        self.threshold_bytes = 0  # bytes of the storages of at least ``threshold`` bytes
        self.param_keys: Set[Key] = parameter_storages(modules)  # the offloader's rule
        self.inner = inner
        self._live: Dict[Key, List[int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0  # every storage counted once, whether or not it was freed
        self.layer_bytes: Dict[int, int] = {}
        self._layer: Optional[int] = None
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter(i)))
            self._handles.append(layer.register_forward_hook(self._exit))

    def _enter(self, index: int):
        def hook(module, args):
            if torch._C._current_graph_task_id() == -1:  # not a recompute during backward
                self._layer = index
        return hook

    def _exit(self, module, args, output) -> None:
        if torch._C._current_graph_task_id() == -1:
            self._layer = None

    def _on_device(self, t: torch.Tensor) -> bool:
        d = self.device
        return d is None or (t.device.type == d.type and (d.index is None or t.device.index == d.index))

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Counted:
        packed = self.inner[0](tensor) if self.inner is not None else tensor
        keys: List[Key] = []
        for t in tree_flatten(packed)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            key = storage_key(t)
            if key is None or key in self.param_keys or not self._on_device(t):
                continue
            keys.append(key)
            slot = self._live.get(key)
            if slot is None:
                nbytes = t.untyped_storage().nbytes()
                self._live[key] = [1, nbytes]
                self.live_bytes += nbytes
                self.total_bytes += nbytes
                if nbytes >= max(self.threshold, 1):
                    self.threshold_bytes += nbytes
                if self._layer is not None:
                    self.layer_bytes[self._layer] = self.layer_bytes.get(self._layer, 0) + nbytes
            else:
                slot[0] += 1
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return _Counted(self, packed, keys)

    def _unpack(self, counted: _Counted) -> torch.Tensor:
        packed = counted.packed
        return self.inner[1](packed) if self.inner is not None else packed

    def _release(self, keys: List[Key]) -> None:
        for key in keys:
            slot = self._live.get(key)
            if slot is None:
                continue
            slot[0] -= 1
            if slot[0] == 0:
                del self._live[key]
                self.live_bytes -= slot[1]

    def max_layer_bytes(self) -> int:
        return max(self.layer_bytes.values(), default=0)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class PeakRSS:
    """The process's peak RSS since the last ``reset()`` (Linux); else the lifetime peak."""

    def __init__(self) -> None:
        self.resettable = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = self._vm_hwm() is not None
        except OSError:
            pass

    @staticmethod
    def _vm_hwm() -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def reset(self) -> None:
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.resettable = False

    def read(self) -> int:
        hwm = self._vm_hwm() if self.resettable else None
        if hwm is not None:
            return hwm
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
