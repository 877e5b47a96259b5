"""ssdoffload: spill training activations to NVMe SSDs and reload them ahead of backward.

    import ssdoffload
    with ssdoffload.offload(path="/nvme/act"):      # any model, no setup
        loss = model(batch).sum()
    loss.backward()

    off = ssdoffload.Offloader(model, ssdoffload.OffloadConfig(path="/nvme/act"))
    with off.step():                                 # explicit lifetime, layer-aware
        loss = model(batch).sum()
        loss.backward()

Public: ``offload`` and ``Offloader`` (entry points), ``OffloadConfig``, ``OffloadStats``, the
errors, and ``plan`` (the capacity planner). Modules not re-exported here are internal.
"""
import logging

from .config import OffloadConfig
from .context import offload
from .errors import OffloadError, ResourceLimitError, SpillPathError, SpillReadError
from .offloader import Offloader
from .stats import OffloadStats

logging.getLogger("ssdoffload").addHandler(logging.NullHandler())

__all__ = ["offload", "Offloader", "OffloadConfig", "OffloadStats", "OffloadError", "SpillPathError",
           "SpillReadError", "ResourceLimitError", "plan"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "plan":  # the planner imports more than a training step needs: load it lazily
        from .planner import plan
        return plan
    raise AttributeError(f"module 'ssdoffload' has no attribute {name!r}")
