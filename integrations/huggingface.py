"""Hugging Face ``Trainer``: one callback.

.. code-block:: python

    from ssdoffload.integrations.huggingface import SSDOffloadCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SSDOffloadCallback(path="/nvme/act")])

What it does: at ``on_train_begin`` it makes an ``Offloader`` for the model the Trainer trains
(its decoder layers, e.g. ``model.model.layers`` of a Llama, are the prefetch groups) and
attaches it (``Offloader.attach``): every training forward is a micro-batch scope, so gradient
accumulation offloads each micro-batch and frees it in its own backward. Evaluation forwards
(no grad) are left alone. An exception inside forward closes its scope (the post-hook always
runs); ``on_train_end`` closes the offloader and keeps its statistics in ``callback.stats``.

With the Trainer's own DeepSpeed config (``TrainingArguments(deepspeed=...)``), the same
``"ssd_offload"`` block as for ``ssd_ds.initialize`` is honoured: ``SSDOffloadCallback()`` with no
settings reads it (the Trainer calls ``deepspeed.initialize`` itself, so the callback is how the
block reaches ssdoffload; DeepSpeed ignores the key). ``"enabled": false`` turns it off.

Keyword arguments are ``OffloadConfig`` fields. With several processes, put ``{rank}`` in the
path (``"/nvme/act/{rank}"``): it is filled with the process's rank, so ranks never share a
directory.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from transformers import TrainerCallback

from ssdoffload import Offloader, OffloadConfig

log = logging.getLogger("ssdoffload")


class SSDOffloadCallback(TrainerCallback):
    """Offload the activations of every training step the ``Trainer`` runs."""

    def __init__(self, config: Optional[OffloadConfig] = None, **config_kwargs: Any) -> None:
        # Built now, so a bad value fails where the Trainer is set up, not at train(). None:
        # read the "ssd_offload" block of the Trainer's DeepSpeed config at on_train_begin.
        if config is None and config_kwargs:
            config = OffloadConfig(**config_kwargs)
        self.config = config
        self.offloader: Optional[Offloader] = None
        #: The offloader's cumulative statistics, kept when training ends and it is closed.
        self.stats = None
        self._handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SSDOffloadCallback needs the model the Trainer trains (model=None)")
        self._close()  # a previous train() that raised: start clean
        config = self.config if self.config is not None else _deepspeed_block(args)
        if not config.enabled:
            log.info("ssdoffload: the ssd_offload block says enabled=false; not offloading")
            return
        self.offloader = Offloader(model, config)
        self._handle = self.offloader.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self._close()

    def _close(self) -> None:
        off, self.offloader = self.offloader, None
        self._handle = None
        if off is not None:
            if off.enabled:
                self.stats = off.stats()
            off.close()  # removes the forward hooks too


def _deepspeed_block(args) -> OffloadConfig:
    """The ``"ssd_offload"`` block of the Trainer's DeepSpeed config, as an ``OffloadConfig``."""
    ds = getattr(args, "hf_deepspeed_config", None)
    block = ds.config.get("ssd_offload") if ds is not None else None
    if block is None:
        where = "the Trainer's DeepSpeed config has no \"ssd_offload\" block" if ds is not None \
            else "the Trainer has no DeepSpeed config"
        raise ValueError(f"SSDOffloadCallback() without settings reads the \"ssd_offload\" block of the "
                         f"Trainer's DeepSpeed config, but {where}: pass OffloadConfig fields "
                         "(e.g. SSDOffloadCallback(path=\"/nvme/act\")) or add the block")
    return OffloadConfig.from_dict(block)

