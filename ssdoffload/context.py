"""``ssdoffload.offload()``: offloading as one ``with`` line, with no model and no object to hold.

    with ssdoffload.offload(path="/nvme/act"):
        loss = model(batch)
    loss.backward()            # inside the block or after it

What it does, in order:

1. Find (or make) the default ``Offloader`` for these settings — one per distinct ``path`` and
   keyword set, shared by every block that asks for the same, closed at interpreter exit. It has
   no model: parameters are recognised when they are saved (``policy.is_parameter_like``), and
   saved tensors are grouped by bytes in pack order (there are no layers to group by).
2. Close the statistics (and feed the adaptive plan) of the previous block, whose backward has
   run by the time the next forward starts.
3. Open a micro-batch scope for the block: tensors saved inside are offloaded; backward may run
   inside the block or later, as with ``Offloader.micro_batch``. An exception inside the block
   closes the scope; the step's tensors are freed when autograd drops them.

Without ``path`` the spill directory is ``$SSDOFFLOAD_PATH`` or else a private temporary
directory (mode 0700), removed at exit. ``Offloader(model, ...)`` stays the API for schedules,
frameworks and anything that wants explicit lifetime.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import tempfile
import threading
import weakref
from typing import Any, Dict, Iterator, List, Sequence, Union

from .config import OffloadConfig
from .offloader import Offloader

log = logging.getLogger("ssdoffload")

_lock = threading.Lock()
_offloaders: Dict[str, Offloader] = {}
_had_block: "weakref.WeakSet[Offloader]" = weakref.WeakSet()  # served a block already
_temp_dirs: List[str] = []
_keys = itertools.count()


def offload(path: Union[str, Sequence[str], None] = None, **config: Any) -> "contextlib.AbstractContextManager[Offloader]":
    """Offload the activations saved inside the ``with`` block (see the module docstring).

    ``path`` and ``config`` are ``OffloadConfig`` fields; the block yields the ``Offloader``
    serving it (for ``stats()``, ``plan()``, ``wait()``).
    """
    return _block(default_offloader(path, **config))


def default_offloader(path: Union[str, Sequence[str], None] = None, **config: Any) -> Offloader:
    """The shared ``Offloader`` for these settings (made on first use, closed at exit)."""
    if path is None:
        path = os.environ.get("SSDOFFLOAD_PATH") or _private_temp_dir()
    key = repr((path, sorted(config.items())))
    with _lock:
        off = _offloaders.get(key)
        if off is None or off.closed:
            off = _offloaders[key] = Offloader(None, OffloadConfig(path=path, **config))
        return off


@contextlib.contextmanager
def _block(off: Offloader) -> Iterator[Offloader]:
    if off in _had_block:
        off.end_step()  # the previous block's backward has run: close its statistics
    _had_block.add(off)
    with off.micro_batch(("offload", next(_keys))):
        yield off


def _private_temp_dir() -> str:
    with _lock:
        if not _temp_dirs:
            _temp_dirs.append(tempfile.mkdtemp(prefix="ssdoffload-"))  # mode 0700, ours
            log.info("ssdoffload: no path given (and no $SSDOFFLOAD_PATH): spilling to %s", _temp_dirs[0])
        return _temp_dirs[0]


@atexit.register
def _close_defaults() -> None:
    """Close the default offloaders, then remove the temporary directory they spilled to (this
    runs before ``offloader``'s own exit hook, which was registered first)."""
    for off in list(_offloaders.values()):
        try:
            off.close()
        except Exception as exc:  # keep closing the others
            log.warning("ssdoffload: closing a default offloader at exit failed: %s", exc)
    _offloaders.clear()
    for d in _temp_dirs:
        try:
            os.rmdir(d)  # empty once its offloaders removed their files
        except OSError as exc:
            log.warning("ssdoffload: could not remove the temporary spill directory %s: %s", d, exc)
