"""Releases that run none of our code inside the garbage collector or a finaliser.

Autograd drops the objects ``pack`` returned (``Handle``, ``Kept``) whenever it frees a graph:
on any thread, at any bytecode, and from inside the cyclic garbage collector, which may run
while the interrupted code holds one of our non-reentrant locks. A ``__del__`` that released
the entry there would take that lock again and hang the step forever, and a ``KeyboardInterrupt``
that arrives while a ``__del__`` runs is printed as "Exception ignored" and lost.

So nothing of ours runs at that moment: each watched object has a weak reference whose callback
is ``deque.append`` — a C function, no Python frame, no lock of ours, no signal check — and the
library drains the queue at its own safe points (every pack and unpack, the end of a step,
``wait()``, ``close()``...), where the release takes its locks like any other code.

One object may be watched more than once (a kept tensor's bytes and the recomputation its
unpack opened; a handle's entry and the same recomputation): every release runs. The watch
references are therefore compared by identity, never by referent — ``weakref.ref`` hashes and
compares equal by its referent, so two watches of one object in a plain dict or set would be
one key, and the first release would be silently replaced by the second.
"""
from __future__ import annotations

import collections
import weakref
from typing import Any, Callable, Set


class _Watch(weakref.ref):
    """A weak reference that carries its release, hashed and compared by its own identity
    (constructed by ``weakref.ref`` itself, in C: the pack hook makes one per saved tensor)."""

    __slots__ = ("release", "arg")
    __hash__ = object.__hash__
    __eq__ = object.__eq__


class ReleaseQueue:
    """Objects to release when they die; ``drain()`` runs the releases."""

    def __init__(self) -> None:
        self._dead: collections.deque = collections.deque()
        # The watches themselves must outlive their referents, or their callbacks would not run.
        self._watched: Set[_Watch] = set()

    def watch(self, obj: Any, release: Callable[[Any], None], arg: Any) -> None:
        """Call ``release(arg)`` at the first ``drain()`` after ``obj`` died (once per watch:
        watching one object twice runs both releases)."""
        watch = _Watch(obj, self._dead.append)
        watch.release, watch.arg = release, arg
        self._watched.add(watch)

    def drain(self) -> int:
        """Run the releases of every watched object that died so far (any thread); returns
        how many ran."""
        ran = 0
        dead = self._dead
        while dead:
            try:
                ref = dead.popleft()
            except IndexError:  # another thread took the last one
                break
            self._watched.remove(ref)
            ref.release(ref.arg)
            ran += 1
        return ran

    def pending(self) -> bool:
        """Whether a watched object died and waits for ``drain()`` (cheap: no lock)."""
        return bool(self._dead)

    def __len__(self) -> int:
        """Objects watched and not yet released (dead ones waiting for a drain included)."""
        return len(self._watched)
