"""``Offloader``: the object a user holds. It wires config, store, I/O engine, cache, hooks,
layer tracking and prefetching together and owns their lifetime.

Scopes: every forward runs inside a *micro-batch scope* (``step()`` opens one for a whole
forward+backward; ``micro_batch(key)`` opens one for a forward whose backward comes later, as in
pipeline schedules). Tensors saved in a scope are grouped by layer; ``prefetch(key)`` tells the
offloader which scope's backward comes next.

Everything the offloader starts (I/O threads, spill files, pinned memory) ends on ``close()``,
on leaving ``with Offloader(...)``, and at interpreter exit; an exception inside ``step()``
discards that step's spill data and removes the spill files (they are made again on the next
step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import logging
import threading
from typing import Any, Iterator, Optional, Sequence

import torch

from .adaptive import AdaptivePolicy, Plan, StepObservation
from .budget import SAVED_PLACE, BudgetPolicy, recomputes, resolve_budget
from . import shutdown
from .cache import OffloadCache
from .config import OffloadConfig, current_rank
from .errors import OffloadError
from .forward_position import ForwardPosition, ScopeState, layer_group
from .forward_scopes import ForwardScopes
from .hooks import SavedTensorHooks
from .host_ram import HostTier
from .io import make_engine
from .layers import LayerTracker, compiled, find_layers
from .recompute_watch import RecomputeWatch
from .placement import Placement
from .places import DrivePlace, HostRamPlace, Places
from .policy import module_storages
from .prefetch import Prefetcher
from .profiling import StepProfiler
from .recompute import RecomputedLayers
from .stats import OffloadStats, StatsCollector
from .store import SpillStore, prepare_rank_parents
from .shutdown import Teardown
from .transfers import Transfers, wait_for

#: Fewer bytes than this moved in a step say little about a drive's bandwidth.
_MIN_MEASURED_BYTES = 64 << 10
#: What the plan assumes a pinned host copy moves per second (PCIe Gen4/5 x16, conservatively).
_PCIE_BYTES_PER_S = 20e9
#: Grouping by bytes (models without layers): the first step's group size, then about this
#: many groups per step, each at least _MIN_GROUP_BYTES (smaller ones only add bookkeeping).
_FIRST_GROUP_BYTES = 8 << 20
_GROUPS_PER_STEP = 16
_MIN_GROUP_BYTES = 1 << 20

log = logging.getLogger("ssdoffload")


class Offloader:
    """Spills the activations autograd saves to NVMe and reloads them ahead of backward.

    Args:
        model: The model being trained: its parameters and buffers are never offloaded and its
            layers (``config.layers``, or the longest ``nn.ModuleList`` of same-typed blocks)
            define the prefetch groups. May be ``None`` (nothing is excluded but parameters
            that autograd marks as such; no layer groups).
        config: An ``OffloadConfig``; keyword arguments build one when it is omitted.

    Spill directories are checked and the spill files created here, so a bad path fails now.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, config: Optional[OffloadConfig] = None,
                 **config_kwargs: Any) -> None:
        if config is None:
            config = OffloadConfig(**config_kwargs)
        elif config_kwargs:
            raise TypeError("pass either an OffloadConfig or keyword arguments, not both")
        if not isinstance(config, OffloadConfig):
            raise TypeError(f"config must be an OffloadConfig, got {type(config).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.config = config
        self.model = model
        self._owner_pid = os.getpid()
        self._closed = False
        self._teardown = Teardown()  # what close() ends: the parts, once they are built
        self._lock = threading.RLock()
        self._stats = StatsCollector()
        self._step_keys = itertools.count()
        self.paths = config.resolved_paths()
        self.engine = None
        self.places: Optional[Places] = None
        self.tracker: Optional[LayerTracker] = None
        self.recompute_watch: Optional[RecomputeWatch] = None
        self.tier: Optional[HostTier] = None
        self.adaptive: Optional[AdaptivePolicy] = None
        self.profiler: Optional[StepProfiler] = None
        self.memory_budget: Optional[int] = None
        self.recomputed: Optional[RecomputedLayers] = None
        self.position = ForwardPosition()
        self._group_bytes_fixed = True
        self._attached: list = []  # ForwardScopes handles made by attach()
        self._modules = list(model.modules()) if model is not None else []
        if not config.enabled:
            return
        shutdown.close_dropped()  # offloaders dropped unclosed end now, not at exit
        prepare_rank_parents(config.paths, current_rank())  # .../rank{rank}: the job's directory
        store: Optional[SpillStore] = SpillStore(self.paths, config.initial_file_bytes,
                                                 grow_timeout=config.io_timeout)
        drive: Optional[DrivePlace] = None
        try:
            # The parts, each built from the ones below it (nothing is wired in afterwards):
            # 1. the I/O engine, the entries' cache and the places an entry can go.
            self.engine = make_engine(config)
            self.cache = OffloadCache(self._stats)
            drive = DrivePlace(store, self.paths, config.initial_file_bytes, self.engine, self._stats,
                               verify=config.checksums, write_cap=config.max_write_bandwidth,
                               read_cap=config.max_read_bandwidth, io_timeout=config.io_timeout)
            store = None  # the drive place owns it now
            ram = None
            if config.host_cache_bytes > 0:
                self.tier = HostTier(config.host_cache_bytes, self._stats)
                ram = HostRamPlace(self.tier, self.engine, self._stats, overflow=drive)
            self.places = Places(drive, ram)
            # 2. the entries' transfers between states.
            self.transfers = Transfers(self.cache, self._stats, config.io_timeout)
            # 3. the plan: measured (adaptive) or fixed; it owns placement and read-ahead.
            layers = config.layers if config.layers is not None else find_layers(model)
            if config.policy in ("adaptive", "budget"):
                self.profiler = StepProfiler()
                # On a CPU host the tier keeps tensors in place: host memory is the device's,
                # so a RAM placement would save nothing and the plan is made without it.
                cuda = self._on_cuda()
                common = dict(depth=config.prefetch_depth, host_cache_bytes=config.host_cache_bytes if cuda else 0,
                              write_cap=config.max_write_bandwidth, read_cap=config.max_read_bandwidth,
                              tolerance=config.stall_tolerance, ram_bps=_PCIE_BYTES_PER_S)
                if config.policy == "budget":
                    self.memory_budget = resolve_budget(config.memory_budget, self._device())
                    self.adaptive = BudgetPolicy(memory_budget=self.memory_budget, **common)
                else:
                    self.adaptive = AdaptivePolicy(**common)
            self.placement = Placement(self.places, self.adaptive, config.prefetch_depth, self.memory_budget)
            # 4. read-ahead, the forward position, the hooks and the layer hooks.
            self.prefetcher = Prefetcher(self.cache, self.transfers, self.placement, self.profiler)
            self.position = ForwardPosition(self.profiler)
            if not layers:
                # No blocks to group by (torchvision-style nn.Sequential stages, a custom model,
                # no model): group saved tensors by bytes in pack order instead.
                self.position.group_bytes = _FIRST_GROUP_BYTES
                self._group_bytes_fixed = False
            self.recomputed = RecomputedLayers(layers)
            self.hooks = SavedTensorHooks(config, self.cache, self.transfers, self.prefetcher, self.placement,
                                          self.position, self._stats, self.recomputed)
            self.tracker = LayerTracker(layers, self.position, self.prefetcher)
            # 5. the user's own checkpointing: what its recomputations hold, seen and counted.
            self.recompute_watch = RecomputeWatch(layers, self.hooks, self.recomputed)
        except BaseException:
            # Half-built: end what was made, here (nothing is in flight), and leave nothing
            # for a finaliser or the exit hook to do.
            self._closed = True
            if self.tracker is not None:
                self.tracker.remove()
            if self.recompute_watch is not None:
                self.recompute_watch.remove()
            if store is not None:
                store.close(failed=True)  # also removes the directories it made
            elif drive is not None:
                drive.discard(failed=True)
            Teardown(self.engine, tier=self.tier).finish()
            raise
        self._teardown = Teardown(self.engine, self.cache, self.transfers, self.places, self.tier)
        shutdown.watch(self, self._teardown)  # closed at exit, or at a safe point if dropped
        log.info("ssdoffload: offloading to %s (%d layers tracked, policy %s%s%s)", ", ".join(self.paths),
                 len(layers), config.policy if self.adaptive is not None or config.policy == "all" else "all",
                 f", host tier {config.host_cache_bytes >> 20} MiB" if self.tier is not None else "",
                 f", write cap {config.max_write_bandwidth / 1e6:.0f} MB/s" if config.max_write_bandwidth else "")

    # -- public API ----------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (a closed Offloader refuses new scopes)."""
        return self._closed

    @property
    def layers(self) -> list:
        return self.tracker.layers if self.tracker is not None else []

    @contextlib.contextmanager
    def step(self) -> Iterator["Offloader"]:
        """Scope the forward and backward of one training step (or one micro-batch).

        On an exception inside, the step's spill data is discarded and the spill files removed.
        """
        if not self.enabled:
            yield self
            self.end_step()
            return
        # Opening may be refused (a step already open, here or on another thread): that raises
        # before the try below, so a refusal never aborts the live step.
        scope = self._open_scope(("step", next(self._step_keys)))
        try:
            with self.hooks.context():
                yield self
        except BaseException:
            self._close_scope(scope)
            self.abort()
            raise
        self._close_scope(scope)
        self.end_step()

    @contextlib.contextmanager
    def micro_batch(self, key: Any) -> Iterator["Offloader"]:
        """Scope the forward of micro-batch ``key``; its backward may run later, outside.

        Several micro-batches may be in flight (forwarded, not yet backwarded); each keeps its
        own groups. Scopes do not nest.
        """
        if not self.enabled:
            yield self
            return
        scope = self._open_scope(key)
        try:
            with self.hooks.context():
                yield self
        finally:
            self._close_scope(scope)

    def attach(self, module: torch.nn.Module) -> ForwardScopes:
        """Offload during every training forward of ``module`` from now on, for loops that
        call the model themselves (HF Trainer, accelerate): each outermost forward gets its own
        micro-batch scope, backward may come later. ``handle.remove()`` (or ``close()``)
        detaches it."""
        self._check_open()
        if not self.enabled:
            raise OffloadError("this Offloader is disabled (enabled=False); nothing to attach")
        handle = ForwardScopes(self, module)
        self._attached.append(handle)
        return handle

    def _open_scope(self, key: Any) -> ScopeState:
        """Make ``key`` the active scope, or raise ``OffloadError`` if one is open. A
        KeyboardInterrupt that lands half-way closes it again: no scope is left open."""
        self._check_open()
        with self._lock:
            self.places.drive.reopen()  # no-op unless an aborted step removed the files
            scope = self.position.open(key, self._on_cuda())
        try:
            self._release_dead()
            self.prefetcher.forget(key)
            if self.tracker is not None:
                self.tracker.follow_compiled()  # a layer compiled since the last scope
            if self.model is not None and compiled(self.model):
                self._one_compiled_graph()
            # The modules are listed once (walking the tree each step cost ~5 us per saved tensor
            # of a small model); their parameters and buffers are read again every scope, as
            # FSDP2 swaps them. Modules added to the model later are not seen: their parameters
            # are still recognised as parameters when saved (policy.is_parameter_like).
            self.hooks.param_keys = module_storages(self._modules)
        except BaseException:
            self._close_scope(scope)
            raise
        return scope

    def _close_scope(self, scope: ScopeState) -> None:
        self.position.close(scope)

    def prefetch(self, key: Any) -> int:
        """Micro-batch ``key``'s backward comes next: start reading its last layers now.

        Returns the number of reads started.
        """
        if not self.enabled:
            return 0
        self._check_open()
        self._release_dead()
        return self.prefetcher.prefetch_scope(key)

    def timeline(self, enabled: Optional[bool] = None) -> list:
        """Turn the transfer timeline on or off; returns (and clears) the events so far.

        Each event is a ``TimelineEvent`` (kind "write" / "read" / "stall", perf_counter start
        and end, bytes, layer, micro-batch). Spans named ``ssdoffload.write``, ``.read`` and
        ``.stall`` also appear in ``torch.profiler`` traces.
        """
        if not self.enabled or self.engine is None:
            return []
        if enabled is not None:
            self.transfers.timeline.enabled = enabled
        return self.transfers.timeline.drain()

    def end_step(self) -> OffloadStats:
        """Close the current step's statistics (``step()`` does this itself) and, with
        ``policy="adaptive"``, feed the step's measurements to the plan (which may change for
        the next step: see ``plan()``)."""
        self._release_dead()
        if self.enabled and not self._closed:
            self.hooks.close_user_recompute()  # backward is over: its recomputation too
            if self.recompute_watch is not None:
                self.recompute_watch.end_step()
        if self._layers_silent() and not self._closed:
            # Layer hooks that never fire: the model (or each block) was torch.compile'd, and
            # module hooks traced into a graph do not run per call. Group by bytes instead.
            log.warning("ssdoffload: the %d layers' hooks did not run in a step that offloaded "
                        "tensors (torch.compile traces module hooks into its graph); grouping "
                        "saved tensors by bytes instead. If the whole model is one compiled "
                        "region, its backward is one autograd node that needs every saved tensor "
                        "at once, so offloading cannot lower the peak: compile each block instead "
                        "(block.compile(), as torchtitan does)", len(self.layers))
            self.position.group_bytes = _FIRST_GROUP_BYTES
            self._group_bytes_fixed = False
            # Compiled blocks are followed (LayerTracker.follow_compiled): layers unseen means
            # they run inside a larger compiled region.
            self._one_compiled_graph()
            self._size_byte_groups()
        elif self._groups_by_bytes() and not self._group_bytes_fixed and not self._closed:
            self._size_byte_groups()
        elif self.adaptive is not None and not self._closed:
            self._replan()
        return self._stats.end_step()

    def _one_compiled_graph(self) -> None:
        """The model runs as one compiled graph: budget mode plans with its one backward node."""
        if isinstance(self.adaptive, BudgetPolicy) and not self.adaptive.one_backward:
            self.adaptive.one_backward = True
            log.info("ssdoffload: the model is compiled as one graph; its backward reads every saved "
                     "tensor at once, and the budget plan counts them all at once")

    def _layers_silent(self) -> bool:
        """Layers are tracked, this step offloaded tensors, yet no layer was ever entered."""
        if not self.enabled or self.position.group_bytes is not None or not self.layers or self.position.layer_seen:
            return False
        return self._stats.snapshot("step").tensors_offloaded > 0

    def _groups_by_bytes(self) -> bool:
        return self.enabled and self.position.group_bytes is not None

    def _size_byte_groups(self) -> None:
        """After the first step: size the byte groups from what it offloaded, so a step has
        about ``_GROUPS_PER_STEP`` groups whatever the model's size (backward then holds about
        ``depth + 1`` of them). Fixed from then on: the adaptive plan needs stable groups, so
        the first step's profile (made with the provisional size) is dropped."""
        total = self._stats.snapshot("step").offloadable_bytes
        if total <= 0:
            return  # nothing offloaded yet (a warm-up without grad?): size it next step
        size = max(_MIN_GROUP_BYTES, total // _GROUPS_PER_STEP)
        self.position.group_bytes = size
        self._group_bytes_fixed = True
        if self.profiler is not None:
            self.profiler.discard()
        log.info("ssdoffload: no layers to group by; grouping saved tensors by %.1f MiB in pack "
                 "order (%.0f MiB offloaded in the first step)", size / 2**20, total / 2**20)

    def plan(self) -> Optional[Plan]:
        """The adaptive plan in force (``None``: policy "all", or still profiling). Its
        ``describe()`` says which layers go to the SSD, the RAM tier or stay on the device,
        with what bandwidth it was planned and why it was adopted; ``as_dict()`` for JSON."""
        return self.adaptive.plan if self.adaptive is not None else None

    def set_plan(self, placement: Optional[Sequence[str]], prefetch_depth: Optional[int] = None) -> Optional[Plan]:
        """Fix where each forward group's tensors go from the next step on, instead of letting
        the adaptive policy choose: ``placement[i]`` is ``"ssd"``, ``"ram"`` (needs
        ``host_cache_bytes``) or ``"device"`` for group ``i`` (a layer is two groups: itself
        and what runs after it; ``plan().placement`` of a previous run has the right length).
        ``prefetch_depth`` is the read-ahead in groups (default: the plan in force's, else
        the config's). ``None`` returns the choice to the measurements. Needs
        ``policy="adaptive"``; call it between steps. Returns the pinned plan."""
        if not self.enabled or self._closed:
            raise RuntimeError("Offloader.set_plan: the offloader is disabled or closed")
        if self.adaptive is None:
            raise ValueError(f"Offloader.set_plan needs OffloadConfig.policy='adaptive' (this one has "
                             f"policy={self.config.policy!r}, which offloads everything)")
        if self.position.scope is not None:
            raise RuntimeError("Offloader.set_plan was called inside a step; call it between steps")
        if placement is None:
            self.adaptive.unpin()
            return None
        if isinstance(placement, str):
            raise TypeError("Offloader.set_plan takes one place per group (a list such as "
                            "['ssd', 'ssd', 'device']), not a string")
        placement = tuple(placement)
        if any(SAVED_PLACE.get(p) == "ram" for p in placement) and self.tier is None:
            raise ValueError("Offloader.set_plan: 'ram' needs a host tier; set OffloadConfig.host_cache_bytes")
        current = self.adaptive.plan
        if current is not None and len(current.placement) != len(placement):
            raise ValueError(f"Offloader.set_plan: the forward has {len(current.placement)} groups, the "
                             f"placement gives {len(placement)}")
        if prefetch_depth is None:
            prefetch_depth = current.prefetch_depth if current is not None else self.config.prefetch_depth
        _check_depth(prefetch_depth, self.config.prefetch_depth)
        plan = self.adaptive.pin(placement, prefetch_depth)
        self._apply(plan)
        self._stats.add(replans=1)
        self._stats.set(plan_version=plan.version)
        return plan

    def set_bandwidth_caps(self, write: Optional[float] = None, read: Optional[float] = None) -> None:
        """Change ``max_write_bandwidth`` / ``max_read_bandwidth`` while training (``None`` lifts
        a cap), e.g. while a checkpoint is written to the same drive. Transfers that start
        from now on honour the new caps; the adaptive policy re-plans with them at the end of
        the current step. Bad values raise ``ValueError`` like the config's."""
        self.config = dataclasses.replace(self.config, max_write_bandwidth=write, max_read_bandwidth=read)
        if not self.enabled or self._closed:
            return
        self.places.drive.set_caps(write, read)
        if self.adaptive is not None:
            self.adaptive.write_cap, self.adaptive.read_cap = write, read
        log.info("ssdoffload: bandwidth caps now write %s, read %s",
                 f"{write / 1e6:.0f} MB/s" if write else "none", f"{read / 1e6:.0f} MB/s" if read else "none")

    def plan_history(self) -> list:
        """The last plans adopted, oldest first (at most 32)."""
        return list(self.adaptive.history) if self.adaptive is not None else []

    def wait(self) -> bool:
        """Block until every write started so far has finished, at most
        ``OffloadConfig.io_timeout`` (a frozen drive cannot hold the caller); whether they
        all did (a write still in flight keeps its tensor in memory: nothing is lost)."""
        if not self.enabled or self._closed:
            return True
        self._release_dead()
        if self.transfers.wait_writes(self.config.io_timeout):
            return True
        self.transfers.timed_out("wait() waited for the writes in flight")
        return False

    def stats(self) -> OffloadStats:
        """Cumulative statistics over all steps."""
        self._release_dead()
        return self._stats.snapshot("total")

    def last_step_stats(self) -> OffloadStats:
        """Statistics of the last finished step."""
        self._release_dead()
        return self._stats.snapshot("last_step")

    def current_step_stats(self) -> OffloadStats:
        """Statistics of the step in progress."""
        self._release_dead()
        return self._stats.snapshot("step")

    @property
    def spill_files(self) -> list:
        """Paths of the spill files this process has open."""
        return self.places.drive.paths() if self.places is not None else []

    def close(self, timeout: Optional[float] = 60.0) -> bool:
        """Finish in-flight I/O, stop the threads, free pinned memory, remove the spill files.

        Waits at most ``timeout`` seconds (``None``: for ever). A drive that does not answer
        (a frozen filesystem, a hung device) cannot hold the caller: what is left is named in a
        warning and finished on a background thread once the drive answers. Returns True when
        everything was closed in time. ``timeout=0`` starts the close and returns at once.
        """
        if self._closed:
            return True
        self._closed = True
        shutdown.forget(self)
        if self.engine is not None:
            self.transfers.closed = True  # a forward still running keeps what it saves from now
        if os.getpid() != self._owner_pid:
            # A forked child (a DataLoader worker): the I/O threads and the spill files belong to
            # the parent. Joining threads that do not exist here would hang; leave it all alone.
            return True
        if self.tracker is not None:
            self.tracker.remove()
        if self.recompute_watch is not None:
            self.recompute_watch.remove()
        if self.recomputed is not None:
            self.recomputed.clear()  # the model is the user's again, as it was
        for handle in self._attached:
            handle.remove()
        self._attached = []
        # Unread entries fail now, on this thread, whatever the drive does (a backward after
        # close() raises instead of waiting on a read); the rest ends on a finisher thread.
        self._teardown.start()
        if timeout is not None and timeout <= 0:
            return self._teardown.join(0)  # asked not to wait: the finisher completes on its own
        if self._teardown.join(timeout):
            return True
        self._teardown.warn_unfinished(timeout)
        return False

    def __enter__(self) -> "Offloader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # No __del__: an Offloader dropped without close() is ended by ``shutdown`` (its teardown
    # queued by a weak reference, started at the next safe point or at exit), never from
    # inside the garbage collector.

    # -- internals -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise OffloadError("this Offloader is closed; create a new one")
        if os.getpid() != self._owner_pid:
            raise OffloadError(
                "this Offloader belongs to process %d and cannot be used in forked process %d; "
                "create one in the child if it trains" % (self._owner_pid, os.getpid()))

    def abort(self) -> None:
        """Discard all spill data and remove the spill files (they are made again on the next
        scope). ``step()`` calls this when an exception escapes it; schedules that scope
        micro-batches themselves call it when a step fails. Later use of a discarded tensor
        raises ``OffloadError``."""
        if not self.enabled or self._closed:
            return
        self._release_dead()
        why = "it was discarded when a step failed"
        in_flight = self._teardown.in_flight()
        # A step that failed because the drive stopped answering does not wait for it again.
        grace = 0.0 if self._stats.snapshot("step").io_timeouts else self.config.io_timeout
        if all(wait_for(f, grace) for f in in_flight):
            self._teardown.discard_unread(why)
            self.places.drive.discard()
        else:
            # The drive does not answer (a step failed on a read that timed out): requests are
            # still in flight on its files, so they are not closed under the engine. What is
            # unread fails now; the files go once those requests end; the next scope makes new.
            self._teardown.discard_unread(why, wait=False)
            self.places.drive.retire(in_flight)
            log.warning("ssdoffload: step aborted while %d request(s) wait on the drive; its spill "
                        "files are removed once they end", sum(not f.done() for f in in_flight))
        if self.profiler is not None:
            self.profiler.discard()  # a failed step's timings say nothing about the plan
        log.info("ssdoffload: step aborted by an exception; spill files removed")

    def _release_dead(self) -> None:
        """Release the entries of handles autograd dropped since the last drain (see
        ``releases.py``: nothing is released from inside the garbage collector), and start
        ending any Offloader dropped without ``close()`` (``shutdown.py``)."""
        self._teardown.release_dead()
        if shutdown.has_dropped():
            shutdown.close_dropped()

    def _on_cuda(self) -> bool:
        """Whether the model computes on a GPU (the profiler then times with CUDA events)."""
        for m in self._modules:  # a flat list: no tree walk every step
            for p in m._parameters.values():
                if p is not None:
                    return p.is_cuda
        return False

    def _replan(self) -> None:
        """Turn the finished step's measurements into an observation for the adaptive policy."""
        assert self.adaptive is not None and self.profiler is not None
        snap = self._stats.snapshot("step")
        got = self.profiler.collect(snap.stall_seconds, self.position.by_bytes)
        if got is None:
            return
        groups, compute = got
        write_bps = snap.bytes_written / snap.write_seconds \
            if snap.write_seconds > 0 and snap.bytes_written >= _MIN_MEASURED_BYTES else None
        read_bps = snap.bytes_read / snap.read_seconds \
            if snap.read_seconds > 0 and snap.bytes_read >= _MIN_MEASURED_BYTES else None
        plan = self.adaptive.observe(StepObservation(groups=groups, write_bps=write_bps, read_bps=read_bps,
                                                     stall_seconds=snap.stall_seconds,
                                                     compute_seconds=compute,
                                                     in_flight=self.profiler.take_in_flight()))
        if plan is not None:
            self._apply(plan)
            self._stats.add(replans=1)
            self._stats.set(plan_version=plan.version)

    def _apply(self, plan: Plan) -> None:
        """Make the model match ``plan``: its recomputed layers are checkpointed, the others not."""
        if self.recomputed is None:
            return
        layers = len(self.recomputed.layers)
        self.recomputed.set(i for i in range(layers)
                            if recomputes(plan.place(layer_group(i))) and not self.position.by_bytes)

    def _device(self) -> torch.device:
        if self.model is not None:
            for p in self.model.parameters():
                return p.device
        return torch.device("cpu")


def _check_depth(depth: object, configured: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= 64:
        raise ValueError(f"prefetch_depth={depth!r} must be an int from 0 to 64")
    if (depth == 0) != (configured == 0):
        raise ValueError(f"prefetch_depth={depth} with OffloadConfig.prefetch_depth={configured}: "
                         "prefetching is switched on or off in the config, not per plan")
