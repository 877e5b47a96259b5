"""Shared by the Megatron worker scripts: a tiny megatron-core GPT, synthetic data, and one
training run through Megatron's own schedule, with or without ssdoffload.

``redirect_cuda_to_cpu()`` is a TEST FIXTURE ONLY: megatron-core's schedules, p2p code and
RNG tracker hard-code ``device="cuda"`` and ``torch.cuda.*`` calls; on a CPU host it points
them at the CPU so the real schedules run over gloo. Nothing in ssdoffload does this.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def import_integration():
    """``ssdoffload.integrations.megatron`` (from the source tree when the package is not
    installed with its ``integrations`` folder)."""
    try:
        return importlib.import_module("ssdoffload.integrations.megatron")
    except ModuleNotFoundError:
        path = os.path.join(ROOT, "integrations", "megatron.py")
        spec = importlib.util.spec_from_file_location("ssdoffload_integrations_megatron", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


def redirect_cuda_to_cpu() -> None:
    """TEST FIXTURE: make megatron-core's hard-coded CUDA calls act on the CPU (see module doc)."""
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as mrandom

    class _CpuTorch:
        """``torch`` as the schedules see it, with ``device="cuda"`` sent to the CPU."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return torch.zeros(*args, **kwargs)

    schedules.torch = _CpuTorch()
    torch.cuda.current_device = lambda: "cpu"      # p2p receive buffers, attention masks
    torch.cuda.synchronize = lambda *a, **k: None  # p2p "race protection"
    # The CUDA RNG tracker (attention dropout, recompute) keeps a dummy state on the CPU.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *a, **k: None


def build_model(pp_size: int, pp_rank: int, layers: int = 4, hidden: int = 64, heads: int = 4,
                vocab: int = 128, seq: int = 32, recompute: str = "none", device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    extra = {}
    if recompute == "full":
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        extra = dict(recompute_granularity="selective")
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        use_cpu_initialization=True, pipeline_dtype=dtype, params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        hidden_dropout=0.1, attention_dropout=0.0, pipeline_model_parallel_size=pp_size,
        **extra)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=vocab, max_sequence_length=seq,
                     pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1,
                     share_embeddings_and_output_weights=False)
    model = model.to(device)
    if dtype == torch.bfloat16:  # what Megatron's training loop does for --bf16
        from megatron.core.transformer.module import Float16Module
        model = Float16Module(config, model)
    return model


def batches(num: int, micro_batch: int, seq: int, vocab: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        data = torch.randint(0, vocab, (micro_batch, seq + 1), generator=g)
        tokens = data[:, :-1].contiguous().to(device)
        labels = data[:, 1:].contiguous().to(device)
        position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(micro_batch, seq)
        mask = torch.tril(torch.ones(seq, seq, device=device, dtype=torch.bool))
        attention_mask = (~mask).unsqueeze(0).unsqueeze(0)  # True = masked out
        out.append((tokens, labels, position_ids, attention_mask))
    return out


def loss_func(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    tokens, labels, position_ids, attention_mask = next(data_iterator)
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, loss_func


def train(offload_config, *, pp_size: int, pp_rank: int, steps: int, microbatches: int,
          micro_batch: int = 2, seq: int = 32, vocab: int = 128, recompute: str = "none",
          device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 1234):
    """Train ``steps`` SGD steps through Megatron's schedule; returns losses, grads, stats."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ssd_megatron = import_integration()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_model(pp_size, pp_rank, seq=seq, vocab=vocab, recompute=recompute,
                        device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    func = get_forward_backward_func()
    wrapped = None
    if offload_config is not None:
        wrapped = ssd_megatron.wrap(func, model, offload_config)
        func = wrapped
    losses, grads, per_step = [], [], []
    torch.manual_seed(seed + 1)  # the dropout masks: same sequence with and without offload
    try:
        for step in range(steps):
            data = iter(batches(microbatches, micro_batch, seq, vocab, seed=100 + step, device=device))
            out = func(forward_step_func=forward_step, data_iterator=data, model=model,
                       num_microbatches=microbatches, seq_length=seq, micro_batch_size=micro_batch,
                       forward_only=False)
            losses.append([d["lm loss"].detach().cpu().clone() for d in out])
            grads.append([p.grad.detach().cpu().clone() if p.grad is not None else None
                          for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if wrapped is not None:
                per_step.append(wrapped.last_step_stats())
        stats = wrapped.stats() if wrapped is not None else None
        files = wrapped.offloader.spill_files if wrapped is not None else []
    finally:
        if wrapped is not None:
            wrapped.close()
    return losses, grads, stats, per_step, files


def compare(ref, got) -> list:
    """Differences between two ``train`` results (empty when bit-identical)."""
    problems = []
    for step, (a, b) in enumerate(zip(ref[0], got[0])):
        for i, (x, y) in enumerate(zip(a, b)):
            if not torch.equal(x, y):
                problems.append(f"loss of micro-batch {i} differs at step {step}: {x.item()!r} vs {y.item()!r}")
    for step, (a, b) in enumerate(zip(ref[1], got[1])):
        for i, (x, y) in enumerate(zip(a, b)):
            if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
                problems.append(f"gradient {i} differs at step {step}")
    if len(ref[0]) != len(got[0]) or len(ref[1]) != len(got[1]):
        problems.append("different number of steps")
    return problems


@contextlib.contextmanager
def distributed(pp_size: int, backend: str = "gloo"):
    """torch.distributed from torchrun's environment, megatron-core's parallel state with
    ``pp_size`` pipeline stages; torn down on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group(backend=backend)
    try:
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp_size)
        yield dist.get_rank(), parallel_state.get_pipeline_model_parallel_rank()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
