"""The models ``bench --budgets`` can measure (``--model``): how to build one from a preset's
sizes, how to compute its loss, and which fixed plans mean something for it.

* ``gpt`` (default): the reference GPT (``ssdoffload.models.gpt``); ``recompute=True`` is plain
  PyTorch checkpointing of every block.
* ``hf-llama``: a tiny random ``transformers`` Llama of the preset's sizes **with the user's own
  gradient checkpointing on** (``gradient_checkpointing_enable``, non-reentrant), the way HF
  users train: the offloader sees only each layer's input and plans with what its
  recomputation holds (``recompute_watch``). Its "recompute" baseline is that checkpointing
  without ssdoffload, its "keep" baseline the same model without it. Needs ``transformers``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from ..models.gpt import GPT
from .presets import Preset

MODELS = ("gpt", "hf-llama")


@dataclass(frozen=True)
class BenchModel:
    name: str
    #: (preset, recompute) -> a fresh model; ``recompute``: the plain-PyTorch recomputation baseline.
    build: Callable[[Preset, bool], torch.nn.Module]
    loss: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    #: Fixed plans that mean something here (a model the user checkpoints is not checkpointed
    #: again by a pinned plan).
    fixed_plans: Tuple[str, ...]


def _gpt(preset: Preset, recompute: bool) -> torch.nn.Module:
    return GPT(preset.model, recompute=recompute)


def _gpt_loss(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(tokens, targets)


def _llama(preset: Preset, recompute: bool) -> torch.nn.Module:
    try:
        import transformers
    except ImportError:
        raise SystemExit("--model hf-llama needs transformers: pip install 'ssdoffload[hf]'") from None
    m = preset.model
    cfg = transformers.LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.mlp_ratio * m.hidden,
                                   num_hidden_layers=m.layers, num_attention_heads=m.heads,
                                   num_key_value_heads=m.heads, max_position_embeddings=m.seq,
                                   attn_implementation="eager", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    if not recompute:
        # The user's own checkpointing is what is measured: on for every point but plain keep.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _llama_plain(preset: Preset, recompute: bool) -> torch.nn.Module:
    """Plain PyTorch points: keep = no checkpointing, recompute = the user's checkpointing."""
    return _llama(preset, not recompute)


def _llama_loss(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def bench_model(name: str, plain: bool = False) -> BenchModel:
    """The model ``name`` (one of ``MODELS``); ``plain``: for the points without ssdoffload."""
    if name == "gpt":
        return BenchModel("gpt", _gpt, _gpt_loss, ("keep", "recompute", "ckpt-input-ssd", "ssd", "ckpt-input-ram"))
    if name == "hf-llama":
        return BenchModel("hf-llama", _llama_plain if plain else _llama, _llama_loss, ("keep", "ssd"))
    raise ValueError(f"unknown bench model {name!r}: one of {', '.join(MODELS)}")
