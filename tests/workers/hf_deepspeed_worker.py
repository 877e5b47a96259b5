"""The HF Trainer with its own DeepSpeed config (ZeRO 0, CPU, one rank over gloo): the same run
without and with an ``"ssd_offload"`` block read by ``SSDOffloadCallback()``; writes a JSON
report (weights equal? bytes offloaded?) to argv[1]."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from ssdoffload.integrations.huggingface import SSDOffloadCallback  # noqa: E402
from ssdoffload.io import _native  # noqa: E402

_native.install_crash_handler()  # a rank killed by a signal prints its native stack too


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def train(net, out_dir, block, callbacks):
    ids = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(1))
    ds = [{"input_ids": r, "labels": r.clone()} for r in ids]
    conf = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "zero_optimization": {"stage": 0}}
    if block is not None:
        conf["ssd_offload"] = block
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=3, learning_rate=1e-3, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, deepspeed=conf)
    Trainer(model=net, args=args, train_dataset=ds, callbacks=callbacks).train()


report_path, spill = sys.argv[1], sys.argv[2]
plain, offloaded = model(), model()
train(plain, os.path.join(spill, "out-plain"), None, [])
cb = SSDOffloadCallback()
train(offloaded, os.path.join(spill, "out-ssd"), {"enabled": True, "path": os.path.join(spill, "{rank}"),
                                                  "min_offload_bytes": 4096, "policy": "all"}, [cb])
same = all(torch.equal(p, q) for p, q in zip(plain.parameters(), offloaded.parameters()))
left = [f for r, _, fs in os.walk(spill) for f in fs if f.startswith("ssdoffload-")]
with open(report_path, "w") as f:
    json.dump({"same": same, "tensors_offloaded": cb.stats.tensors_offloaded, "left": left}, f)
