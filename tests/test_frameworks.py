"""The one-line integrations (issue 12, item 5): a tiny random Llama trained through the
Hugging Face ``Trainer``, accelerate and Lightning, with gradient accumulation, compared with
the same run without offloading: the trained weights must be bit-identical."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ssdoffload.store import FILE_PREFIX  # noqa: E402

SEQ, VOCAB = 32, 128


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).train()


def _samples(n=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name} differs after training"


def _no_hooks_installed():
    """No saved-tensor hooks left on this thread's stack (an unbalanced push would route every
    later forward of the process through a closed offloader)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def _no_spill_files(d):
    assert not os.path.isdir(d) or not [n for n in os.listdir(d) if n.startswith(FILE_PREFIX)]


# -- Hugging Face Trainer ------------------------------------------------------------------
def _hf_train(model, tmp_path, callbacks, max_steps=3):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=max_steps, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_samples(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_hf_trainer_callback(tmp_path):
    from ssdoffload.integrations.huggingface import SSDOffloadCallback

    plain, offloaded = _llama(), _llama()
    _hf_train(plain, tmp_path, [])
    cb = SSDOffloadCallback(path=str(tmp_path / "act"), min_offload_bytes=4096, policy="all")
    _hf_train(offloaded, tmp_path, [cb])
    _same_weights(plain, offloaded)
    assert cb.stats.tensors_offloaded > 0 and cb.stats.steps >= 5  # 3 steps x 2 micro-batches
    assert cb.offloader is None
    _no_spill_files(str(tmp_path / "act"))


def test_hf_trainer_exception_in_forward_leaves_nothing_open(tmp_path):
    from ssdoffload.integrations.huggingface import SSDOffloadCallback

    model = _llama()
    calls = [0]

    def fail_on_third(module, args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure in forward")

    h = model.model.layers[1].register_forward_pre_hook(fail_on_third)
    cb = SSDOffloadCallback(path=str(tmp_path / "act"), min_offload_bytes=4096, policy="all")
    with pytest.raises(RuntimeError, match="injected failure"):
        _hf_train(model, tmp_path, [cb])
    h.remove()
    off = cb.offloader
    assert off.position.scope is None, "the failed forward left its scope open"
    assert _no_hooks_installed(), "the failed forward left the saved-tensor hooks pushed"
    # train() again: the callback starts clean and the run is exact.
    model2, ref = _llama(), _llama()
    _hf_train(ref, tmp_path, [])
    _hf_train(model2, tmp_path, [cb])
    _same_weights(ref, model2)


# -- accelerate ----------------------------------------------------------------------------
def _accelerate_train(model, path=None):
    accelerate = pytest.importorskip("accelerate")
    from ssdoffload.integrations.accelerate import offload_activations

    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(_samples(), batch_size=4, shuffle=False,
                                         collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    model, opt, loader = acc.prepare(model, opt, loader)
    off = offload_activations(acc, model, path=path, min_offload_bytes=4096, policy="all") if path else None
    for batch in loader:
        with acc.accumulate(model):
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
    stats = off.stats() if off is not None else None
    if off is not None:
        off.close()
    return stats


def test_accelerate_one_call(tmp_path):
    plain, offloaded = _llama(), _llama()
    _accelerate_train(plain)
    stats = _accelerate_train(offloaded, str(tmp_path / "act"))
    _same_weights(plain, offloaded)
    assert stats.tensors_offloaded > 0
    _no_spill_files(str(tmp_path / "act"))


# -- Lightning -----------------------------------------------------------------------------
def _lightning_train(model, tmp_path, callbacks, fail_at=None):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            if fail_at is not None and batch_idx == fail_at:
                raise RuntimeError("injected failure in training_step")
            return self.net(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    loader = torch.utils.data.DataLoader(_samples(), batch_size=4, shuffle=False,
                                         collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    trainer = lightning.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", devices=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=callbacks,
                                default_root_dir=str(tmp_path / "pl"))
    trainer.fit(Module(model), loader)


def test_lightning_callback(tmp_path):
    pytest.importorskip("lightning")
    from ssdoffload.integrations.lightning import SSDOffloadCallback

    plain, offloaded = _llama(), _llama()
    _lightning_train(plain, tmp_path, [])
    cb = SSDOffloadCallback(path=str(tmp_path / "act"), min_offload_bytes=4096, policy="all")
    _lightning_train(offloaded, tmp_path, [cb])
    _same_weights(plain, offloaded)
    assert cb.stats.tensors_offloaded > 0 and cb.offloader is None
    _no_spill_files(str(tmp_path / "act"))


def test_lightning_exception_closes_the_step(tmp_path):
    pytest.importorskip("lightning")
    from ssdoffload.integrations.lightning import SSDOffloadCallback

    cb = SSDOffloadCallback(path=str(tmp_path / "act"), min_offload_bytes=4096, policy="all")
    model = _llama()
    with pytest.raises(RuntimeError, match="injected failure"):
        _lightning_train(model, tmp_path, [cb], fail_at=3)
    assert cb.offloader is None and cb._scope is None
    _no_spill_files(str(tmp_path / "act"))
    assert _no_hooks_installed(), "the failed step left the saved-tensor hooks pushed"


@pytest.mark.slow
def test_hf_trainer_with_its_own_deepspeed_config_honours_the_block(tmp_path):
    """The Trainer calls ``deepspeed.initialize`` itself; ``SSDOffloadCallback()`` reads the
    ``ssd_offload`` block from that config. One rank over gloo on the CPU (DS_ACCELERATOR=cpu)."""
    import json
    import socket
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = tmp_path / "report.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}",
           os.path.join(root, "tests", "workers", "hf_deepspeed_worker.py"), str(report), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and report.exists(), proc.stderr[-6000:]
    got = json.loads(report.read_text())
    assert got["same"], "weights differ from the same DeepSpeed Trainer run without offloading"
    assert got["tensors_offloaded"] > 0 and got["left"] == []


def test_hf_callback_without_settings_needs_the_block(tmp_path):
    from ssdoffload.integrations.huggingface import SSDOffloadCallback

    with pytest.raises(ValueError, match="no DeepSpeed config"):
        _hf_train(_llama(), tmp_path, [SSDOffloadCallback()])


@pytest.mark.parametrize("use_cache", [False, True])
def test_hf_trainer_in_budget_mode(tmp_path, use_cache):
    """Budget mode through the Trainer callback (one scope per forward, gradient accumulation):
    trained weights bit-identical to plain training, whatever the plan (with use_cache=False
    the layers may be recomputed; with a KV cache they never are)."""
    from ssdoffload.integrations.huggingface import SSDOffloadCallback

    plain, offloaded = _llama(), _llama()
    plain.config.use_cache = offloaded.config.use_cache = use_cache
    _hf_train(plain, tmp_path, [], max_steps=4)
    # 800 kB: below keeping everything, above one layer's working set.
    cb = SSDOffloadCallback(path=str(tmp_path / "act"), min_offload_bytes=4096, memory_budget=800_000)
    _hf_train(offloaded, tmp_path, [cb], max_steps=4)
    _same_weights(plain, offloaded)
    assert cb.stats.tensors_offloaded > 0 and cb.stats.replans >= 1
    # The budget is met through the Trainer's loop too (it was not while recomputed layers'
    # inputs leaked from step to step: releases.py, a double watch).
    assert cb.stats.peak_resident_bytes <= 800_000 and cb.stats.budget_overruns == 0
    _no_spill_files(str(tmp_path / "act"))


@pytest.mark.parametrize("late", [False, True], ids=["completions-as-they-come", "completions-late"])
def test_hf_trainer_recompute_plan_releases_each_steps_inputs(tmp_path, late):
    """A plan that recomputes layers, one with its input on the SSD, pinned through the Trainer
    (gradient accumulation: two forwards per optimizer step): each micro-batch's inputs and
    entries are released once its graph is gone, so nothing is resident between steps and the
    budget holds; weights bit-identical. The same outcome whatever the machine's speed: also
    with the engine's writes seen done only when forward waits for them (``LateCompletions``,
    the ordering of a busy machine, where a stale back-pressure answer once counted an
    overrun at 786,432 of 800,000 bytes: issue 21)."""
    from transformers import TrainerCallback

    from helpers import LateCompletions

    from ssdoffload.integrations.huggingface import SSDOffloadCallback

    plain, offloaded = _llama(), _llama()
    plain.config.use_cache = offloaded.config.use_cache = False
    _hf_train(plain, tmp_path, [], max_steps=4)
    cb = SSDOffloadCallback(path=str(tmp_path / "act"), min_offload_bytes=4096, memory_budget=800_000)
    plan = ["device", "recompute", "device", "recompute+ssd", "device", "ssd", "device"]
    seen = {"resident": [], "recomputed": []}
    engine = LateCompletions(late)

    class Pin(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            off = cb.offloader
            if not seen["resident"]:
                engine.install(off)
            seen["resident"].append(off.last_step_stats().resident_bytes)
            if state.global_step == 1:  # after a measured step
                off.set_plan(plan)
                seen["recomputed"] = sorted(off.recomputed.indices)

    _hf_train(offloaded, tmp_path, [cb, Pin()], max_steps=4)
    _same_weights(plain, offloaded)
    assert seen["recomputed"] == [0, 1]
    assert seen["resident"] == [0, 0, 0, 0]
    assert cb.stats.peak_resident_bytes <= 800_000
    assert (cb.stats.budget_overruns, cb.stats.budget_diversions) == (0, 0)
    assert engine.writes > 0
    _no_spill_files(str(tmp_path / "act"))
