"""accelerate: one call after ``accelerator.prepare``.

.. code-block:: python

    from ssdoffload.integrations.accelerate import offload_activations
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    off = offload_activations(accelerator, model, path="/nvme/act")
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step(); optimizer.zero_grad()
    off.close()

``offload_activations`` unwraps what ``prepare`` wrapped (DDP, ``torch.compile``'s module) to
find the layers, and attaches the offloader to the prepared model: every training forward is
a micro-batch scope, its backward runs whenever ``accelerator.backward`` runs it. Keyword
arguments are ``OffloadConfig`` fields; with several processes put ``{rank}`` in the path.
"""
from __future__ import annotations

from typing import Any

import torch

from ssdoffload import Offloader, OffloadConfig


def offload_activations(accelerator: Any, model: torch.nn.Module, config: OffloadConfig = None,
                        **config_kwargs: Any) -> Offloader:
    """An ``Offloader`` attached to ``model`` (as returned by ``accelerator.prepare``)."""
    config = config if config is not None else OffloadConfig(**config_kwargs)
    inner = accelerator.unwrap_model(model)
    off = Offloader(inner, config)
    try:
        off.attach(model)
    except BaseException:
        off.close()
        raise
    return off
