"""Random small autograd programs for differential fuzzing of ssdoffload (``test_fuzz.py``).

A ``Program`` is plain data: leaves (parameters and inputs), a list of ``Op``s over a pool of
tensors (pool index = creation order: leaves first, then every op's outputs), the loss terms
and the offloader settings. ``run_program`` interprets it with plain autograd
(``spill_dir=None``) or under an ``Offloader``; ``describe`` prints it as Python-like lines, and
``repr(program)`` rebuilds it exactly, so a failure shrunk by hypothesis can be pasted into a
named regression test::

    from fuzz_programs import *
    def test_regression_...(tmp_path):
        check_program(Program(...), str(tmp_path))

The generator (``programs()``) builds each program while running it forward (a "simulation",
plain autograd with recording saved-tensor hooks) so that every op it emits is valid torch and
so that the program stays inside the offloader's contract:

* In-place ops through the tensor itself, its views or a ``.detach()`` alias (they share
  autograd's version counter) are always allowed: plain autograd raises in backward if a
  saved tensor was modified, and the offloader must raise too.
* Mutating bytes through an alias autograd cannot see (``.data``, an ``unsafe_split`` /
  ``unsafe_chunk`` piece, a ``set_`` alias: a different version counter) is allowed before any
  overlapping save, and after a save only when the bytes written are disjoint from every
  saved tensor's bytes (the ``nn.GRU`` pattern). Otherwise plain autograd silently reads
  whatever memory holds at backward time, which no offloader can reproduce. The simulation
  records every saved tensor (its storage, the exact bytes it covers, its version-counter
  family, found by bumping versions with ``torch.autograd.graph.increment_version``) and
  offers only legal write targets.
* ``storage_roundtrip_`` frees a storage (``untyped_storage().resize_(0)``, as FSDP does) and
  restores the identical bytes later: legal whatever was saved.
* An in-place op must not save an alias of the bytes it overwrites through another version
  counter (``t.mul_(t.data)``); checked after the op (``Sim._saved_then_overwritten``).

Every generated program is replayed from scratch by ``validate`` (which rechecks all of the
above); ``reduce_program`` deletes ops / leaves / loss terms of a failing program while it
stays valid and fails the same way (hypothesis' shrinker cannot delete an op without
renumbering every later tensor).

Op kinds (``KINDS``): unary sigmoid/tanh/exp; binary mul/add (broadcasting, ``x * x``); mm /
matmul / bmm with inline transposes (temporary views); view, reshape, t, transpose, permute,
narrow, select, stepped slicing, expand, unsqueeze, as_strided; split/chunk and their unsafe_
forms; ``.data``, ``.detach()``, ``torch.empty(0).set_(x)`` aliases; ``z.set_(y)`` on a non-leaf
under no_grad; ``resize_``; in-place add_/mul_/sigmoid_/copy_ (optionally under no_grad, also on
leaf parameters: the optimizer pattern); the nn.GRU ``gates`` pattern; custom Functions
(``SaveAllGate`` saves inputs and output, ``DirtyExp`` is in place with ``mark_dirty``); dtype
casts; ``torch.sparse.mm`` (a sparse saved tensor); ``off.wait()``; ``del``; storage round
trips. Settings drawn per program: policy, prefetch_depth, min_offload_bytes (leaves sized
just below / at / above it), max_write_bandwidth, io_threads, host tier, verify, model or
None (parameters in a ModuleList of layers whose forwards run segments of the program),
1 or 2 steps, dropping every reference before backward, ``off.wait()`` after every op.
"""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from hypothesis import assume, strategies as st
from torch import nn
from torch.autograd.graph import increment_version, saved_tensors_hooks

import ssdoffload

DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_TORCH_DTYPE_TEXT = {"f32": "torch.float32", "f64": "torch.float64", "bf16": "torch.bfloat16"}

#: Largest storage (bytes) a program may create.
MAX_STORAGE_BYTES = 64 << 10
#: Most ops a generated program has; the fewest (but when shrinking a failure).
MAX_OPS = 14
MIN_OPS = 4
#: Dimensions leaf shapes are drawn from (a per-program palette of 1-3 of them, so matmul
#: operands line up often).
DIMS = (8, 4, 16, 3, 32, 1, 5, 64)
#: Thresholds drawn for ``min_offload_bytes``; leaves are sized just below / at / above them.
#: Mostly small: a program whose tensors all stay under the threshold tests nothing of the
#: offloader (with 4096 and 16384 drawn two times in three, 71% of CI's programs wrote nothing).
THRESHOLDS = (0, 1, 256, 512, 1024, 4096)
#: Message plain autograd (and ssdoffload) raise for a saved tensor modified in place.
INPLACE_MESSAGE = "modified by an inplace operation"


# -- the program ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Leaf:
    shape: Tuple[int, ...]
    dtype: str                      # key of DTYPES
    requires_grad: bool
    param: bool                     # nn.Parameter (else a plain tensor input)
    seed: int


@dataclass(frozen=True)
class Op:
    kind: str                       # key of KINDS
    ins: Tuple[int, ...]            # pool indices
    args: Tuple[Any, ...] = ()
    nout: int = 0                   # outputs appended to the pool
    layer: Optional[int] = None     # run inside model.layers[layer] (when there is a model)


@dataclass(frozen=True)
class Settings:
    policy: str = "all"
    prefetch_depth: int = 0
    min_offload_bytes: int = 0
    max_write_bandwidth: Optional[float] = None
    io_threads: int = 4
    host_cache_bytes: int = 0
    verify: bool = False
    use_model: bool = False         # Offloader(model) (params in a ModuleList of blocks) or None
    n_layers: int = 2
    steps: int = 1                  # training steps with the same offloader
    drop_refs: bool = False         # drop every Python reference to intermediates before backward
    sync_writes: bool = True        # off.wait() after every op (deterministic write timing)
    memory_budget: Optional[int] = None  # with policy "budget": back-pressure, diversions, recompute


@dataclass(frozen=True)
class Program:
    leaves: Tuple[Leaf, ...]
    ops: Tuple[Op, ...]
    loss: Tuple[int, ...]
    loss_dtype: str = "f32"
    settings: Settings = field(default_factory=Settings)


# -- helpers the programs call (also in describe() output) ----------------------------------
class SaveAllGate(torch.autograd.Function):
    """out = a * sigmoid(b); saves both inputs and the output."""

    @staticmethod
    def forward(ctx, a, b):
        out = a * torch.sigmoid(b)
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b, out = ctx.saved_tensors
        s = torch.sigmoid(b)
        return g * s, g * out * (1 - s)


class DirtyExp(torch.autograd.Function):
    """exp in place (mark_dirty); saves the (modified) input, which is the output."""

    @staticmethod
    def forward(ctx, a):
        a.exp_()
        ctx.mark_dirty(a)
        ctx.save_for_backward(a)
        return a

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return g * r


def resize_and_fill_(t: torch.Tensor, numel: int) -> None:
    """``t.resize_(numel)``; bytes the storage grew by are uninitialised: fill them."""
    old_elems = t.untyped_storage().nbytes() // t.element_size()
    t.resize_(numel)
    lo = max(0, old_elems - t.storage_offset())
    if lo < numel:
        t[lo:].fill_(0.25)


def storage_roundtrip_(t: torch.Tensor, off=None, wait: bool = False) -> None:
    """Free ``t``'s storage (resize to 0 bytes, as FSDP does), optionally let the offloader's
    writes finish meanwhile, then restore the identical bytes (through a uint8 alias, which
    bumps no version counter)."""
    storage = t.untyped_storage()
    n = storage.nbytes()
    backup = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,), (1,)).clone()
    storage.resize_(0)
    if wait and off is not None:
        off.wait()
    storage.resize_(n)
    torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,), (1,)).copy_(backup)


# -- op kinds ---------------------------------------------------------------------------------
class Kind:
    name = "?"
    weight = 1
    #: Writes the bytes of its first input in place (legality is checked, see ``Sim.writable``).
    writes = False

    def legal(self, sim: "Sim", ins: Tuple[int, ...], args: Tuple[Any, ...]) -> bool:
        """Whether the op stays inside the contract now (``validate`` rechecks every op)."""
        return not self.writes or sim.writable(ins[0])

    def gen(self, draw, sim: "Sim") -> Optional[Tuple[Tuple[int, ...], Tuple[Any, ...]]]:
        raise NotImplementedError

    def apply(self, ts: List[torch.Tensor], args: Tuple[Any, ...], off) -> List[torch.Tensor]:
        raise NotImplementedError

    def text(self, ins: List[str], outs: List[str], args: Tuple[Any, ...]) -> str:
        raise NotImplementedError


KINDS: Dict[str, Kind] = {}


def _kind(name: str, weight: int = 1):
    def deco(cls):
        inst = cls()
        inst.name, inst.weight = name, weight
        KINDS[name] = inst
        return cls
    return deco


def _assign(outs: List[str], expr: str) -> str:
    return f"{', '.join(outs)} = {expr}" if outs else expr


def _pick(draw, cands: Sequence[Any]):
    return draw(st.sampled_from(list(cands))) if cands else None


def _dims_text(shape) -> str:
    return ", ".join(str(s) for s in shape)


@_kind("unary", 2)
class Unary(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        if a is None:
            return None
        return (a,), (draw(st.sampled_from(["sigmoid", "tanh", "exp"])),)

    def apply(self, ts, args, off):
        return [getattr(torch, args[0])(ts[0])]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.{args[0]}()")


@_kind("binary", 3)
class Binary(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        if a is None:
            return None
        shape = sim.pool[a].shape
        bs = [i for i in sim.dense() if _broadcasts_to(sim.pool[i].shape, shape)]
        b = _pick(draw, bs)
        return (a, b), (draw(st.sampled_from(["mul", "add"])),)

    def apply(self, ts, args, off):
        return [ts[0] * ts[1] if args[0] == "mul" else ts[0] + ts[1]]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]} {'*' if args[0] == 'mul' else '+'} {ins[1]}")


def _broadcasts_to(small, big) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(small), tuple(big))) == tuple(big)
    except RuntimeError:
        return False


def _mt(t: torch.Tensor, on: bool) -> torch.Tensor:
    return t.transpose(-2, -1) if on else t


def _matmul_ok(sa, sb) -> bool:
    if len(sa) == 0 or len(sb) == 0:
        return False
    if len(sa) == 1 and len(sb) == 1:
        return sa[0] == sb[0]
    if len(sa) == 1:
        return sa[0] == sb[-2]
    if len(sb) == 1:
        return sa[-1] == sb[0]
    if sa[-1] != sb[-2]:
        return False
    try:
        torch.broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    except RuntimeError:
        return False
    return True


def _tshape(shape, on: bool):
    shape = tuple(shape)
    return shape[:-2] + (shape[-1], shape[-2]) if on else shape


class _MatKind(Kind):
    ndims: Tuple[int, ...] = (2,)

    def ok(self, sa, sb) -> bool:
        raise NotImplementedError

    def gen(self, draw, sim):
        ts = [i for i in sim.dense() if sim.pool[i].dim() in self.ndims]
        cands = []
        for a in ts:
            for b in ts:
                if sim.pool[a].dtype != sim.pool[b].dtype:
                    continue
                for ta in (False, True):
                    for tb in (False, True):
                        if (ta and sim.pool[a].dim() < 2) or (tb and sim.pool[b].dim() < 2):
                            continue
                        if self.ok(_tshape(sim.pool[a].shape, ta), _tshape(sim.pool[b].shape, tb)):
                            cands.append(((a, b), (ta, tb)))
        return _pick(draw, cands)


@_kind("mm", 2)
class MM(_MatKind):
    def ok(self, sa, sb):
        return sa[1] == sb[0]

    def apply(self, ts, args, off):
        return [torch.mm(_mt(ts[0], args[0]), _mt(ts[1], args[1]))]

    def text(self, ins, outs, args):
        a = f"{ins[0]}.t()" if args[0] else ins[0]
        b = f"{ins[1]}.t()" if args[1] else ins[1]
        return _assign(outs, f"torch.mm({a}, {b})")


@_kind("matmul", 1)
class Matmul(_MatKind):
    ndims = (1, 2, 3)

    def ok(self, sa, sb):
        return _matmul_ok(sa, sb)

    def apply(self, ts, args, off):
        return [torch.matmul(_mt(ts[0], args[0]), _mt(ts[1], args[1]))]

    def text(self, ins, outs, args):
        a = f"{ins[0]}.mT" if args[0] else ins[0]
        b = f"{ins[1]}.mT" if args[1] else ins[1]
        return _assign(outs, f"torch.matmul({a}, {b})")


@_kind("bmm", 1)
class BMM(_MatKind):
    ndims = (3,)

    def ok(self, sa, sb):
        return sa[0] == sb[0] and sa[2] == sb[1]

    def apply(self, ts, args, off):
        return [torch.bmm(_mt(ts[0], args[0]), _mt(ts[1], args[1]))]

    def text(self, ins, outs, args):
        a = f"{ins[0]}.transpose(1, 2)" if args[0] else ins[0]
        b = f"{ins[1]}.transpose(1, 2)" if args[1] else ins[1]
        return _assign(outs, f"torch.bmm({a}, {b})")


def _reshape_targets(shape) -> List[Tuple[int, ...]]:
    n = 1
    for s in shape:
        n *= s
    out = [(-1,)]
    for d in (2, 4, 8, 3):
        if n % d == 0 and n // d > 0:
            out.append((d, n // d))
            out.append((n // d, d))
    if len(shape) >= 2:
        out.append((shape[0] * shape[1],) + tuple(shape[2:]))
    return list(dict.fromkeys(out))


@_kind("view", 1)
class View(Kind):
    method = "view"

    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        if a is None:
            return None
        return (a,), (draw(st.sampled_from(_reshape_targets(sim.pool[a].shape))),)

    def apply(self, ts, args, off):
        return [getattr(ts[0], self.method)(args[0])]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.{self.method}({_dims_text(args[0])})")


@_kind("reshape", 1)
class Reshape(View):
    method = "reshape"


@_kind("t", 1)
class T(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, [i for i in sim.dense() if sim.pool[i].dim() <= 2])
        return None if a is None else ((a,), ())

    def apply(self, ts, args, off):
        return [ts[0].t()]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.t()")


@_kind("transpose", 1)
class Transpose(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, [i for i in sim.dense() if sim.pool[i].dim() >= 2])
        if a is None:
            return None
        nd = sim.pool[a].dim()
        d0 = draw(st.integers(0, nd - 1))
        d1 = draw(st.integers(0, nd - 1))
        return (a,), (d0, d1)

    def apply(self, ts, args, off):
        return [ts[0].transpose(*args)]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.transpose({args[0]}, {args[1]})")


@_kind("permute", 1)
class Permute(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, [i for i in sim.dense() if sim.pool[i].dim() >= 2])
        if a is None:
            return None
        return (a,), (tuple(draw(st.permutations(range(sim.pool[a].dim())))),)

    def apply(self, ts, args, off):
        return [ts[0].permute(*args[0])]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.permute({_dims_text(args[0])})")


def _dim_with_size(draw, sim, minimum=1):
    cands = [(i, d) for i in sim.dense() for d in range(sim.pool[i].dim()) if sim.pool[i].shape[d] >= minimum]
    return _pick(draw, cands)


@_kind("narrow", 1)
class Narrow(Kind):
    def gen(self, draw, sim):
        got = _dim_with_size(draw, sim, 2)
        if got is None:
            return None
        a, d = got
        n = sim.pool[a].shape[d]
        start = draw(st.integers(0, n - 1))
        length = draw(st.integers(1, n - start))
        return (a,), (d, start, length)

    def apply(self, ts, args, off):
        return [ts[0].narrow(*args)]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.narrow({args[0]}, {args[1]}, {args[2]})")


@_kind("select", 1)
class Select(Kind):
    def gen(self, draw, sim):
        got = _dim_with_size(draw, sim, 1)
        if got is None:
            return None
        a, d = got
        return (a,), (d, draw(st.integers(0, sim.pool[a].shape[d] - 1)))

    def apply(self, ts, args, off):
        return [ts[0].select(*args)]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.select({args[0]}, {args[1]})")


@_kind("slice", 1)
class Slice(Kind):
    def gen(self, draw, sim):
        got = _dim_with_size(draw, sim, 2)
        if got is None:
            return None
        a, d = got
        n = sim.pool[a].shape[d]
        start = draw(st.integers(0, n - 1))
        stop = draw(st.sampled_from([None, n - 1]))
        step = draw(st.sampled_from([2, 1, 3]))
        return (a,), (d, start, stop, step)

    def apply(self, ts, args, off):
        d, start, stop, step = args
        return [ts[0][(slice(None),) * d + (slice(start, stop, step),)]]

    def text(self, ins, outs, args):
        d, start, stop, step = args
        s = f"{start}:{'' if stop is None else stop}:{step}"
        return _assign(outs, f"{ins[0]}[{':, ' * d}{s}]")


@_kind("expand", 1)
class Expand(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        if a is None:
            return None
        shape = tuple(sim.pool[a].shape)
        opts = [(2,) + shape, (3,) + shape]
        for d, s in enumerate(shape):
            if s == 1:
                opts.append(shape[:d] + (4,) + shape[d + 1:])
        return (a,), (draw(st.sampled_from(opts)),)

    def apply(self, ts, args, off):
        return [ts[0].expand(*args[0])]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.expand({_dims_text(args[0])})")


@_kind("unsqueeze", 1)
class Unsqueeze(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, [i for i in sim.dense() if sim.pool[i].dim() < 4])
        if a is None:
            return None
        return (a,), (draw(st.integers(0, sim.pool[a].dim())),)

    def apply(self, ts, args, off):
        return [ts[0].unsqueeze(args[0])]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.unsqueeze({args[0]})")


@_kind("as_strided", 1)
class AsStrided(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        if a is None:
            return None
        t = sim.pool[a]
        total = t.untyped_storage().nbytes() // t.element_size()
        if total < 1:
            return None
        rows = draw(st.integers(1, 4))
        cols = draw(st.integers(1, 16))
        s1 = draw(st.sampled_from([1, 2]))
        s0 = draw(st.sampled_from([cols * s1, 1, cols * s1 + 1]))
        while rows > 1 and (rows - 1) * s0 + (cols - 1) * s1 + 1 > total:
            rows -= 1
        while cols > 1 and (rows - 1) * s0 + (cols - 1) * s1 + 1 > total:
            cols -= 1
        extent = (rows - 1) * s0 + (cols - 1) * s1 + 1
        offset = draw(st.integers(0, max(0, total - extent)))
        return (a,), ((rows, cols), (s0, s1), offset)

    def apply(self, ts, args, off):
        return [ts[0].as_strided(*args)]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.as_strided({args[0]}, {args[1]}, {args[2]})")


@_kind("split", 3)
class Split(Kind):
    def gen(self, draw, sim):
        got = _dim_with_size(draw, sim, 2)
        if got is None:
            return None
        a, d = got
        n = sim.pool[a].shape[d]
        size = draw(st.integers(max(1, n // 4), n - 1))
        return (a,), (size, d, draw(st.booleans()))

    def apply(self, ts, args, off):
        size, d, unsafe = args
        return list(ts[0].unsafe_split(size, d) if unsafe else ts[0].split(size, d))

    def text(self, ins, outs, args):
        size, d, unsafe = args
        return _assign(outs, f"{ins[0]}.{'unsafe_split' if unsafe else 'split'}({size}, dim={d})")


@_kind("chunk", 3)
class Chunk(Kind):
    def gen(self, draw, sim):
        got = _dim_with_size(draw, sim, 2)
        if got is None:
            return None
        a, d = got
        return (a,), (draw(st.sampled_from([3, 2])), d, draw(st.booleans()))

    def apply(self, ts, args, off):
        chunks, d, unsafe = args
        return list(ts[0].unsafe_chunk(chunks, d) if unsafe else ts[0].chunk(chunks, d))

    def text(self, ins, outs, args):
        chunks, d, unsafe = args
        return _assign(outs, f"{ins[0]}.{'unsafe_chunk' if unsafe else 'chunk'}({chunks}, dim={d})")


@_kind("data", 1)
class Data(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        return None if a is None else ((a,), ())

    def apply(self, ts, args, off):
        return [ts[0].data]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.data")


@_kind("detach", 1)
class Detach(Data):
    def apply(self, ts, args, off):
        return [ts[0].detach()]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.detach()")


@_kind("set_alias", 1)
class SetAlias(Kind):
    """``torch.empty(0).set_(x)`` (under no_grad): an alias of x's view with its own version
    counter."""

    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        return None if a is None else ((a,), (_DTYPE_NAMES[sim.pool[a].dtype],))

    def apply(self, ts, args, off):
        with torch.no_grad():  # set_ has no derivative
            return [torch.empty(0, dtype=ts[0].dtype).set_(ts[0])]

    def text(self, ins, outs, args):
        expr = _assign(outs, f"torch.empty(0, dtype={_TORCH_DTYPE_TEXT[args[0]]}).set_({ins[0]})")
        return f"with torch.no_grad(): {expr}"


@_kind("set_retarget", 1)
class SetRetarget(Kind):
    """``with torch.no_grad(): z.set_(y)``: z (a non-leaf that requires grad) now aliases y's
    storage, keeping its own version counter (which set_ bumps)."""

    def gen(self, draw, sim):
        leafs = sim.leaf_storage_users()
        zs = [i for i in sim.dense() if sim.pool[i].grad_fn is not None and i not in leafs]
        z = _pick(draw, zs)
        if z is None:
            return None
        ys = [i for i in sim.dense() if i != z and sim.pool[i].shape == sim.pool[z].shape
              and sim.pool[i].dtype == sim.pool[z].dtype]
        y = _pick(draw, ys)
        return None if y is None else ((z, y), ())

    def apply(self, ts, args, off):
        with torch.no_grad():
            ts[0].set_(ts[1])
        return []

    def text(self, ins, outs, args):
        return f"with torch.no_grad(): {ins[0]}.set_({ins[1]})"


@_kind("resize_", 1)
class Resize(Kind):
    def gen(self, draw, sim):
        leafs = sim.leaf_storage_users()
        xs = [i for i in sim.dense() if not sim.pool[i].requires_grad and i not in leafs]
        x = _pick(draw, xs)
        if x is None:
            return None
        t = sim.pool[x]
        n = t.numel()
        cap = MAX_STORAGE_BYTES // t.element_size() - t.storage_offset()
        opts = [v for v in (2 * n, n + 1, max(1, n // 2), n) if 1 <= v <= cap]
        return None if not opts else ((x,), (draw(st.sampled_from(opts)),))

    def apply(self, ts, args, off):
        resize_and_fill_(ts[0], args[0])
        return []

    def text(self, ins, outs, args):
        return f"resize_and_fill_({ins[0]}, {args[0]})"


@_kind("inplace", 8)
class Inplace(Kind):
    """add_/mul_ (scalar or tensor operand), sigmoid_, copy_; optionally under no_grad (the
    optimizer pattern, also on leaf parameters)."""

    writes = True

    def gen(self, draw, sim):
        target = _pick(draw, [i for i in sim.dense() if sim.writable(i)])
        if target is None:
            return None
        fn = draw(st.sampled_from(["sigmoid_", "add_", "mul_", "copy_"]))
        nograd = draw(st.booleans())
        shape = sim.pool[target].shape
        if fn == "sigmoid_":
            return (target,), (fn, None, nograd)
        use_tensor = fn == "copy_" or draw(st.booleans())
        if not use_tensor:
            return (target,), (fn, draw(st.sampled_from([0.5, 2.0, -1.0])), nograd)
        src = _pick(draw, [i for i in sim.dense() if _broadcasts_to(sim.pool[i].shape, shape)])
        return (target, src), (fn, None, nograd)

    def apply(self, ts, args, off):
        fn, scalar, nograd = args
        ctx = torch.no_grad() if nograd else contextlib.nullcontext()
        with ctx:
            if fn == "sigmoid_":
                ts[0].sigmoid_()
            elif len(ts) == 2:
                getattr(ts[0], fn)(ts[1])
            else:
                getattr(ts[0], fn)(scalar)
        return []

    def text(self, ins, outs, args):
        fn, scalar, nograd = args
        operand = ins[1] if len(ins) == 2 else ("" if scalar is None else repr(scalar))
        s = f"{ins[0]}.{fn}({operand})"
        return f"with torch.no_grad(): {s}" if nograd else s


@_kind("gates", 2)
class Gates(Kind):
    """The nn.GRU cell pattern: ``r, z, n = x.unsafe_chunk(3, dim)`` then an in-place
    activation on each piece (each saved by autograd; the pieces share a storage but not a
    version counter), optionally with ``off.wait()`` between the pieces so that a piece's
    write finishes before the next piece is modified. Legal only when no byte of x is saved
    yet and no two elements of x share bytes (each piece writes through its own version
    counter, so the pieces must be disjoint)."""

    def gen(self, draw, sim):
        got = _pick(draw, [(i, d) for i in sim.dense() for d in range(sim.pool[i].dim())
                           if sim.pool[i].shape[d] >= 3 and not sim.overlaps_saved(i)
                           and not _self_overlapping(sim.pool[i])])
        if got is None:
            return None
        return (got[0],), (got[1], not draw(st.booleans()))  # shrinks to wait=True: no race

    def legal(self, sim, ins, args):
        return not sim.overlaps_saved(ins[0]) and not _self_overlapping(sim.pool[ins[0]])

    def apply(self, ts, args, off):
        dim, wait = args
        pieces = list(ts[0].unsafe_chunk(3, dim))
        for k, (piece, fn) in enumerate(zip(pieces, ("sigmoid_", "sigmoid_", "tanh_"))):
            if k and wait and off is not None:
                off.wait()
            getattr(piece, fn)()
        return pieces

    def text(self, ins, outs, args):
        dim, wait = args
        sep = "; off.wait(); " if wait else "; "
        acts = sep.join(f"{o}.{fn}()" for o, fn in zip(outs, ("sigmoid_", "sigmoid_", "tanh_")))
        return f"{_assign(outs, f'{ins[0]}.unsafe_chunk(3, dim={dim})')}; {acts}"


@_kind("fn_gate", 1)
class FnGate(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        if a is None:
            return None
        ta = sim.pool[a]
        bs = [i for i in sim.dense() if sim.pool[i].shape == ta.shape and sim.pool[i].dtype == ta.dtype]
        return (a, _pick(draw, bs)), ()

    def apply(self, ts, args, off):
        return [SaveAllGate.apply(ts[0], ts[1])]

    def text(self, ins, outs, args):
        return _assign(outs, f"SaveAllGate.apply({ins[0]}, {ins[1]})")


@_kind("fn_dirty", 1)
class FnDirty(Kind):
    writes = True

    def gen(self, draw, sim):
        a = _pick(draw, [i for i in sim.dense() if sim.writable(i)])
        return None if a is None else ((a,), ())

    def apply(self, ts, args, off):
        return [DirtyExp.apply(ts[0])]

    def text(self, ins, outs, args):
        return _assign(outs, f"DirtyExp.apply({ins[0]})  # in place, mark_dirty")


@_kind("cast", 1)
class Cast(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, sim.dense())
        if a is None:
            return None
        return (a,), (draw(st.sampled_from(["f64", "bf16", "f32"])),)

    def apply(self, ts, args, off):
        return [ts[0].to(DTYPES[args[0]])]

    def text(self, ins, outs, args):
        return _assign(outs, f"{ins[0]}.to({_TORCH_DTYPE_TEXT[args[0]]})")


@_kind("sparse_mm", 1)
class SparseMM(Kind):
    def gen(self, draw, sim):
        ts = [i for i in sim.dense() if sim.pool[i].dim() == 2 and sim.pool[i].dtype != torch.bfloat16]
        cands = [(a, b) for a in ts for b in ts
                 if sim.pool[a].shape[1] == sim.pool[b].shape[0] and sim.pool[a].dtype == sim.pool[b].dtype]
        got = _pick(draw, cands)
        return None if got is None else (got, ())

    def apply(self, ts, args, off):
        return [torch.sparse.mm(ts[0].to_sparse(), ts[1])]

    def text(self, ins, outs, args):
        return _assign(outs, f"torch.sparse.mm({ins[0]}.to_sparse(), {ins[1]})")


@_kind("wait", 2)
class Wait(Kind):
    def gen(self, draw, sim):
        return (), ()

    def apply(self, ts, args, off):
        if off is not None:
            off.wait()
        return []

    def text(self, ins, outs, args):
        return "off.wait()"


@_kind("del", 1)
class Del(Kind):
    """Drop the Python reference (the interpreter's pool slot) to a non-leaf tensor."""

    def gen(self, draw, sim):
        a = _pick(draw, [i for i in sim.live() if i >= len(sim.leaves)])
        return None if a is None else ((a,), ())

    def apply(self, ts, args, off):  # handled by the interpreters
        return []

    def text(self, ins, outs, args):
        return f"del {ins[0]}"


@_kind("storage_roundtrip", 1)
class StorageRoundtrip(Kind):
    def gen(self, draw, sim):
        a = _pick(draw, [i for i in sim.dense() if sim.pool[i].untyped_storage().nbytes() > 0])
        return None if a is None else ((a,), (draw(st.booleans()),))

    def apply(self, ts, args, off):
        storage_roundtrip_(ts[0], off, wait=args[0])
        return []

    def text(self, ins, outs, args):
        return f"storage_roundtrip_({ins[0]}, off, wait={args[0]})"


# -- simulation (generation time) -------------------------------------------------------------
def _byte_mask(t: torch.Tensor) -> torch.Tensor:
    """Which bytes of its storage ``t`` covers (exactly, gaps of strided views included)."""
    n = t.untyped_storage().nbytes()
    mask = torch.zeros(n, dtype=torch.bool)
    isz = t.element_size()
    if t.numel() == 0 or n < isz:
        return mask
    el = torch.arange(n // isz).as_strided(t.size(), t.stride(), t.storage_offset())
    idx = (el.reshape(-1, 1) * isz + torch.arange(isz)).reshape(-1)
    mask[idx] = True
    return mask


def _self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share bytes (expanded / overlapping as_strided): its
    pieces would then alias each other."""
    return int(_byte_mask(t).sum()) != t.numel() * t.element_size()


def _usable(t: torch.Tensor) -> bool:
    try:
        t.grad_fn
    except RuntimeError:
        return False
    return True


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    n = min(a.numel(), b.numel())
    return bool((a[:n] & b[:n]).any())


@dataclass
class _Saved:
    tensor: torch.Tensor
    storage: int            # StorageImpl address (_cdata)
    mask: torch.Tensor
    family: int = -1
    #: Keeps the storage alive, so its address is never reused while the record exists (a
    #: saved tensor may be ``set_`` elsewhere later): generation must not depend on addresses.
    keep: Any = None


class Sim:
    """Runs a program forward while it is generated; knows what each tensor aliases, which
    bytes autograd has saved, and which version counter ("family") each tensor uses."""

    def __init__(self, leaves: Sequence[Leaf]) -> None:
        self.leaves = list(leaves)
        self.pool: List[Optional[torch.Tensor]] = [make_leaf(l) for l in leaves]
        self._reps: List[torch.Tensor] = []
        self.family: List[int] = [self._family_of(t) for t in self.pool]
        self.saved: List[_Saved] = []
        self._pending: List[_Saved] = []
        self._leaf_storages = {t.untyped_storage()._cdata for t in self.pool}

    # queries
    def live(self) -> List[int]:
        """Live pool indices, most recent first (what hypothesis shrinks towards)."""
        return [i for i in range(len(self.pool) - 1, -1, -1) if self.pool[i] is not None]

    def dense(self) -> List[int]:
        """Live strided tensors that can still be used (a view from a multi-output view op
        whose base was modified in place raises on any use, even ``grad_fn``)."""
        return [i for i in self.live() if self.pool[i].layout == torch.strided and _usable(self.pool[i])]

    def offloadable_saves(self, threshold: int) -> int:
        """How many tensors autograd saved so far that the offloader would write (not a
        parameter, a storage of at least ``threshold`` bytes)."""
        def offloadable(t: torch.Tensor) -> bool:
            root = t._base if t._base is not None else t
            if isinstance(root, nn.Parameter) or (root.requires_grad and root.grad_fn is None):
                return False  # parameter-like: a leaf that requires grad, or a view of one
            if t.untyped_storage()._cdata in self._leaf_storages:
                return False  # shares a leaf's storage (unsafe_chunk of a parameter): kept
            return t.layout == torch.strided and t.untyped_storage().nbytes() >= max(threshold, 1)
        return sum(1 for rec in self.saved if offloadable(rec.tensor))

    def leaf_storage_users(self) -> set:
        return {i for i in self.dense() if self.pool[i].untyped_storage()._cdata in self._leaf_storages}

    def overlaps_saved(self, i: int) -> bool:
        """Whether any byte of pool tensor ``i`` is saved (through any version counter)."""
        t = self.pool[i]
        cdata = t.untyped_storage()._cdata
        mask = None
        for rec in self.saved:
            if rec.storage != cdata:
                continue
            if mask is None:
                mask = _byte_mask(t)
            if _overlap(rec.mask, mask):
                return True
        return False

    def writable(self, i: int) -> bool:
        """May pool tensor ``i`` be written in place now? Yes unless it overlaps the bytes of a
        saved tensor through a different version counter."""
        t = self.pool[i]
        cdata = t.untyped_storage()._cdata
        fam = self.family[i]
        mask = None
        for rec in self.saved:
            if rec.storage != cdata or rec.family == fam:
                continue
            if mask is None:
                mask = _byte_mask(t)
            if _overlap(rec.mask, mask):
                return False
        return True

    def _saved_then_overwritten(self, i: int, saves: List[_Saved]) -> bool:
        """An in-place op on pool tensor ``i`` that saved an alias of the bytes it writes with
        another version counter (``t.mul_(t.data)`` saves ``t.data``, then overwrites it):
        plain autograd would read the overwritten bytes, outside the contract."""
        t = self.pool[i]
        cdata, fam, mask = t.untyped_storage()._cdata, self.family[i], None
        for rec in saves:
            if rec.storage != cdata or rec.family == fam:
                continue
            if mask is None:
                mask = _byte_mask(t)
            if _overlap(rec.mask, mask):
                return True
        return False

    # mechanics
    def _family_of(self, t: torch.Tensor) -> int:
        before = [r._version for r in self._reps]
        try:
            increment_version(t)
        except Exception:
            self._reps.append(t)
            return len(self._reps) - 1
        for k, r in enumerate(self._reps):
            if r._version != before[k]:
                return k
        self._reps.append(t)
        return len(self._reps) - 1

    def _pack(self, t: torch.Tensor):
        if t.layout == torch.strided:
            self._pending.append(_Saved(t, t.untyped_storage()._cdata, _byte_mask(t),
                                        keep=t.untyped_storage()))
        return t

    def apply(self, kind: str, ins: Tuple[int, ...], args: Tuple[Any, ...]) -> Optional[int]:
        """Run one op; returns its number of outputs, or None if torch refused it (then the op
        is dropped; the simulation may keep side effects of a partly run op, which is harmless
        for legality since it only over-approximates)."""
        if kind == "del":
            self.pool[ins[0]] = None
            return 0
        ts = [self.pool[i] for i in ins]
        self._pending = []
        try:
            with saved_tensors_hooks(self._pack, lambda t: t):
                outs = KINDS[kind].apply(ts, args, None)
        except Exception:
            return None
        finally:
            pending, self._pending = self._pending, []
        for rec in pending:
            rec.family = self._family_of(rec.tensor)
        if KINDS[kind].writes and self._saved_then_overwritten(ins[0], pending):
            return None
        self.saved.extend(pending)
        for o in outs:
            if o.layout == torch.strided and o.untyped_storage().nbytes() > MAX_STORAGE_BYTES:
                return None  # too big: drop (its saves stay recorded: conservative)
        for o in outs:
            self.pool.append(o)
            self.family.append(self._family_of(o))
        return len(outs)


# -- generator -------------------------------------------------------------------------------
def _leaf_shape(draw, palette, dtype: str, threshold: int) -> Tuple[int, ...]:
    isz = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if threshold >= 2 and draw(st.integers(0, 3)) > 0:  # mostly around the threshold, or above
        factor = draw(st.sampled_from([1, 1, 2, 4]))
        numel = max(1, factor * threshold // isz + (draw(st.sampled_from([0, -1, 1])) if factor == 1 else 0))
        rows = draw(st.sampled_from([1, 2, 4, 8]))
        if numel % rows:
            rows = 1
        return (rows, numel // rows)
    ndim = draw(st.integers(1, 3))
    shape = [draw(st.sampled_from(palette)) for _ in range(ndim)]
    while len(shape) > 1 and _prod(shape) * isz > MAX_STORAGE_BYTES // 4:
        shape.pop()
    return tuple(shape)


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


@st.composite
def settings_strategy(draw, **pins) -> Settings:
    def get(name, strategy):
        return pins[name] if name in pins else draw(strategy)

    return Settings(
        policy=get("policy", st.sampled_from(["all", "adaptive", "budget"])),
        prefetch_depth=get("prefetch_depth", st.integers(0, 3)),
        min_offload_bytes=get("min_offload_bytes", st.sampled_from(THRESHOLDS)),
        max_write_bandwidth=get("max_write_bandwidth", st.sampled_from([None, 20e6, 2e6])),
        io_threads=get("io_threads", st.sampled_from([4, 1, 2])),
        host_cache_bytes=get("host_cache_bytes", st.sampled_from([0, 0, 0, 16384])),
        verify=get("verify", st.booleans()),
        use_model=get("use_model", st.booleans()),
        n_layers=get("n_layers", st.sampled_from([2, 3])),
        steps=get("steps", st.sampled_from([1, 1, 2])),
        drop_refs=get("drop_refs", st.booleans()),
        # Shrinks to True: a failure that also shows with every write finished between ops is
        # deterministic (no race), which keeps shrinking and replays reliable.
        sync_writes=get("sync_writes", st.booleans().map(lambda b: not b)),
        memory_budget=get("memory_budget", st.sampled_from([4096, 65536, 1 << 20])),
    )


@st.composite
def programs(draw, kinds: Optional[Sequence[str]] = None, max_ops: int = MAX_OPS,
             params: Optional[bool] = None, **pins) -> Program:
    """Random programs. ``kinds`` restricts the op kinds; ``params`` forces leaves to be (or not
    be) ``nn.Parameter``s; ``pins`` fix Settings fields."""
    settings = draw(settings_strategy(**pins))
    palette = draw(st.lists(st.sampled_from(DIMS), min_size=1, max_size=3, unique=True))
    leaves = []
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(["f32", "f32", "f64", "bf16"]))
        shape = _leaf_shape(draw, palette, dtype, settings.min_offload_bytes)
        requires_grad = not draw(st.booleans()) or i == 0
        # Parameters are never offloaded: one leaf in four, so most programs save tensors the
        # offloader writes.
        param = draw(st.integers(0, 3)) == 0 if params is None else params
        leaves.append(Leaf(shape, dtype, requires_grad, param, seed=1000 + i))
    sim = Sim(leaves)
    names = [k for k in (kinds or KINDS) if k in KINDS]
    weighted = [k for k in names for _ in range(KINDS[k].weight)]
    ops = []
    n_ops = draw(st.integers(min(MIN_OPS, max_ops), max_ops))
    for _ in range(3 * n_ops):  # ops torch refuses are dropped: try again
        if len(ops) == n_ops:
            break
        kind = draw(st.sampled_from(weighted))
        got = KINDS[kind].gen(draw, sim)
        if got is None:
            continue
        ins, args = got
        if not KINDS[kind].legal(sim, ins, args):
            continue
        layer = draw(st.sampled_from([None] + list(range(settings.n_layers)))) if settings.use_model else None
        nout = sim.apply(kind, ins, args)
        if nout is None:
            continue
        ops.append(Op(kind, tuple(ins), tuple(args), nout, layer))
    # A program that saves nothing the offloader would write tests only its bookkeeping: one
    # in 32 is let through (kept tensors, parameters, thresholds), the rest are drawn again.
    if not sim.offloadable_saves(settings.min_offload_bytes) and draw(st.integers(0, 31)) > 0:
        assume(False)
    grads = [i for i in sim.dense() if sim.pool[i].requires_grad]
    loss = []
    if grads:
        # The newest output first (``dense`` lists most recent first): the longest chain of
        # saved tensors is then backwarded, and what was written is read back.
        loss.append(grads[0])
        loss += [i for i in grads[1:] if draw(st.integers(0, 3)) > 0]
    program = Program(tuple(leaves), tuple(ops), tuple(sorted(loss)),
                      draw(st.sampled_from(["f32", "f64"])), settings)
    # An op torch refused half-way may have left side effects in the simulation that the
    # program does not have; replaying the program from scratch catches that.
    assume(validate(program))
    return program


# -- interpreter -----------------------------------------------------------------------------
def make_leaf(leaf: Leaf) -> torch.Tensor:
    g = torch.Generator().manual_seed(leaf.seed)
    data = (torch.randn(leaf.shape, generator=g) * 0.5).to(DTYPES[leaf.dtype])
    if leaf.param:
        return nn.Parameter(data, requires_grad=leaf.requires_grad)
    return data.requires_grad_(leaf.requires_grad)


class Block(nn.Module):
    """A "layer": holds some parameters; its forward runs a segment of the program."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.ps = nn.ParameterList(params)

    def forward(self, thunk: Callable[[], Any]):
        return thunk()


class Model(nn.Module):
    def __init__(self, leaves: Sequence[torch.Tensor], n_layers: int) -> None:
        super().__init__()
        params = [t for t in leaves if isinstance(t, nn.Parameter)]
        self.layers = nn.ModuleList(Block(params[k::n_layers]) for k in range(n_layers))


def _segments(ops: Sequence[Op], use_model: bool):
    seg: List[Op] = []
    layer = None
    for op in ops:
        this = op.layer if use_model else None
        if seg and this != layer:
            yield layer, seg
            seg = []
        layer = this
        seg.append(op)
    if seg:
        yield layer, seg


def _run_ops(ops: Sequence[Op], env: Dict[int, Optional[torch.Tensor]], off,
             sync: bool = False, at: Optional[Callable[[Op], None]] = None) -> Optional[torch.Tensor]:
    """Run ops; each op's outputs get the next pool indices (``len(env)`` never shrinks
    because ``del`` leaves a ``None``). Returns the segment's output for the layer (see
    ``_layer_output``). ``at(op)`` is told each op before it runs (where an error came from)."""
    made = []
    for op in ops:
        if at is not None:
            at(op)
        if op.kind == "del":
            env[op.ins[0]] = None
            continue
        outs = KINDS[op.kind].apply([env[i] for i in op.ins], op.args, off)
        if len(outs) != op.nout:
            raise AssertionError(f"{op.kind} made {len(outs)} outputs, the program says {op.nout}")
        for o in outs:
            env[len(env)] = o
        made += [weakref.ref(o) for o in outs[:1]]  # weak: `del` must free
        if sync and off is not None:
            off.wait()
    return _layer_output(made)


def _layer_output(made) -> Optional[torch.Tensor]:
    """What a layer returns: the first output of its last op that still lives — views whose
    base was modified in place included (the layer tracker must cope: ``register_hook`` on
    such a view crashes torch 2.13, and on a multi-output view it raises)."""
    for ref in reversed(made):
        t = ref()
        if t is not None:
            return t
    return None


def _forward(p: Program, leaves: List[torch.Tensor], model: Optional[Model], off,
             at: Optional[Callable[[Op], None]] = None):
    env: Dict[int, Optional[torch.Tensor]] = {i: t for i, t in enumerate(leaves)}
    sync = p.settings.sync_writes
    for layer, seg in _segments(p.ops, model is not None):
        if layer is None:
            _run_ops(seg, env, off, sync, at)
        else:
            model.layers[layer](lambda seg=seg: _run_ops(seg, env, off, sync, at))
    dt = DTYPES[p.loss_dtype]
    loss = None
    for i in p.loss:
        term = env[i].to(dt).sum()
        loss = term if loss is None else loss + term
    if loss is None:
        loss = torch.zeros((), dtype=dt)  # backward raises in both runs
    return loss, env


def bits(t: Optional[torch.Tensor]):
    """The raw bits of a float tensor (NaNs compare equal to identical NaNs)."""
    if t is None:
        return None
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.contiguous().clone()
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return (str(t.dtype), tuple(t.shape), t.view(ints))


@dataclass
class Outcome:
    losses: List[Any] = field(default_factory=list)
    grads: List[List[Any]] = field(default_factory=list)
    error: Optional[Tuple[int, type, str]] = None   # (step, class, message)
    leftovers: List[str] = field(default_factory=list)
    stats: Optional[Dict[str, Any]] = None  # the offloaded run's OffloadStats.as_dict() at close
    where: str = ""  # where the run was when it raised: "forward, op 3 (inplace)", "backward", ...


def offload_config(s: Settings, spill_dir: str) -> ssdoffload.OffloadConfig:
    return ssdoffload.OffloadConfig(
        path=spill_dir, min_offload_bytes=s.min_offload_bytes, policy=s.policy,
        memory_budget=s.memory_budget if s.policy == "budget" else None,
        prefetch_depth=s.prefetch_depth, max_write_bandwidth=s.max_write_bandwidth,
        io_threads=s.io_threads, host_cache_bytes=s.host_cache_bytes, verify=s.verify,
        initial_file_bytes=1 << 20)


def _step(p: Program, leaves, model, off, outcome: Outcome) -> None:
    index = {id(op): i for i, op in enumerate(p.ops)}

    def at(op: Op) -> None:
        outcome.where = f"forward, op {index[id(op)]} ({op.kind})"
    loss, env = _forward(p, leaves, model, off, at)
    outcome.where = "forward, the loss"
    if p.settings.drop_refs:
        env.clear()
    outcome.where = "backward"
    loss.backward()
    outcome.where = "the end of the step (off.step() closing)"
    outcome.losses.append(bits(loss))
    outcome.grads.append([bits(t.grad) if t.is_leaf else None for t in leaves])


def run_program(p: Program, spill_dir: Optional[str] = None) -> Outcome:
    """Run ``p`` for ``p.settings.steps`` steps, with plain autograd (``spill_dir=None``) or
    under a fresh Offloader spilling to ``spill_dir``; the first exception ends the run."""
    leaves = [make_leaf(l) for l in p.leaves]
    s = p.settings
    model = Model(leaves, s.n_layers) if s.use_model else None
    off = ssdoffload.Offloader(model, offload_config(s, spill_dir)) if spill_dir is not None else None
    outcome = Outcome()
    try:
        for step in range(s.steps):
            scope = off.step() if off is not None else contextlib.nullcontext()
            try:
                with scope:
                    _step(p, leaves, model, off, outcome)
            except Exception as exc:  # noqa: BLE001 - compared with the other run
                outcome.error = (step, type(exc), str(exc))
                exc.__traceback__ = None
                del exc
                gc.collect()  # free the graph (and its handles) the traceback held
                break
            for t in leaves:
                t.grad = None
    finally:
        if off is not None:
            outcome.stats = off.stats().as_dict()
            off.close()
            outcome.leftovers = sorted(os.listdir(spill_dir)) if os.path.isdir(spill_dir) else []
    return outcome


def _same_bits(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _phase(where: str) -> str:
    """forward / backward / the end of the step: an error must come in the same one."""
    return where.split(",")[0]


def compare(ref: Outcome, got: Outcome) -> None:
    """Assert the offloaded run ``got`` matches the plain run ``ref``."""
    assert not got.leftovers, f"spill files left behind after close(): {got.leftovers}"
    if ref.error is not None or got.error is not None:
        assert ref.error is not None, (
            f"the offloaded run raised {got.error[1].__name__} in step {got.error[0]}, {got.where}, "
            f"but plain autograd did not: {got.error[2]}")
        assert got.error is not None, (
            f"plain autograd raised {ref.error[1].__name__} in step {ref.error[0]}, {ref.where} "
            f"({ref.error[2][:200]}), but the offloaded run did not")
        assert (ref.error[0], ref.error[1], _phase(ref.where)) == (got.error[0], got.error[1], _phase(got.where)), (
            f"different failures: plain {ref.error[1].__name__} in step {ref.error[0]}, {ref.where} "
            f"({ref.error[2][:200]}); offloaded {got.error[1].__name__} in step {got.error[0]}, {got.where} "
            f"({got.error[2][:200]})")
        if INPLACE_MESSAGE in ref.error[2]:
            assert INPLACE_MESSAGE in got.error[2], (
                f"plain autograd reported an in-place modification, the offloaded run: {got.error[2]}")
    steps = min(len(ref.losses), len(got.losses))
    assert len(ref.losses) == len(got.losses), f"{len(ref.losses)} vs {len(got.losses)} steps finished"
    for step in range(steps):
        assert _same_bits(ref.losses[step], got.losses[step]), f"loss differs in step {step}"
        for i, (a, b) in enumerate(zip(ref.grads[step], got.grads[step])):
            assert _same_bits(a, b), f"gradient of leaf t{i} differs in step {step}"


_counter = [0]


def check_program(p: Program, root: str, self_check: bool = False) -> Outcome:
    """Run ``p`` plainly and offloaded (in a fresh spill directory under ``root``); assert the
    same gradients and losses bit for bit, or the same exception. ``self_check`` also runs
    plain autograd twice (a program that reads uninitialised memory would fail this).
    Returns the offloaded run's outcome (its ``stats`` say what the program exercised)."""
    ref = run_program(p)
    if self_check:
        compare(ref, run_program(p))
    _counter[0] += 1
    spill_dir = os.path.join(root, f"spill{_counter[0]}")
    try:
        got = run_program(p, spill_dir)
        compare(ref, got)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    return got


# -- what the programs exercised -------------------------------------------------------------
class Census:
    """What a fuzz run's programs did, from each offloaded run's stats: how many wrote and
    read back, ops per program, bytes, and which op kinds and paths were taken."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, Any]] = []

    def add(self, p: Program, got: Outcome) -> None:
        st = got.stats or {}
        self.rows.append({
            "ops": len(p.ops), "kinds": {op.kind for op in p.ops},
            "written": st.get("bytes_written", 0), "read": st.get("bytes_read", 0),
            "diverted": st.get("budget_diversions", 0), "overruns": st.get("budget_overruns", 0),
            "error": got.error is not None, "policy": p.settings.policy, "model": p.settings.use_model,
        })

    def share(self, key: str) -> float:
        return sum(1 for r in self.rows if r[key]) / max(1, len(self.rows))

    def round_trips(self) -> float:
        """Share of programs that wrote and read something back."""
        return sum(1 for r in self.rows if r["written"] and r["read"]) / max(1, len(self.rows))

    def report(self) -> str:
        n = len(self.rows)
        if not n:
            return "fuzz census: no programs"
        ops = sorted(r["ops"] for r in self.rows)
        kinds: Dict[str, int] = {}
        for r in self.rows:
            for k in r["kinds"]:
                kinds[k] = kinds.get(k, 0) + 1
        never = sorted(set(KINDS) - set(kinds))
        written = sum(r["written"] for r in self.rows)
        lines = [
            f"fuzz census: {n} programs; ops per program mean {sum(ops) / n:.1f} "
            f"(min {ops[0]}, median {ops[n // 2]}, max {ops[-1]})",
            f"  wrote and read back: {self.round_trips():.0%}; wrote: {self.share('written'):.0%}; "
            f"raised (both runs alike): {self.share('error'):.0%}; {written / 2**20:.1f} MiB written in all",
            f"  budget mode: {sum(1 for r in self.rows if r['policy'] == 'budget')} programs, diversions in "
            f"{self.share('diverted'):.0%}, overruns counted in {self.share('overruns'):.0%}; "
            f"with a model (layers): {self.share('model'):.0%}",
            "  op kinds (programs using each): " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        ]
        if never:
            lines.append(f"  op kinds never drawn: {', '.join(never)}")
        return "\n".join(lines)


# -- tools for failures ----------------------------------------------------------------------
def validate(p: Program) -> bool:
    """Whether ``p`` is a program the generator could have made: every op runs, makes the
    outputs the program says, and writes only what the contract allows (for hand-edited or
    reduced programs)."""
    sim = Sim(p.leaves)
    for op in p.ops:
        if any(i >= len(sim.pool) or sim.pool[i] is None for i in op.ins):
            return False
        if op.kind != "del" and any(i not in sim.dense() for i in op.ins):
            return False
        if not KINDS[op.kind].legal(sim, op.ins, op.args):
            return False
        if sim.apply(op.kind, op.ins, op.args) != op.nout:
            return False
    return all(i < len(sim.pool) and sim.pool[i] is not None and i in sim.dense() for i in p.loss)


def _remap(p: Program, drop_lo: int, drop_n: int, ops, leaves) -> Optional[Program]:
    def m(i):
        if drop_lo <= i < drop_lo + drop_n:
            raise KeyError(i)
        return i - drop_n if i >= drop_lo + drop_n else i
    try:
        new_ops = tuple(Op(o.kind, tuple(m(i) for i in o.ins), o.args, o.nout, o.layer) for o in ops)
    except KeyError:
        return None
    loss = tuple(m(i) for i in p.loss if not drop_lo <= i < drop_lo + drop_n)
    return Program(tuple(leaves), new_ops, loss, p.loss_dtype, p.settings)


def failure_key(exc: BaseException) -> str:
    """What kind of failure ``compare`` reported (its message up to the first colon, plus the
    exception class the offloaded run raised, if any): reductions keep the same kind."""
    msg = str(exc)
    head = msg.split(":")[0].split("(")[0].strip()
    for word in ("SpillReadError", "OffloadError", "StateError", "NotImplementedError", "spill files left"):
        if word in msg:
            return f"{head} [{word}]"
    return head


def fails_like(p: Program, key: str, root: str, tries: int = 3) -> bool:
    """Whether ``p`` fails with ``failure_key`` ``key`` in one of ``tries`` runs."""
    for _ in range(tries):
        try:
            check_program(p, root)
        except AssertionError as exc:
            if failure_key(exc) == key:
                return True
    return False


def reduce_program(p: Program, fails: Callable[[Program], bool]) -> Program:
    """Greedily delete ops, leaves and loss terms and reset settings to their defaults while
    ``fails(program)`` stays true and the program stays valid (hypothesis' shrinker cannot
    delete an op without renumbering every later tensor). ``fails`` should rerun a flaky
    failure a few times."""
    def ok(q):
        return q is not None and q.loss and validate(q) and fails(q)

    changed = True
    while changed:
        changed = False
        nxt = len(p.leaves)
        starts = []
        for op in p.ops:
            starts.append(nxt)
            nxt += op.nout
        for k in reversed(range(len(p.ops))):
            q = _remap(p, starts[k], p.ops[k].nout, p.ops[:k] + p.ops[k + 1:], p.leaves)
            if ok(q):
                p, changed = q, True
                break
        if changed:
            continue
        for j in reversed(range(len(p.leaves))):
            q = _remap(p, j, 1, p.ops, p.leaves[:j] + p.leaves[j + 1:])
            if ok(q):
                p, changed = q, True
                break
        if changed:
            continue
        for t in p.loss:
            q = Program(p.leaves, p.ops, tuple(i for i in p.loss if i != t), p.loss_dtype, p.settings)
            if ok(q):
                p, changed = q, True
                break
        if changed:
            continue
        default = Settings()
        for name in Settings.__dataclass_fields__:
            if getattr(p.settings, name) != getattr(default, name):
                s = Settings(**{**p.settings.__dict__, name: getattr(default, name)})
                q = Program(p.leaves, p.ops, p.loss, p.loss_dtype, s)
                if ok(q):
                    p, changed = q, True
                    break
    return p


# -- describe ---------------------------------------------------------------------------------
def describe(p: Program) -> str:
    """The program as readable Python-like lines."""
    s = p.settings
    lines = [
        f"# settings: policy={s.policy!r}, prefetch_depth={s.prefetch_depth}, "
        f"min_offload_bytes={s.min_offload_bytes}, max_write_bandwidth={s.max_write_bandwidth}, "
        f"io_threads={s.io_threads}, host_cache_bytes={s.host_cache_bytes}, verify={s.verify}"
        f"{f', memory_budget={s.memory_budget}' if s.policy == 'budget' else ''}",
        f"#           model={'Model(' + str(s.n_layers) + ' layers)' if s.use_model else None}, "
        f"steps={s.steps}, drop_refs_before_backward={s.drop_refs}, "
        f"sync_writes={s.sync_writes}{' (off.wait() after every op)' if s.sync_writes else ''}",
        "# randn(*shape, dtype, seed) = (torch.randn(shape, generator=torch.Generator()"
        ".manual_seed(seed)) * 0.5).to(dtype); helpers: fuzz_programs.py",
    ]
    for i, l in enumerate(p.leaves):
        isz = torch.empty(0, dtype=DTYPES[l.dtype]).element_size()
        expr = f"randn({_dims_text(l.shape)}, dtype={_TORCH_DTYPE_TEXT[l.dtype]}, seed={l.seed})"
        expr = f"nn.Parameter({expr}, requires_grad={l.requires_grad})" if l.param else \
            (f"{expr}.requires_grad_()" if l.requires_grad else expr)
        lines.append(f"t{i} = {expr}  # {_prod(l.shape) * isz} bytes")
    nxt = len(p.leaves)
    indent = ""
    current = None
    for op in p.ops:
        layer = op.layer if s.use_model else None
        if layer != current:
            indent = "" if layer is None else "    "
            if layer is not None:
                lines.append(f"with model.layers[{layer}]:")
            current = layer
        outs = [f"t{nxt + k}" for k in range(op.nout)]
        nxt += op.nout
        lines.append(indent + KINDS[op.kind].text([f"t{i}" for i in op.ins], outs, op.args))
    cast = _TORCH_DTYPE_TEXT[p.loss_dtype]
    terms = " + ".join(f"t{i}.to({cast}).sum()" for i in p.loss) or f"torch.zeros((), dtype={cast})"
    lines.append(f"loss = {terms}")
    if s.drop_refs:
        lines.append("del t*  # every intermediate")
    lines.append("loss.backward()")
    return "\n".join(lines)
