"""The planner: its activation model against measured pack bytes of the benchmark GPT, the
schedule arithmetic, and the command line."""
import json

import pytest
import torch

import ssdoffload
from ssdoffload import planner
from ssdoffload.models.gpt import GPT, GPTConfig, synthetic_batch
from ssdoffload.planner import Drive, ModelSpec, layer_bytes, plan, spec_profile

SIZES = [  # (hidden, heads, seq, layers, vocab)
    (64, 4, 64, 2, 256),
    (128, 4, 128, 2, 512),
    (256, 8, 96, 3, 1000),
]


def _measured(cfg: GPTConfig, micro_batch: int, dtype):
    """Our own count, independent of the planner's: saved_tensors_hooks, unique storages,
    parameters and autocast copies of parameters left out, bytes by layer."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where = ["other"]
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "other"))
    seen, alive = {}, []

    def from_param(t):
        fn = t.grad_fn
        while fn is not None:
            name = type(fn).__name__
            if name.startswith("ToCopyBackward"):
                return any(type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions if n)
            if name not in ("TBackward0", "ViewBackward0"):
                return False
            fn = fn.next_functions[0][0]
        return False

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and not from_param(t) and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (where[0], st.nbytes())
            alive.append(st)
        return t

    tokens, targets = synthetic_batch(cfg, micro_batch, torch.device("cpu"), 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            model(tokens, targets)
    per_layer = [sum(n for w, n in seen.values() if w == i) for i in range(cfg.layers)]
    return per_layer, sum(n for _, n in seen.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("size", SIZES, ids=[f"h{s[0]}" for s in SIZES])
def test_activation_model_matches_measured_pack_bytes(size, dtype):
    h, a, s, n, v = size
    micro_batch = 3
    cfg = GPTConfig(vocab=v, seq=s, hidden=h, heads=a, layers=n, dropout=0.1)
    per_layer, total = _measured(cfg, micro_batch, dtype)
    spec = ModelSpec(layers=n, hidden=h, heads=a, seq=s, vocab=v, dtype=dtype, flash=False,
                     autocast=dtype == "bf16", device="cpu")
    predicted_layer = sum(layer_bytes(spec, micro_batch).values())
    predicted_total = n * predicted_layer + planner.other_bytes(spec, micro_batch, True, True)
    for i, got in enumerate(per_layer):
        assert abs(predicted_layer - got) <= 0.10 * got, f"layer {i}: predicted {predicted_layer}, measured {got}"
    assert abs(predicted_total - total) <= 0.10 * total, f"predicted {predicted_total}, measured {total}"


def test_profiled_step_matches_the_model():
    spec = ModelSpec(layers=2, hidden=64, heads=4, seq=64, vocab=256, dtype="fp32", flash=False, device="cpu")
    prof = planner.profile_benchmark_gpt(spec, micro_batch=2)
    model = spec_profile(spec)
    assert len(prof.layer_bytes) == 2
    for got in prof.layer_bytes:
        assert got == pytest.approx(model.layer_bytes[0], rel=0.10)
    assert prof.layer_input_bytes == pytest.approx(model.layer_input_bytes, rel=0.01)
    assert prof.forward_seconds > 0 and prof.backward_seconds > 0


def test_megatron_physics():
    """16-bit, flash attention, 1-byte dropout masks: 34·h bytes per token and layer (+5·a·s without flash)."""
    h, a, s = 4096, 32, 2048
    spec = ModelSpec(layers=2, hidden=h, heads=a, seq=s, vocab=50000, dtype="bf16", flash=True)
    per_token = sum(v for k, v in layer_bytes(spec).items() if k not in ("layernorm stats", "softmax stats")) / s
    assert per_token == pytest.approx(34 * h)
    no_flash = ModelSpec(layers=2, hidden=h, heads=a, seq=s, vocab=50000, dtype="bf16", flash=False)
    per_token = sum(v for k, v in layer_bytes(no_flash).items() if k != "layernorm stats") / s
    assert per_token == pytest.approx(34 * h + 5 * a * s)
    tp = ModelSpec(layers=2, hidden=h, heads=a, seq=s, vocab=50000, dtype="bf16", flash=False, tp=4)
    per_token = sum(v for k, v in layer_bytes(tp).items() if k != "layernorm stats") / s
    assert per_token == pytest.approx(h * (10 + 24 / 4) + 5 * a * s / 4)  # Korthikanti et al.


def _spec(**kw):
    base = dict(layers=16, hidden=2048, heads=16, seq=2048, vocab=32000, dtype="bf16", flash=True)
    base.update(kw)
    return ModelSpec(**base)


def test_in_flight_micro_batches_decide_the_micro_batch():
    spec = _spec(pp=4)
    p = plan(spec, budget_gib=20, global_batch=64)
    by_rank = {r["rank"]: r for r in p.ranks}
    assert [by_rank[r]["in_flight"] for r in range(4)] == [4, 3, 2, 1]
    keep = {r: by_rank[r]["options"][0]["micro_batch"] for r in range(4)}
    assert keep[0] <= keep[1] <= keep[2]  # more micro-batches in flight: a smaller micro-batch fits
    per_sample = by_rank[0]["activation_bytes_per_sample"]
    fits = int(20 * (1 << 30) // (4 * per_sample))
    assert keep[0] == max(d for d in range(1, fits + 1) if 64 % d == 0)  # fits and divides 64
    assert p.option("keep").micro_batch == min(keep.values())
    # recompute and ssd fit more than keep
    assert p.option("recompute").micro_batch > p.option("keep").micro_batch
    assert p.option("ssd").micro_batch > p.option("keep").micro_batch
    assert p.option("ssd+keep").micro_batch >= p.option("keep").micro_batch


def test_bubble_bandwidth_and_endurance():
    spec = _spec(pp=2, layers=8, hidden=8192, heads=64)
    drive = Drive(write_gbps=1000.0, read_gbps=1000.0, tbw=7000.0)
    p = plan(spec, budget_gib=40, global_batch=64, drive=drive, tflops=400)
    ssd = p.option("ssd")
    assert ssd.num_microbatches == -(-64 // ssd.micro_batch)
    assert ssd.bubble == pytest.approx(1 / (ssd.num_microbatches + 1))
    # hiding needs activation bytes / forward time; a fast drive stalls nothing
    assert ssd.write_gbps_needed > 0 and ssd.read_gbps_needed == pytest.approx(ssd.write_gbps_needed / 2)
    assert ssd.stall_seconds_per_step == 0 and ssd.hidden_fraction == 1.0
    assert ssd.tb_per_day > 0 and ssd.drive_life_days == pytest.approx(7000.0 / ssd.tb_per_day)
    slow = plan(spec, budget_gib=40, global_batch=64, drive=Drive(write_gbps=1.0, read_gbps=1.0), tflops=400)
    s = slow.option("ssd")
    assert s.micro_batch == ssd.micro_batch
    assert s.stall_seconds_per_step > 0 and s.hidden_fraction < 1
    assert slow.option("ssd+keep").stall_seconds_per_step == pytest.approx(0, abs=1e-9)
    # DWPD and capacity give the same endurance as the equivalent TBW
    assert Drive(dwpd=1.0, capacity_tb=3.84, warranty_years=5).endurance_tb == pytest.approx(3.84 * 365 * 5)


def test_gpu_memory_takes_off_the_model_state():
    spec = _spec()
    a = plan(spec, budget_gib=30)
    b = plan(spec, gpu_memory_gib=40, bytes_per_param=18, reserve_gib=2)
    params = spec.params
    assert b.inputs["budget_bytes"] == pytest.approx(40 * (1 << 30) - params * 18 - 2 * (1 << 30), rel=1e-6)
    assert (b.option("keep").micro_batch <= a.option("keep").micro_batch) == (b.inputs["budget_bytes"] <= 30 * (1 << 30))


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="pp"):
        _spec(pp=3)
    with pytest.raises(ValueError, match="dtype"):
        _spec(dtype="int8")
    with pytest.raises(ValueError, match="budget"):
        plan(_spec())


def test_lazy_public_entry_point():
    assert ssdoffload.plan is planner.plan


def test_cli_table_and_json(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc = planner.main(["--layers", "8", "--hidden", "1024", "--heads", "16", "--seq", "1024",
                       "--vocab", "32000", "--pp", "2", "--budget", "10", "--global-batch", "32",
                       "--write-gbps", "5", "--read-gbps", "7", "--tbw", "3500", "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("keep", "recompute", "ssd", "ssd+keep", "bubble", "TB/day"):
        assert word in text
    data = json.loads(out.read_text())
    assert {o["strategy"] for o in data["options"]} == {"keep", "recompute", "ssd", "ssd+keep"}
    assert data["in_flight_microbatches"] in (1, 2) and len(data["ranks"]) == 2
    rc = planner.main(["--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "64", "--vocab", "256",
                       "--dtype", "fp32", "--no-flash", "--device", "cpu", "--profile", "--budget", "1", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["profile"]["source"].startswith("profiled step")


def test_cli_errors_and_help(capsys):
    assert planner.main(["--layers", "8", "--pp", "3"]) == 2
    assert "error" in capsys.readouterr().err
    # A budget given in bytes where GiB are asked for, and a GPU the model state alone fills.
    assert planner.main(["--budget", "40e9"]) == 2
    assert "is in GiB" in capsys.readouterr().err
    assert planner.main(["--gpu-memory", "1"]) == 2
    assert "nothing of the GPU's 1 GiB is left for activations" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        planner.main(["--help"])
    assert exc.value.code == 0
    assert "--write-gbps" in capsys.readouterr().out


def test_probe_drive(tmp_path):
    d = planner.probe_drive(str(tmp_path), nbytes=8 << 20)
    assert d.write_gbps > 0 and d.read_gbps > 0
    assert list(tmp_path.iterdir()) == []


def test_micro_batches_multiply_to_the_per_replica_batch():
    """The README example chose 29 x 3 and 3 x 22 for a batch of 64 per replica."""
    from ssdoffload.planner import ModelSpec, plan

    spec = ModelSpec(layers=32, hidden=4096, heads=32, seq=4096, vocab=50304, pp=4, schedule="1f1b")
    result = plan(spec, gpu_memory_gib=80, global_batch=512, dp=8)
    options = [o for r in result.ranks for o in r["options"]]
    assert len(options) >= 4
    for o in options:
        if o["micro_batch"] > 0:
            assert o["micro_batch"] * o["num_microbatches"] == 64, o
    with pytest.raises(ValueError, match="multiple of dp"):
        plan(spec, gpu_memory_gib=80, global_batch=100, dp=8)


def test_layer_plan_answers_the_budget_question_before_a_run(capsys):
    """``plan --layer-plan``: budget mode's per-layer choices for the budget, at the largest
    micro-batch dividing the batch that fits; a smaller budget fits a smaller micro-batch or
    needs more of the cheaper-in-memory choices."""
    from ssdoffload.planner.cli import main as plan_main

    def run(budget):
        rc = plan_main(["--layers", "8", "--hidden", "1024", "--seq", "8192", "--budget", str(budget),
                        "--global-batch", "8", "--layer-plan", "--json"])
        assert rc == 0
        return json.loads(capsys.readouterr().out)["layer_plan"]

    roomy, tight = run(64), run(4)
    assert roomy["micro_batch"] is not None and tight["micro_batch"] is not None
    assert 8 % roomy["micro_batch"] == 0 and 8 % tight["micro_batch"] == 0
    assert tight["micro_batch"] <= roomy["micro_batch"]
    assert tight["predicted_peak_bytes"] <= 4 * 2**30 and roomy["predicted_peak_bytes"] <= 64 * 2**30
    kept = lambda p: sum(1 for c in p["choices"][1::2] if c == "device")  # noqa: E731
    assert kept(tight) <= kept(roomy)
    assert run(0.001)["micro_batch"] is None
