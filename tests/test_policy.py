"""``ssdoffload.policy``: which saved tensors are offloaded, and why the others are kept.

Real modules and tensors, no mocks. Where the question is "what does the offloader see", the
tensors come from ``saved_tensors_hooks`` around a real forward (what autograd actually saves),
and ``decide`` runs on them exactly as the pack hook calls it. Where a tensor is kept for a
reason that depends on the model's storages, the same tensor is also shown to be offloaded
without them, so each test fails if the rule it names stops applying.
"""
import torch
import torch.nn.functional as F
import pytest
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssdoffload.layers import in_backward
from ssdoffload.policy import Decision, decide, parameter_storages, saved_nbytes
from ssdoffload.views import storage_key

NO_KEYS = frozenset()


def _saved_by(fn):
    """The tensors autograd saves while ``fn()`` runs (each pack call, in order), and fn's result."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def _same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _activation(*shape):
    """A non-leaf tensor that requires grad: an ordinary intermediate result."""
    return torch.randn(*shape, requires_grad=True) * 1


class Sub(torch.Tensor):
    """A plain Python subclass (no ``__torch_dispatch__``)."""


# -- Decision ------------------------------------------------------------------------------

def test_decision_values_are_distinct_reasons():
    # The stats count kept bytes per ``decision.value``: two members with one value would be
    # aliases of each other (Enum) and their bytes would be counted under one reason.
    values = [d.value for d in Decision.__members__.values()]
    assert len(values) == len(set(values)) == 9
    assert Decision.OFFLOAD.value == "offload"


# -- ordinary activations ------------------------------------------------------------------

def test_mlp_activations_are_offloaded_and_its_weights_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    keys = parameter_storages([model])
    x = torch.randn(16, 64)
    saved, _ = _saved_by(lambda: model(x))
    second = model[2]
    decisions = {}
    for t in saved:
        decisions.setdefault(tuple(t.shape), set()).add(decide(t, keys, 0, False))
    # Linear 1 saves its input x (for its weight's gradient; x needs none, so W1 is not saved);
    # GELU and Linear 2 save Linear 1's output (16, 128); Linear 2 saves W2.t(), a view.
    assert decisions == {
        (16, 64): {Decision.OFFLOAD},
        (16, 128): {Decision.OFFLOAD},
        (128, 32): {Decision.PARAMETER},
    }
    weight_views = [t for t in saved if t._base is not None]
    assert len(weight_views) == 1 and weight_views[0]._base is second.weight


def test_an_activation_is_offloaded_with_or_without_the_model_keys():
    a = _activation(32, 32)
    keys = parameter_storages([nn.Linear(32, 32)])
    assert decide(a, keys, 0, False) is Decision.OFFLOAD
    assert decide(a, NO_KEYS, 4096, False) is Decision.OFFLOAD      # 4096 bytes: not below
    assert decide(a.detach(), NO_KEYS, 0, False) is Decision.OFFLOAD  # no grad needed either


# -- parameters and their views ------------------------------------------------------------

def test_parameters_are_never_offloaded():
    lin = nn.Linear(256, 256)
    for p in (lin.weight, lin.bias):
        # recognised by what they are, even with no model keys and any threshold
        assert decide(p, NO_KEYS, 0, False) is Decision.PARAMETER
        assert decide(p, NO_KEYS, 1 << 40, False) is Decision.PARAMETER  # not TOO_SMALL


def test_frozen_parameter_is_a_parameter():
    # PEFT's frozen base weights: nn.Parameter with requires_grad=False (no AccumulateGrad).
    lin = nn.Linear(256, 256)
    lin.weight.requires_grad_(False)
    assert decide(lin.weight, NO_KEYS, 0, False) is Decision.PARAMETER
    assert decide(lin.weight.t(), NO_KEYS, 0, False) is Decision.PARAMETER


def test_a_fresh_parameter_object_is_recognised_at_pack_time():
    # FSDP2 makes new nn.Parameter objects during forward: they are in no key set.
    w = nn.Parameter(torch.randn(128, 128))
    keys = parameter_storages([nn.Linear(128, 128)])
    assert decide(w, keys, 0, False) is Decision.PARAMETER


@pytest.mark.parametrize("view", [
    lambda w: w.t(),
    lambda w: w[3:17],
    lambda w: w[:, 5],
    lambda w: w.view(-1),
    lambda w: w.t()[2:],
], ids=["transpose", "row_slice", "column", "flatten", "slice_of_transpose"])
def test_autograd_views_of_a_parameter_are_kept_by_their_base(view):
    lin = nn.Linear(64, 64)
    v = view(lin.weight)
    assert v._base is lin.weight and v.grad_fn is not None  # a real view with history
    assert decide(v, NO_KEYS, 0, False) is Decision.PARAMETER


@pytest.mark.parametrize("alias", [
    lambda w: w.detach(),
    lambda w: w.data,
    lambda w: w.detach()[10:],           # offset into the storage: keyed by storage, not data_ptr
    lambda w: w.data.t()[1:, 3:],
], ids=["detach", "data", "slice_of_detach", "slice_of_data_t"])
def test_detached_aliases_of_a_parameter_are_kept_by_the_model_keys(alias):
    lin = nn.Linear(64, 64)
    a = alias(lin.weight)
    assert _same_storage(a, lin.weight)
    # Nothing about the alias itself says "parameter": no grad, no base that is one ...
    assert not a.requires_grad and (a._base is None or not a._base.requires_grad)
    assert decide(a, NO_KEYS, 0, False) is Decision.OFFLOAD
    # ... only the model's storage keys do.
    assert decide(a, parameter_storages([lin]), 0, False) is Decision.PARAMETER


def test_a_leaf_that_requires_grad_is_kept_as_the_user_holds_it():
    x = torch.randn(64, 64, requires_grad=True)
    assert decide(x, NO_KEYS, 0, False) is Decision.PARAMETER
    assert decide(x[1:], NO_KEYS, 0, False) is Decision.PARAMETER
    assert decide(x * 1, NO_KEYS, 0, False) is Decision.OFFLOAD  # its result is an activation


def test_a_copy_of_a_parameter_is_not_a_parameter():
    lin = nn.Linear(64, 64)
    assert decide(lin.weight.detach().clone(), parameter_storages([lin]), 0, False) is Decision.OFFLOAD
    assert decide(lin.weight * 2, parameter_storages([lin]), 0, False) is Decision.OFFLOAD


# -- buffers -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_running_stats_saved_for_backward_are_kept(mode):
    bn = nn.BatchNorm1d(1024)  # 4 KiB per running stat
    getattr(bn, mode)()
    keys = parameter_storages([bn])
    saved, _ = _saved_by(lambda: bn(_activation(8, 1024)))
    stats = [t for t in saved if any(_same_storage(t, b) for b in (bn.running_mean, bn.running_var))]
    assert len(stats) == 2, "batch_norm no longer saves its running stats: the test needs a new buffer"
    for t in stats:
        assert not t.requires_grad and t._base is None   # plain tensors: only the keys tell
        assert decide(t, keys, 4096, False) is Decision.PARAMETER
        assert decide(t, NO_KEYS, 4096, False) is Decision.OFFLOAD
    # the saved input is an activation, whatever the keys
    (inp,) = [t for t in saved if t.shape == (8, 1024)]
    assert decide(inp, keys, 0, False) is Decision.OFFLOAD


def test_a_registered_buffer_used_in_forward_is_kept():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.rand(256, 256) + 0.5)

        def forward(self, x):
            return x * self.scale

    m = Scaled()
    saved, _ = _saved_by(lambda: m(_activation(256, 256)))
    (buf,) = [t for t in saved if _same_storage(t, m.scale)]
    assert decide(buf, parameter_storages([m]), 0, False) is Decision.PARAMETER
    assert decide(buf, NO_KEYS, 0, False) is Decision.OFFLOAD


# -- autocast ------------------------------------------------------------------------------

def test_autocast_weight_copy_is_kept_as_such():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    keys = parameter_storages([lin])
    x = _activation(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, out = _saved_by(lambda: lin(x))
        again, _ = _saved_by(lambda: lin(x))
    assert out.dtype == torch.bfloat16
    by_shape = {tuple(t.shape): t for t in saved}
    assert set(by_shape) == {(8, 64), (64, 32)}
    x_copy, w_copy = by_shape[(8, 64)], by_shape[(64, 32)]
    assert x_copy.dtype == w_copy.dtype == torch.bfloat16
    # The weight copy is a new bf16 storage, not the parameter's: the model keys do not
    # catch it ...
    assert not _same_storage(w_copy, lin.weight) and storage_key(w_copy) not in keys
    # ... and autocast's cache hands the same copy to the next op in the region (which is why
    # offloading it would free nothing).
    assert _same_storage(dict((tuple(t.shape), t) for t in again)[(64, 32)], w_copy)
    assert decide(w_copy, keys, 0, False) is Decision.AUTOCAST_PARAMETER_COPY
    assert decide(w_copy, NO_KEYS, 0, False) is Decision.AUTOCAST_PARAMETER_COPY
    assert decide(w_copy._base, keys, 0, False) is Decision.AUTOCAST_PARAMETER_COPY
    # The input's cast is an activation.
    assert decide(x_copy, keys, 0, False) is Decision.OFFLOAD


def test_a_cast_of_an_activation_is_not_an_autocast_parameter_copy():
    a = _activation(64, 64)
    c = a.to(torch.bfloat16)
    assert type(c.grad_fn).__name__ == "ToCopyBackward0"
    assert decide(c, NO_KEYS, 0, False) is Decision.OFFLOAD
    # the same cast of a parameter is one
    p = nn.Parameter(torch.randn(64, 64))
    assert decide(p.to(torch.bfloat16), NO_KEYS, 0, False) is Decision.AUTOCAST_PARAMETER_COPY


def test_autocast_copy_wins_over_too_small():
    p = nn.Parameter(torch.randn(4))
    assert decide(p.to(torch.bfloat16), NO_KEYS, 1 << 20, False) is Decision.AUTOCAST_PARAMETER_COPY


# -- min_offload_bytes ---------------------------------------------------------------------

def test_below_min_offload_bytes_is_kept_as_too_small():
    a = _activation(1024)  # a 4096-byte storage
    assert decide(a, NO_KEYS, 4096, False) is Decision.OFFLOAD
    assert decide(a, NO_KEYS, 4097, False) is Decision.TOO_SMALL
    assert decide(a, NO_KEYS, 1 << 20, False) is Decision.TOO_SMALL


def test_size_is_the_storage_not_the_view():
    big = _activation(4096)  # 16 KiB storage
    small_view = big[:2]     # 8 bytes of it
    assert small_view._base is big
    assert decide(small_view, NO_KEYS, 4096, False) is Decision.OFFLOAD
    assert decide(big[:2].clone(), NO_KEYS, 4096, False) is Decision.TOO_SMALL


def test_empty_storage_is_too_small_even_with_no_threshold():
    e = _activation(0)
    assert saved_nbytes(e) == 0
    assert decide(e, NO_KEYS, 0, False) is Decision.TOO_SMALL
    assert decide(_activation(1), NO_KEYS, 0, False) is Decision.OFFLOAD  # 4 bytes is enough


def test_parameter_reason_wins_over_too_small():
    tiny = nn.Linear(2, 2)
    assert decide(tiny.weight, NO_KEYS, 1 << 20, False) is Decision.PARAMETER
    assert decide(tiny.weight.detach(), parameter_storages([tiny]), 1 << 20, False) is Decision.PARAMETER
    assert decide(tiny.weight.detach(), NO_KEYS, 1 << 20, False) is Decision.TOO_SMALL


# -- saved during backward -----------------------------------------------------------------

def _decisions_by_phase(fn, keys=NO_KEYS):
    """Run ``fn`` under pack hooks that decide as the offloader does; returns
    [(in_backward, decision, tensor)] per pack."""
    seen = []

    def pack(t):
        flag = in_backward()
        seen.append((flag, decide(t, keys, 0, flag), t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


def test_tensors_saved_by_double_backward_are_kept_in_backward():
    x = _activation(256)

    def run():
        y = (x ** 3).sum()                             # forward: saves x (and the exponent)
        (g,) = torch.autograd.grad(y, x, create_graph=True)  # backward builds a graph: saves again
        g.sum().backward()

    seen = _decisions_by_phase(run)
    forward = [d for flag, d, _ in seen if not flag]
    backward = [(d, t) for flag, d, t in seen if flag]
    assert forward and backward
    assert Decision.OFFLOAD in forward and Decision.IN_BACKWARD not in forward
    assert {d for d, _ in backward} == {Decision.IN_BACKWARD}
    # the same tensors outside backward would have been offloaded: the flag is the reason
    assert any(decide(t, NO_KEYS, 0, False) is Decision.OFFLOAD for _, t in backward)


def test_reentrant_checkpoint_recompute_is_kept_in_backward():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    keys = parameter_storages([block])
    x = _activation(16, 64)

    def run():
        checkpoint(block, x, use_reentrant=True).sum().backward()

    seen = _decisions_by_phase(run, keys)
    backward = [(d, t) for flag, d, t in seen if flag]
    assert backward, "reentrant checkpoint recompute saved nothing during backward"
    assert {d for d, _ in backward} == {Decision.IN_BACKWARD}
    recomputed_activations = [t for _, t in backward if decide(t, keys, 0, False) is Decision.OFFLOAD]
    assert recomputed_activations  # without the flag, the recomputed GELU input would go out


def test_in_backward_wins_over_every_other_reason():
    lin = nn.Linear(8, 8)
    keys = parameter_storages([lin])
    for t in (lin.weight, lin.weight.t(), lin.weight.detach(), torch.randn(100).as_subclass(Sub),
              torch.empty(0), _activation(1024)):
        assert decide(t, keys, 1 << 20, True) is Decision.IN_BACKWARD


# -- tensor kinds --------------------------------------------------------------------------

def test_python_subclass_is_unsupported_even_when_saved_by_autograd():
    s = _activation(1024).as_subclass(Sub)
    saved, _ = _saved_by(lambda: (s * s).sum())
    assert saved and all(type(t) is Sub for t in saved)
    for t in saved:
        assert decide(t, NO_KEYS, 0, False) is Decision.UNSUPPORTED
    # the same bytes as a plain tensor would go out
    assert decide(saved[0].as_subclass(torch.Tensor), NO_KEYS, 0, False) is Decision.OFFLOAD


def test_wrapper_subclass_is_unsupported():
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    t = two_tensor.TwoTensor(torch.randn(1024), torch.randn(1024))
    assert decide(t, NO_KEYS, 0, False) is Decision.UNSUPPORTED


def test_parameter_subclass_is_a_parameter():
    # bitsandbytes-style Parameter subclasses pass the tensor-kind check as parameters.
    class MyParam(nn.Parameter):
        pass

    p = MyParam(torch.randn(64, 64))
    assert type(p) is MyParam
    assert decide(p, NO_KEYS, 0, False) is Decision.PARAMETER


@pytest.mark.parametrize("make", [
    lambda: torch.randn(64, 64).to_sparse(),
    lambda: torch.randn(64, 64).to_sparse_csr(),
    lambda: torch.nested.nested_tensor([torch.randn(20, 8), torch.randn(30, 8)]),
    lambda: torch.nested.nested_tensor([torch.randn(20, 8), torch.randn(30, 8)], layout=torch.jagged),
    lambda: torch.empty(64, 64, device="meta"),
], ids=["sparse_coo", "sparse_csr", "nested", "nested_jagged", "meta"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_strided_and_meta_tensors_are_unsupported(make):
    t = make()
    assert decide(t, NO_KEYS, 0, False) is Decision.UNSUPPORTED


def test_unsupported_wins_over_parameter_and_too_small():
    lin = nn.Linear(8, 8)
    keys = parameter_storages([lin])
    # a subclass view of a parameter's storage, tiny: still reported as unsupported
    alias = lin.weight.detach().as_subclass(Sub)
    assert decide(alias, keys, 1 << 20, False) is Decision.UNSUPPORTED


# -- parameter_storages --------------------------------------------------------------------

def test_parameter_storages_are_every_parameter_and_buffer_storage():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Sequential(nn.Linear(32, 4)))
    keys = parameter_storages([model])
    tensors = list(model.parameters()) + list(model.buffers())
    assert len(tensors) == 2 + 5 + 2   # BatchNorm: weight, bias, running_mean, running_var, num_batches_tracked
    assert keys == {storage_key(t) for t in tensors}
    assert keys == {storage_key(t) for t in tensors}
    assert len(keys) == len(tensors)


def test_parameter_storages_dedups_tied_weights_and_unions_modules():
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight                       # tied
    other = nn.Linear(4, 4)
    assert parameter_storages([emb, head]) == {storage_key(emb.weight)}
    both = parameter_storages([emb, head, other])
    assert both == {storage_key(emb.weight), storage_key(other.weight), storage_key(other.bias)}
    assert parameter_storages([]) == set()
    assert parameter_storages([nn.ReLU()]) == set()


def test_parameter_storages_follow_the_storage_not_the_tensor_object():
    lin = nn.Linear(8, 8)
    keys = parameter_storages([lin])
    before = storage_key(lin.weight)
    with torch.no_grad():
        lin.weight.mul_(2)                     # in place: same storage, still a key
    assert storage_key(lin.weight) == before and before in keys
    lin.weight = nn.Parameter(torch.randn(8, 8))   # a new storage: the old set does not know it
    assert storage_key(lin.weight) not in keys
    assert storage_key(lin.weight) in parameter_storages([lin])


# -- saved_nbytes --------------------------------------------------------------------------

def test_saved_nbytes_is_the_whole_storage():
    t = torch.randn(100, 10)
    assert saved_nbytes(t) == 4000
    assert saved_nbytes(t[:1]) == 4000         # a view counts its storage, not its elements
    assert saved_nbytes(t.t()) == 4000
    assert saved_nbytes(t.to(torch.bfloat16)) == 2000
    assert saved_nbytes(torch.zeros(3, dtype=torch.int64)) == 24
    assert saved_nbytes(torch.empty(0)) == 0


def test_saved_nbytes_matches_what_decide_compares():
    # the byte count in the stats and the TOO_SMALL threshold use the same number
    a = _activation(1000)
    n = saved_nbytes(a)
    assert n == 4000
    assert decide(a, NO_KEYS, n, False) is Decision.OFFLOAD
    assert decide(a, NO_KEYS, n + 1, False) is Decision.TOO_SMALL


@pytest.mark.parametrize("make", [
    lambda: torch.randn(64, 64).to_sparse(),
    lambda: torch.randn(64, 64).to_sparse_csr(),
], ids=["sparse_coo", "sparse_csr"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_saved_nbytes_is_zero_without_a_storage(make):
    t = make()
    with pytest.raises((RuntimeError, NotImplementedError)):
        t.untyped_storage()
    assert saved_nbytes(t) == 0


def test_saved_nbytes_of_a_python_subclass_is_its_storage():
    assert saved_nbytes(torch.randn(250).as_subclass(Sub)) == 1000


def test_hook_visible_tensors_report_their_storage_bytes():
    lin = nn.Linear(64, 32)
    x = _activation(8, 64)
    saved, _ = _saved_by(lambda: F.gelu(lin(x)))
    assert sorted(saved_nbytes(t) for t in saved) == sorted([8 * 64 * 4, 64 * 32 * 4, 8 * 32 * 4])


def test_an_empty_parameter_does_not_make_empty_activations_parameters():
    """Every empty storage has address 0: a zero-size parameter must not make an empty saved
    tensor look like a parameter (it is kept as too small, the reason the stats should give)."""
    module = torch.nn.Module()
    module.empty = torch.nn.Parameter(torch.empty(0))
    module.w = torch.nn.Parameter(torch.randn(3))
    keys = parameter_storages([module])
    assert keys == {storage_key(module.w)}
    activation = torch.randn(4)[:0] * 2
    assert decide(activation, keys, 1, False) is Decision.TOO_SMALL


def test_classify_uses_the_one_storage_key_rule():
    """The pack hook's fast path computes the storage key inline (it runs for every saved
    tensor); it must be exactly ``views.storage_key`` — the key the cache, the kept-bytes
    counter and the parameter set are built with."""
    from ssdoffload.policy import classify

    base = torch.randn(64, 64)
    for t in (base, base.t(), base[3:], base.detach(), torch.randn(2, 3, 4).permute(2, 0, 1),
              torch.empty(0), torch.randn(5, dtype=torch.float64)[1:]):
        decision, key, _ = classify(t, {("never", 0)}, 0, False)
        assert key == storage_key(t), t.shape
