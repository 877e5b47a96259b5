"""Lightning: one callback.

.. code-block:: python

    from ssdoffload.integrations.lightning import SSDOffloadCallback
    trainer = lightning.Trainer(callbacks=[SSDOffloadCallback(path="/nvme/act")])

Lightning calls ``training_step`` (which need not call ``forward``) and, with automatic
optimization, backward and the optimizer step between ``on_train_batch_start`` and
``on_train_batch_end``. The callback opens an ``Offloader.step()`` scope at the first and closes
it at the second, so everything saved in that batch is offloaded and freed in its backward.
On an exception anywhere in fit, ``on_exception`` closes the open scope (the step is aborted:
its spill data is discarded) before Lightning re-raises; ``on_fit_end`` and teardown close the
offloader. Keyword arguments are ``OffloadConfig`` fields.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import lightning

from ssdoffload import Offloader, OffloadConfig


class SSDOffloadCallback(lightning.Callback):
    """Offload the activations of every training batch."""

    def __init__(self, config: Optional[OffloadConfig] = None, **config_kwargs: Any) -> None:
        self.config = config if config is not None else OffloadConfig(**config_kwargs)
        self.offloader: Optional[Offloader] = None
        #: The offloader's cumulative statistics, kept when fit ends and it is closed.
        self.stats = None
        self._scope: Optional[contextlib.ExitStack] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._close()
        self.offloader = Offloader(pl_module, self.config)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.offloader is None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.offloader.step())
        self._scope = stack

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end_scope(None)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._end_scope(exception)
        self._close()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def _end_scope(self, exception: Optional[BaseException]) -> None:
        stack, self._scope = self._scope, None
        if stack is None:
            return
        if exception is None:
            stack.close()
        else:  # step() aborts on an exception: its spill data is discarded, files re-made later
            stack.__exit__(type(exception), exception, exception.__traceback__)

    def _close(self) -> None:
        self._end_scope(None)
        off, self.offloader = self.offloader, None
        if off is not None:
            if off.enabled:
                self.stats = off.stats()
            off.close()
