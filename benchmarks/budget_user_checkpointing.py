"""Budget mode on a Hugging Face Llama that checkpoints its own layers (or whose blocks are compiled), memory measured from
outside the library (tests/memory_meter.py). Prints the plain (no ssdoffload) peak per step,
then, with a budget, the measured peak per step and its ratio to the budget, and the library's
own peak and count of moments over the budget.

    python benchmarks/budget_user_checkpointing.py ckpt-nonreentrant 0.5        # budget = 0.5 x plain
    python benchmarks/budget_user_checkpointing.py ckpt-reentrant 1 5.2         # budget = 5.2 MiB
    SEQ=512 python benchmarks/budget_user_checkpointing.py compiled-blocks 0.5  # every block compiled
    (modes: plain | ckpt-reentrant | ckpt-nonreentrant | compiled-blocks)
"""
import sys, time, torch, transformers, ssdoffload, tempfile, logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "tests"))
from memory_meter import ActivationMeter
mode = sys.argv[1]  # plain | ckpt-reentrant | ckpt-nonreentrant | compiled-blocks
SEQ = int(__import__("os").environ.get("SEQ", 256))
frac = float(sys.argv[2]) if len(sys.argv) > 2 else 0
def build():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, attn_implementation="eager", use_cache=False)
    m = transformers.LlamaForCausalLM(cfg).train()
    if mode == "compiled-blocks":
        for layer in m.model.layers:
            layer.compile()
    if mode.startswith("ckpt"):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "ckpt-reentrant"})
    return m
def run(budget, steps=4):
    m = build(); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    off = ssdoffload.Offloader(m, ssdoffload.OffloadConfig(path=tempfile.mkdtemp(), memory_budget=budget, min_offload_bytes=4096)) if budget else None
    peaks = []
    for step in range(steps):
        ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(step))
        meter = ActivationMeter(m)
        with meter.measuring(per_op=mode != "compiled-blocks"):
            with (off.step() if off else torch.enable_grad()):
                with meter.saving():
                    loss = m(input_ids=ids, labels=ids).loss
                    loss.backward()
        peaks.append(meter.peak)
        opt.step(); opt.zero_grad()
    st = off.stats() if off else None
    if off: off.close()
    return peaks, st, [p.detach().clone() for p in m.parameters()]
t=time.time()
peaks, _, _ = run(None, 2)
print(mode, "plain peaks MiB", [round(p/2**20,2) for p in peaks], round(time.time()-t,1),"s")
if frac:
    import subprocess
    budget = int(float(sys.argv[3]) * 2**20) if len(sys.argv) > 3 else int(peaks[-1]*frac)
    peaks2, st, _ = run(budget)
    print("budget MiB", round(budget/2**20,2), "measured", [round(p/2**20,2) for p in peaks2], "ratio", [round(p/budget,2) for p in peaks2])
    print("lib peak", st.peak_resident_bytes/2**20, "overruns", st.budget_overruns)
