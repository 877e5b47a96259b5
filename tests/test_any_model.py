"""Models without a layer list, and the one-line ``ssdoffload.offload()`` (issue 12, items 1–2).

Against plain autograd, on architectures written the way torchvision and users write them
(``tests/any_models.py``): gradients must be bit-identical, and backward must hold only a few
byte groups at a time, as it holds a few layers of a ModuleList GPT — not read the whole step
back at its first unpack (peak 1.00× before).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import ssdoffload
from ssdoffload.models.gpt import GPT, GPTConfig

from any_models import ResNet, SequentialGPT, ViT

CFG = GPTConfig(vocab=256, seq=128, hidden=128, heads=4, layers=6, dropout=0.0)
MODELS = {
    "resnet": lambda: ResNet(16),
    "vit": lambda: ViT(),
    "gpt-sequential": lambda: SequentialGPT(CFG),
    "gpt-modulelist": lambda: GPT(CFG),  # the layer-grouped reference
}


def _batch(name, i):
    g = torch.Generator().manual_seed(i)
    if name in ("resnet", "vit"):
        return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    tokens = torch.randint(0, CFG.vocab, (8, CFG.seq), generator=g)
    return tokens, torch.roll(tokens, -1, 1)


def _loss(name, model, batch):
    if name in ("resnet", "vit"):
        return F.cross_entropy(model(batch[0]), batch[1])
    return model(*batch)


def _grads_and_reset(model):
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _backward_peak(off, loss):
    """Backward of ``loss`` while sampling the offloader's resident bytes before every autograd
    node runs; returns the largest sample. With the forward's writes settled first this is
    deterministic: loads are counted when started, releases when autograd drops a tensor."""
    peak = [0]

    def sample(grad_outputs):
        peak[0] = max(peak[0], off.current_step_stats().resident_bytes)

    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_prehook(sample)
        todo.extend(n for n, _ in node.next_functions)
    loss.backward()
    return peak[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_models_without_layers_train_exactly_and_prefetch_in_groups(name, spill_dir):
    torch.manual_seed(0)
    model = MODELS[name]()
    ref = copy.deepcopy(model)
    cfg = ssdoffload.OffloadConfig(path=spill_dir, min_offload_bytes=4096, policy="all")
    with ssdoffload.Offloader(model, cfg) as off:
        ratios = []
        for i in range(3):
            batch = _batch(name, i)
            with off.step():
                loss = _loss(name, model, batch)
                off.wait()  # every write done: backward starts with nothing resident
                peak = _backward_peak(off, loss)
            ratios.append(peak / off.last_step_stats().offloadable_bytes)
            _loss(name, ref, batch).backward()
            got, want = _grads_and_reset(model), _grads_and_reset(ref)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"step {i}: gradients differ"
        if name != "gpt-modulelist":
            assert off.position.group_bytes is not None, "expected grouping by bytes"
    # The first step uses provisional 8 MiB groups; from the second, ~1/16 of a step each.
    assert max(ratios[1:]) <= 0.5, f"backward held {ratios} of the offloaded bytes at once"


@pytest.mark.parametrize("name", ["resnet", "gpt-sequential"])
def test_one_line_context_manager(name, tmp_path):
    """``with ssdoffload.offload(path=...)`` around the forward only; backward after the block.
    No model given: parameters are recognised when saved and never written."""
    torch.manual_seed(0)
    model = MODELS[name]()
    ref = copy.deepcopy(model)
    path = str(tmp_path / "act")
    content = b""
    for i in range(3):
        batch = _batch(name, i)
        with ssdoffload.offload(path=path, min_offload_bytes=4096) as off:
            loss = _loss(name, model, batch)
            off.wait()
            content += b"".join(open(f, "rb").read() for f in off.spill_files)
        loss.backward()
        _loss(name, ref, batch).backward()
        got, want = _grads_and_reset(model), _grads_and_reset(ref)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"step {i}: gradients differ"
    assert off.stats().bytes_written > 0
    assert off.stats().steps >= 2  # each block after the first closed its predecessor's step
    for p in model.parameters():  # the spill files hold activations, never a parameter's bytes
        raw = p.detach().contiguous().view(-1)
        if raw.numel() >= 64 and raw[:64].abs().sum() > 0:
            assert raw[:64].numpy().tobytes() not in content, "a parameter was written to the spill file"
    # The same settings share one offloader; a block inside a block is refused.
    with ssdoffload.offload(path=path, min_offload_bytes=4096) as again:
        assert again is off
        with pytest.raises(ssdoffload.OffloadError, match="do not nest"):
            with ssdoffload.offload(path=path, min_offload_bytes=4096):
                pass
    off.close()


def test_context_manager_exception_leaves_no_scope_open(tmp_path):
    path = str(tmp_path / "act")
    model = MODELS["resnet"]()
    with pytest.raises(ZeroDivisionError):
        with ssdoffload.offload(path=path, min_offload_bytes=4096):
            _loss("resnet", model, _batch("resnet", 0))
            1 / 0
    with ssdoffload.offload(path=path, min_offload_bytes=4096) as off:  # opens fine
        loss = _loss("resnet", model, _batch("resnet", 1))
    loss.backward()
    off.close()


def test_context_manager_without_a_path_cleans_up_at_exit(tmp_path):
    """No path and no $SSDOFFLOAD_PATH: a private temporary directory, gone after exit."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        f"import sys; sys.path.insert(0, {repo!r})\n"
        "import os, stat, torch, ssdoffload\n"
        "model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))\n"
        "with ssdoffload.offload(min_offload_bytes=4096) as off:\n"
        "    loss = model(torch.randn(512, 256)).sum()\n"
        "    off.wait()\n"
        "loss.backward()\n"
        "d = os.path.dirname(off.spill_files[0])\n"
        "assert stat.S_IMODE(os.stat(d).st_mode) == 0o700 and off.stats().bytes_written > 0\n"
        "print(d)\n")
    env = {k: v for k, v in os.environ.items() if k != "SSDOFFLOAD_PATH"}
    env["TMPDIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    spill_dir = out.stdout.strip().splitlines()[-1]
    assert spill_dir.startswith(str(tmp_path)) and not os.path.exists(spill_dir)
    assert os.listdir(tmp_path) == []
