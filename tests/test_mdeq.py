"""Tests for model_zoo/mdeq.py: the MDEQ classifier's architecture (spec section 1), its
initialisation quirk, variational dropout and input validation."""
import math
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import model_zoo as mz
from model_zoo.mdeq import MDEQ_CONFIGS, MDEQClassifier, VariationalDropout2d


def _n(m, part=None):
    return m.num_parameters(part)


# ---------------------------------------------------------------------------------------------
# sizes (spec 1.4, 1.7)
# ---------------------------------------------------------------------------------------------

def test_deq_large_parameter_counts_match_spec():
    m = mz.create("deq_large_cifar10")
    assert sum(p.numel() for p in m.parameters()) == 11_097_438
    assert _n(m) == 11_097_438
    assert _n(m, "f") == 8_715_232
    assert _n(m, "head") == 2_370_910
    assert _n(m) - _n(m, "f") - _n(m, "head") == 11_296  # stem + stage0
    assert m.state_dim == 32 * 1024 + 64 * 256 + 128 * 64 + 256 * 16 == 61_440
    assert m.branch_shapes == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]


def test_deq_xl_parameter_counts_match_spec():
    m = MDEQClassifier(MDEQ_CONFIGS["deq_xl"], 3, (32, 32))
    assert _n(m) == 48_792_098
    assert _n(m, "f") == 44_083_512
    assert _n(m, "head") == 4_654_370
    assert m.state_dim == 138_240


def test_baseline_sizes():
    assert mz.create("resnet18_cifar10").num_parameters() == 11_173_962
    small = mz.create("small_cnn_fashion_mnist").num_parameters()
    tiny = mz.create("deq_tiny_fashion_mnist").num_parameters()
    assert tiny / 1.5 <= small <= tiny * 1.5, (small, tiny)


def test_deq_tiny_cell_cost_per_sample():
    m = mz.create("deq_tiny_fashion_mnist").eval()
    B = 4
    x = torch.rand(B, 1, 28, 28)
    ctx = m.context(x)
    z = torch.randn(B, m.state_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = ctx.f(z)
    assert out.shape == (B, m.state_dim)
    macs = fc.get_total_flops() / 2 / B
    assert 0.5e6 < macs <= 4e6, macs
    assert ctx.counter.nograd.tolist() == [1] * B


# ---------------------------------------------------------------------------------------------
# every configuration on both input geometries
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["deq_tiny", "deq_large", "deq_xl"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_every_config_runs_on_both_geometries(arch, shape):
    torch.manual_seed(0)
    t0 = time.time()
    m = MDEQClassifier(MDEQ_CONFIGS[arch], shape[0], shape[1:]).eval()
    if arch == "deq_tiny":
        B, solver = 3, None
    else:  # large models: one sample, a short solve keeps the test cheap on 2 CPU cores
        B, solver = 1, mz.make_solver("broyden", max_iter=2)
        m.solver = solver
    x = torch.rand(B, *shape)
    with torch.no_grad():
        rec = m.run(x, per_state=True)
    assert rec.logits.shape == (B, 10)
    assert torch.isfinite(rec.logits).all()
    N = m.solver.max_iter
    assert rec.state_logits.shape == (N, B, 10)
    assert len(rec.trajectory.states) == N
    assert rec.trajectory.states[0].shape == (B, m.state_dim)
    # branch resolutions follow the stem arithmetic: ceil(H / 2^(i + downsample))
    h = shape[1]
    for _ in range(m.config.downsample_times):
        h = (h + 1) // 2
    for c, (cb, hb, wb) in zip(m.config.channels, m.branch_shapes):
        assert (cb, hb, wb) == (c, h, h)
        h = (h + 1) // 2
    assert time.time() - t0 < 60


@pytest.mark.parametrize("name", ["deq_tiny_fashion_mnist", "deq_tiny_cifar10"])
def test_registered_tiny_models_forward(name):
    m = mz.create(name).eval()
    c, h, w = m.zoo_entry.input_shape
    out = m(torch.rand(2, c, h, w))
    assert out.shape == (2, 10)


def test_injection_only_into_branch_zero(tiny_model):
    x = torch.rand(2, 1, 28, 28)
    inj = tiny_model.inject(x)
    assert len(inj) == 2 and inj[1] is None
    assert inj[0].shape == (2, *tiny_model.branch_shapes[0])
    # the flat layout is the concatenation of the branches
    z = torch.randn(2, tiny_model.state_dim)
    parts = tiny_model.unflatten(z)
    assert [tuple(p.shape[1:]) for p in parts] == tiny_model.branch_shapes
    assert torch.equal(tiny_model.flatten(parts), z)


# ---------------------------------------------------------------------------------------------
# initialisation (spec 1.6)
# ---------------------------------------------------------------------------------------------

def _convs(m):
    wn, plain = [], []
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            (wn if hasattr(mod, "weight_v") else plain).append((name, mod))
    return wn, plain


@pytest.mark.parametrize("init", ["reference", "intended"])
def test_weight_norm_init_quirk(init):
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist", init=init)
    wn, plain = _convs(m)
    # block conv1, conv2 per branch + post-fuse 1x1 per branch
    assert len(wn) == 3 * m.config.num_branches
    assert all(n.startswith("cell.") for n, _ in wn)
    for name, mod in wn:
        v, g = mod.weight_v, mod.weight_g
        # g = ||v|| per output channel, so the effective weight equals v at init
        torch.testing.assert_close(g.flatten(), v.flatten(1).norm(dim=1))
        torch.testing.assert_close(mod.weight, v)
        if init == "reference":
            # PyTorch's default kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(v[0].numel())
            assert v.abs().max() <= bound + 1e-7, name
            assert v.std() > 2.5 * 0.01, (name, v.std())
            assert abs(v.std() / (bound / math.sqrt(3)) - 1) < 0.2, name
        else:
            assert abs(v.std() / 0.01 - 1) < 0.25, (name, v.std())
    # the other convs are N(0, 0.01) in both presets (weights and biases)
    for name, mod in plain:
        w = mod.weight
        if w.numel() >= 100:
            assert abs(w.std() / 0.01 - 1) < 0.3, (name, w.std())
            assert abs(w.mean()) < 0.005, name
        if mod.bias is not None and mod.bias.numel() >= 50:
            assert abs(mod.bias.std() / 0.01 - 1) < 0.35, name
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d) and mod.affine:
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))


def test_reference_and_intended_differ_only_in_wn_convs():
    torch.manual_seed(0)
    a = mz.create("deq_tiny_fashion_mnist", init="reference")
    wn_a, _ = _convs(a)
    torch.manual_seed(0)
    b = mz.create("deq_tiny_fashion_mnist", init="intended")
    wn_b, _ = _convs(b)
    ratio = torch.stack([ma.weight_v.std() / mb.weight_v.std() for (_, ma), (_, mb) in zip(wn_a, wn_b)])
    assert (ratio > 2.5).all()


def test_weight_norm_is_recomputed_per_forward(tiny_model):
    m = tiny_model
    conv = m.cell.blocks[0].conv1
    with torch.no_grad():
        conv.weight_g.mul_(2.0)
    m.context(torch.rand(1, 1, 28, 28))
    torch.testing.assert_close(conv.weight, 2.0 * conv.weight_v)


# ---------------------------------------------------------------------------------------------
# variational dropout (spec 1.3)
# ---------------------------------------------------------------------------------------------

def test_dropout_masks_fixed_within_a_forward():
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist", dropout=0.3).train()
    B = 6
    x = torch.rand(B, 1, 28, 28)
    ctx = m.context(x)
    assert ctx.masks is not None and len(ctx.masks) == m.config.num_branches
    p = m.config.dropout
    for mask, (c, _, _) in zip(ctx.masks, m.branch_shapes):
        assert mask.shape == (B, c, 1, 1)
        kept = mask != 0
        torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
        assert (~kept).any() and kept.any()  # p = 0.3 over >= 72 entries
    masks0 = [t.clone() for t in ctx.masks]
    z = torch.randn(B, m.state_dim)
    with torch.no_grad():
        a, b = ctx.f(z), ctx.f(z)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(u, v) for u, v in zip(masks0, ctx.masks))
    # per-sample slicing uses the same masks as the whole batch
    idx = torch.tensor([4, 1])
    with torch.no_grad():
        torch.testing.assert_close(ctx.f(z[idx], idx), a[idx], rtol=1e-5, atol=1e-6)
    # a new forward draws new masks
    ctx2 = m.context(x)
    assert any(not torch.equal(u, v) for u, v in zip(masks0, ctx2.masks))
    with torch.no_grad():
        assert not torch.allclose(ctx2.f(z), a)


def test_dropout_mask_drawn_once_per_run(monkeypatch):
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist").train()
    calls = []
    orig = VariationalDropout2d.sample_mask

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(VariationalDropout2d, "sample_mask", counting)
    rec = m.run(torch.rand(3, 1, 28, 28))
    assert len(calls) == m.config.num_branches  # once per branch, not once per f call
    assert rec.nfev.min() > 10


def test_no_dropout_in_eval(tiny_model):
    x = torch.rand(3, 1, 28, 28)
    ctx = tiny_model.context(x)
    assert ctx.masks is None
    with torch.no_grad():
        a = tiny_model(x)
        b = tiny_model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dropout_zero_has_no_masks_in_train():
    m = mz.create("deq_tiny_fashion_mnist", dropout=0.0).train()
    assert m.context(torch.rand(2, 1, 28, 28)).masks is None


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

BAD_INPUTS = [
    (lambda: torch.rand(2, 1, 28, 28) + 1.0, r"\[0, 1\]"),
    (lambda: torch.rand(2, 1, 28, 28) - 1.0, r"\[0, 1\]"),
    (lambda: torch.full((2, 1, 28, 28), float("nan")), "NaN or infinite"),
    (lambda: torch.rand(2, 1, 28, 28).index_fill(0, torch.tensor([1]), float("inf")),
     "NaN or infinite"),
    (lambda: torch.rand(2, 3, 28, 28), "expected 1 channel"),
    (lambda: torch.rand(2, 1, 32, 32), r"size \(28, 28\)"),
    (lambda: torch.rand(1, 28, 28), r"\(B, C, H, W\)"),
    (lambda: torch.randint(0, 255, (2, 1, 28, 28), dtype=torch.uint8), "float"),
    (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.long), "dtype torch.int64"),
    (lambda: [[0.5] * 28] * 28, "torch.Tensor"),
    (lambda: torch.rand(0, 1, 28, 28), "empty batch"),
]


@pytest.mark.parametrize("make, msg", BAD_INPUTS)
@pytest.mark.parametrize("name", ["deq_tiny_fashion_mnist", "small_cnn_fashion_mnist"])
def test_bad_inputs_raise_input_error(name, make, msg):
    m = mz.create(name).eval()
    with pytest.raises(mz.InputError, match=msg):
        m(make())


def test_bad_inputs_via_run_and_context(tiny_model):
    with pytest.raises(mz.InputError, match="expected 1 channel"):
        tiny_model.run(torch.rand(2, 3, 28, 28), per_state=True)
    with pytest.raises(mz.InputError):
        tiny_model.context(torch.rand(2, 1, 28, 28) * 2)
    assert issubclass(mz.InputError, ValueError)
    # boundary values are valid
    out = tiny_model(torch.cat([torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)]))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("kw, msg", [
    (dict(channels=(12, 25)), "divisible"),
    (dict(head_channels=(8,)), "one entry per branch"),
    (dict(dropout=1.0), "dropout"),
    (dict(init="xavier"), "init"),
])
def test_bad_configs_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        mz.create("deq_tiny_fashion_mnist", **kw)


def test_describe_is_plain_data(tiny_model):
    d = tiny_model.describe()
    assert d["architecture"] == "mdeq" and d["in_channels"] == 1 and d["image_size"] == [28, 28]
    assert d["solver"]["name"] == "broyden" and d["solver"]["max_iter"] == 8
    assert d["defense"]["name"] == "final" and d["defense"]["steps"] == 9
