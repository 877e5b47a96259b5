"""Scoping every training forward of a module, for loops we do not own (HF Trainer, accelerate).

``ForwardScopes(offloader, module)`` puts a pre-hook and an always-called post-hook on
``module``: each outermost training forward (grad enabled, ``module.training``) runs inside its
own ``offloader.micro_batch`` scope, so the tensors it saves are offloaded and its backward may
come whenever the loop runs it, as with ``ssdoffload.offload()``. The post-hook runs even when
forward raises (``always_call``), so an exception never leaves a scope or the saved-tensor hooks
open. ``remove()`` takes both hooks off again (symmetric with construction).

Statistics: opening a forward closes the previous forward's step (``Offloader.end_step``), whose
backward has run by then in every loop this serves.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Optional

import torch

from .layers import in_backward


class ForwardScopes:
    """One scope per outermost training forward of ``module`` (see the module docstring)."""

    def __init__(self, offloader: Any, module: torch.nn.Module) -> None:
        self.offloader = offloader
        self.module = module
        self._keys = itertools.count()
        self._depth = 0                     # forwards of ``module`` nested in the current one
        self._open: Optional[contextlib.ExitStack] = None
        self._forwards = 0
        self._handles = [
            module.register_forward_pre_hook(self._pre_hook),
            module.register_forward_hook(self._post_hook, always_call=True),
        ]

    def _pre_hook(self, module: torch.nn.Module, args) -> None:
        self._depth += 1
        if self._depth > 1 or not self._wanted(module):
            return
        if self._forwards:
            self.offloader.end_step()
        self._forwards += 1
        stack = contextlib.ExitStack()
        stack.enter_context(self.offloader.micro_batch(("forward", next(self._keys))))
        self._open = stack

    def _post_hook(self, module: torch.nn.Module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0 and self._open is not None:
            stack, self._open = self._open, None
            stack.close()  # closes the scope and pops the saved-tensor hooks, even on an exception

    @staticmethod
    def _wanted(module: torch.nn.Module) -> bool:
        # Evaluation and no-grad forwards save nothing; a checkpointed forward re-run during
        # backward is not ours either.
        return module.training and torch.is_grad_enabled() and not in_backward()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._open is not None:
            stack, self._open = self._open, None
            stack.close()
