"""Activation memory measured from outside ssdoffload (a test helper; it reads none of the
library's counters).

``ActivationMeter`` follows, with weak references, every storage that is alive because
autograd saved it:

* **saved tensors**: a saved-tensor hook pair pushed *on top of* whatever hooks are active
  (the offloader's, or none) sees every tensor autograd saves, records its storage and hands
  the tensor on to the hooks below (``torch._C._autograd._top_saved_tensors_default_hooks``).
  The storage counts until it is freed, whoever holds it: the graph, a kept wrapper, a write
  in flight, the user's own variables;
* **recomputation**: what a checkpointed region saves while backward runs it again — torch's
  non-reentrant checkpoint keeps it in its frame (its ``_recomputation_hook`` is wrapped);
  reentrant checkpointing saves through the hooks active in backward, which are ours;
* **reload buffers**: the library's CPU reload buffers are numpy arrays (``numpy.empty``):
  while measuring, ``numpy.empty`` is wrapped to follow each array it returns with a weak
  reference, counted from allocation to release. (Not ``tracemalloc``, which did the same
  through numpy's allocation domain until it crashed a rank: CPython 3.11's tracemalloc
  segfaults when a C thread without a Python thread state — gloo's — creates one.)

The peak is sampled at every save, every unpack and every op of the step (a dispatch mode on
the training thread), so it sees memory at the moments it can be highest.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Dict, Optional

import numpy
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode



class ActivationMeter:
    """Counts live saved storages, recomputed storages and numpy buffers; ``peak`` in bytes.

    ``parameters``: storages never counted (the model's parameters and buffers)."""

    def __init__(self, model: Optional[torch.nn.Module] = None) -> None:
        # Re-entrant: a collection inside a counted section may run a finaliser that counts.
        self._lock = threading.RLock()
        self._live: Dict[int, int] = {}  # id(storage object) -> bytes
        self._reloaded: set = set()  # data pointers of read-back storages that unpack returned
        self._total = 0
        self._skip = set()
        if model is not None:
            # A DTensor (FSDP2's sharded parameter) has no storage of its own: its local shard's.
            self._skip = {(t.to_local() if type(t).__name__ == "DTensor" else t).untyped_storage().data_ptr()
                          for t in list(model.parameters()) + list(model.buffers())}
        self.peak = 0
        self.peak_saved = 0
        self.peak_numpy = 0
        self._tracing = False
        self._numpy_last = 0
        self._numpy_total = 0
        self._held: list = []  # storages of parameters modules held in forward (strong refs)
        self._held_ids: set = set()
        self._handles: list = []

    # -- counting ------------------------------------------------------------------------
    def _track(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._skip or ptr in self._reloaded or storage.nbytes() == 0 or id(storage) in self._held_ids:
            return  # a parameter, or a buffer the library read back (counted as numpy memory)
        key = id(storage)
        with self._lock:
            if key in self._live:
                return
            self._live[key] = storage.nbytes()
            self._total += storage.nbytes()
        weakref.finalize(storage, self._dead, key)

    def _dead(self, key: int) -> None:
        with self._lock:
            self._total -= self._live.pop(key, 0)

    def saved_now(self) -> int:
        return self._total

    def numpy_now(self) -> int:
        return self._numpy_total if self._tracing else 0

    def _numpy_empty_over(self, empty: Callable) -> Callable:
        def counted_empty(*args, **kwargs):
            array = empty(*args, **kwargs)
            with self._lock:
                self._numpy_total += array.nbytes
            weakref.finalize(array, self._numpy_dead, array.nbytes)
            return array
        return counted_empty

    def _numpy_dead(self, nbytes: int) -> None:
        with self._lock:
            self._numpy_total -= nbytes

    def sample(self, numpy_too: bool = True) -> None:
        """Take a reading; ``numpy_too=False`` reuses the last numpy figure (taken where reload
        buffers come and go, at every unpack)."""
        saved = self.saved_now()
        np_bytes = self.numpy_now() if numpy_too else self._numpy_last
        self._numpy_last = np_bytes
        self.peak_saved = max(self.peak_saved, saved)
        self.peak_numpy = max(self.peak_numpy, np_bytes)
        self.peak = max(self.peak, saved + np_bytes)

    def skip_parameters_held_by(self, model: torch.nn.Module) -> None:
        """Also never count the parameters ``model``'s modules hold while they run: FSDP2's
        unsharded parameters, gathered just before a module's forward (FSDP2's hook runs before
        ours) and saved by it; they are parameters, not activations. ``close()`` removes it."""
        def remember(module, args):
            for p in module.parameters():
                if type(p).__name__ != "DTensor":
                    storage = p.untyped_storage()
                    self._held.append(storage)  # kept alive: its id stays its own
                    self._held_ids.add(id(storage))
        self._handles += [m.register_forward_pre_hook(remember) for m in model.modules()
                          if any(True for _ in m.parameters(recurse=False))]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._held = [], []

    # -- the hooks on top ----------------------------------------------------------------
    def _pack_over(self, below_pack: Optional[Callable]) -> Callable:
        def pack(tensor):
            self._track(tensor)
            self.sample(numpy_too=torch._C._current_graph_task_id() != -1)  # forward: no reloads
            return below_pack(tensor) if below_pack is not None else tensor
        return pack

    def _unpack_over(self, below_unpack: Optional[Callable]) -> Callable:
        def unpack(packed):
            out = below_unpack(packed) if below_unpack is not None else packed
            if isinstance(out, torch.Tensor) and below_unpack is not None:
                storage = out.untyped_storage()
                with self._lock:
                    tracked = id(storage) in self._live
                if not tracked and out.device.type == "cuda":
                    self._track(out)  # a device reload buffer (torch.empty): device memory from here on
                elif not tracked:  # not the storage saved in forward: a CPU reload buffer (numpy)
                    self._reloaded.add(storage.data_ptr())
            self.sample()
            return out
        return unpack

    @contextlib.contextmanager
    def saving(self):
        """Push the meter's hooks over the active ones (enter it inside ``off.step()``)."""
        below = torch._C._autograd._top_saved_tensors_default_hooks(False)
        below_pack, below_unpack = below if below is not None else (None, None)
        with torch.autograd.graph.saved_tensors_hooks(self._pack_over(below_pack), self._unpack_over(below_unpack)):
            yield

    @contextlib.contextmanager
    def measuring(self, per_op: bool = True):
        """The whole measured region (enter it around steps): recomputation, numpy buffers
        and a sample at every op. ``per_op=False`` for torch.compile'd models: Dynamo runs a
        frame eagerly while a dispatch mode is active, so the sampler would measure the eager
        model; samples are then taken at every save and unpack only."""
        meter = self
        original = torch_checkpoint._recomputation_hook.__init__

        def init(hook_self, *args, **kwargs):
            original(hook_self, *args, **kwargs)
            pack = hook_self.pack_hook

            def counted(x):
                out = pack(x)
                meter._track(out)
                meter.sample()
                return out
            hook_self.pack_hook = counted

        class Sampler(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter.sample(numpy_too=False)
                return out

        original_empty = numpy.empty
        numpy.empty = self._numpy_empty_over(original_empty)
        self._tracing = True
        torch_checkpoint._recomputation_hook.__init__ = init
        try:
            with (Sampler() if per_op else contextlib.nullcontext()):
                yield self
        finally:
            torch_checkpoint._recomputation_hook.__init__ = original
            self._tracing = False
            numpy.empty = original_empty
