"""Tests for model_zoo/registry.py: listing, creating, registering and verified loading."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import model_zoo as mz
from model_zoo import registry

BUILTINS = ["deq_large_cifar10", "deq_large_fashion_mnist", "deq_tiny_cifar10",
            "deq_tiny_fashion_mnist", "deq_xl_cifar10", "resnet18_cifar10",
            "small_cnn_fashion_mnist"]


@pytest.fixture
def clean_registry():
    """Restore the registry after a test that registers models."""
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


class NotAllowed:
    """A custom class: pickles of it must be refused by weights_only loading."""

    def __init__(self):
        self.payload = [1, 2, 3]


class TinyLinear(nn.Module):
    def __init__(self, c=1, hw=(28, 28), num_classes=10):
        super().__init__()
        self.fc = nn.Linear(c * hw[0] * hw[1], num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


# ---------------------------------------------------------------------------------------------
# listing and creating
# ---------------------------------------------------------------------------------------------

def test_list_models_contains_builtins():
    names = mz.list_models()
    assert set(BUILTINS) <= set(names)
    assert names == sorted(names)
    # shipped zoo entries (model_zoo/checkpoints/zoo.json) may add names, e.g. deq_tiny_fmnist_*
    tiny = mz.list_models("deq_tiny_*")
    assert {"deq_tiny_cifar10", "deq_tiny_fashion_mnist"} <= set(tiny)
    assert all(n.startswith("deq_tiny_") for n in tiny)
    assert mz.list_models("*fashion_mnist") == [
        "deq_large_fashion_mnist", "deq_tiny_fashion_mnist", "small_cnn_fashion_mnist"]


@pytest.mark.parametrize("name", [n for n in BUILTINS if n != "deq_xl_cifar10"])
def test_create_builtin_has_registered_input_shape(name):
    entry = mz.get_entry(name)
    m = mz.create(name)
    assert isinstance(m, nn.Module) and m.zoo_entry is entry
    c, h, w = entry.input_shape
    assert (m.in_channels, tuple(m.image_size)) == (c, (h, w))
    assert m.num_classes == entry.num_classes == 10
    assert entry.dataset in name and entry.architecture in name
    d = entry.to_dict()
    assert "factory" not in d and d["input_shape"] == [c, h, w] and d["name"] == name
    if "large" not in name:  # forward the cheap ones
        m.eval()
        with torch.no_grad():
            assert m(torch.rand(2, c, h, w)).shape == (2, 10)
        with pytest.raises(mz.InputError):
            m(torch.rand(2, c, h + 1, w))


def test_create_deq_overrides():
    m = mz.create("deq_tiny_fashion_mnist", solver={"name": "anderson", "max_iter": 5, "m": 3},
                  defense="early:4", num_classes=7, channels=[8, 8], num_groups=4)
    assert isinstance(m.solver, mz.Anderson) and m.solver.max_iter == 5 and m.solver.m == 3
    assert isinstance(m.defense, mz.EarlyState) and m.defense.index == 4
    assert m.config.channels == (8, 8) and m.num_classes == 7
    assert m.eval()(torch.rand(1, 1, 28, 28)).shape == (1, 7)
    s = mz.Broyden(max_iter=3)
    assert mz.create("deq_tiny_fashion_mnist", solver=s).solver is s


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as ei:
        mz.create("deq_tiny_mnist")
    msg = str(ei.value)
    assert "deq_tiny_mnist" in msg
    for n in BUILTINS:
        assert n in msg
    with pytest.raises(KeyError, match="Did you mean: deq_tiny_cifar10, deq_tiny_fashion_mnist"):
        mz.get_entry("tiny")


def test_unknown_override_raises_type_error():
    with pytest.raises(TypeError, match="bogus"):
        mz.create("deq_tiny_fashion_mnist", bogus=1)
    with pytest.raises(TypeError, match="solver"):
        mz.create("deq_tiny_fashion_mnist", solver="broyden")
    with pytest.raises(TypeError):
        mz.create("small_cnn_fashion_mnist", bogus=1)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(1)
    m = mz.create("deq_tiny_fashion_mnist").eval()
    # make the weights distinguishable from a fresh model's
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for b in m.buffers():
            if b.is_floating_point():
                b.add_(0.1)
    path = tmp_path / "tiny.pt"
    digest = mz.save_checkpoint(m, path, meta={"epochs": 0})
    return m, path, digest


def test_checkpoint_roundtrip(tiny_ckpt):
    m, path, digest = tiny_ckpt
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and digest == mz.sha256_file(path)
    obj = torch.load(path, weights_only=True)
    assert obj["meta"] == {"epochs": 0}
    loaded = mz.load("deq_tiny_fashion_mnist", checkpoint=path, sha256=digest)
    assert not loaded.training
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # a fresh model differs
    with torch.no_grad():
        assert not torch.allclose(mz.create("deq_tiny_fashion_mnist").eval()(x), m(x))
    # defense chosen at load time
    early = mz.load("deq_tiny_fashion_mnist", checkpoint=path, defense="early:5")
    assert isinstance(early.defense, mz.EarlyState) and early.defense.index == 5
    with torch.no_grad():
        torch.testing.assert_close(early(x), m.run(x, per_state=True).state_logits[4])


def test_raw_state_dict_checkpoint(tiny_ckpt, tmp_path):
    m, _, _ = tiny_ckpt
    path = tmp_path / "raw.pt"
    torch.save(m.state_dict(), path)
    loaded = mz.load("deq_tiny_fashion_mnist", checkpoint=path)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_wrong_hash_names_file_and_both_hashes(tiny_ckpt):
    _, path, digest = tiny_ckpt
    wrong = "0" * 64
    with pytest.raises(mz.CheckpointError) as ei:
        mz.load("deq_tiny_fashion_mnist", checkpoint=path, sha256=wrong)
    msg = str(ei.value)
    assert str(path) in msg and digest in msg and wrong in msg


def _expect_ckpt_error(tmp_path, sd, *fragments, name="deq_tiny_fashion_mnist"):
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(mz.CheckpointError) as ei:
        mz.load(name, checkpoint=path)
    msg = str(ei.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def test_missing_keys(tiny_ckpt, tmp_path):
    m, _, _ = tiny_ckpt
    sd = dict(m.state_dict())
    del sd["head.classifier.weight"], sd["cell.post.0.weight_g"]
    _expect_ckpt_error(tmp_path, sd, "missing keys (2)", "head.classifier.weight",
                       "cell.post.0.weight_g")


def test_unexpected_keys(tiny_ckpt, tmp_path):
    m, _, _ = tiny_ckpt
    sd = dict(m.state_dict())
    sd["head.extra.weight"] = torch.zeros(3)
    _expect_ckpt_error(tmp_path, sd, "unexpected keys (1)", "head.extra.weight")


def test_shape_mismatch(tiny_ckpt, tmp_path):
    m, _, _ = tiny_ckpt
    sd = dict(m.state_dict())
    sd["head.classifier.weight"] = torch.zeros(7, sd["head.classifier.weight"].shape[1])
    msg = _expect_ckpt_error(tmp_path, sd, "shape mismatches (1)", "head.classifier.weight")
    assert "(7, 128)" in msg and "(10, 128)" in msg


def test_checkpoint_of_another_architecture(tmp_path):
    sd = mz.create("small_cnn_fashion_mnist").state_dict()
    _expect_ckpt_error(tmp_path, sd, "missing keys", "unexpected keys")


def test_truncated_checkpoint(tiny_ckpt, tmp_path):
    _, path, _ = tiny_ckpt
    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(mz.CheckpointError, match=re.escape(str(bad))):
        mz.load("deq_tiny_fashion_mnist", checkpoint=bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(mz.CheckpointError, match="cannot read"):
        mz.load("deq_tiny_fashion_mnist", checkpoint=garbage)


def test_disallowed_pickle_global_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": NotAllowed()}, path)
    with pytest.raises(mz.CheckpointError, match="cannot read checkpoint") as ei:
        mz.load("deq_tiny_fashion_mnist", checkpoint=path)
    assert "NotAllowed" in str(ei.value)


def test_non_tensor_state_dict_refused(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": {"a": 1}}, path)
    with pytest.raises(mz.CheckpointError, match="no state_dict of tensors"):
        mz.load("deq_tiny_fashion_mnist", checkpoint=path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(mz.CheckpointError, match="no state_dict of tensors"):
        mz.load("deq_tiny_fashion_mnist", checkpoint=path)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.pt"
    with pytest.raises(mz.CheckpointError, match="not found"):
        mz.load("deq_tiny_fashion_mnist", checkpoint=p)


def test_load_without_checkpoint_tells_to_pass_one():
    with pytest.raises(mz.CheckpointError, match=r"no registered checkpoint; pass checkpoint="):
        mz.load("deq_tiny_fashion_mnist")


def test_registered_checkpoint_is_verified(clean_registry, tiny_ckpt):
    m, path, digest = tiny_ckpt
    base = mz.get_entry("deq_tiny_fashion_mnist")
    fields = dict(factory=base.factory, dataset="fashion_mnist", input_shape=(1, 28, 28),
                  architecture="deq_tiny", training="standard", checkpoint=str(path))
    good = mz.register(name="t_good", sha256=digest, defense="early:3", **fields)
    bad = mz.register(name="t_bad", sha256="f" * 64, **fields)
    gone = mz.register(name="t_gone", sha256=digest, **{**fields, "checkpoint": str(path) + ".x"})
    assert mz.checkpoint_status(good) == "ok"
    assert mz.checkpoint_status(bad) == "hash mismatch"
    assert mz.checkpoint_status(gone) == "missing"
    assert mz.checkpoint_status(base) == "none"
    loaded = mz.load("t_good")
    assert isinstance(loaded.defense, mz.EarlyState) and loaded.defense.index == 3
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m.run(x, per_state=True).state_logits[2])
    with pytest.raises(mz.CheckpointError, match="f" * 64):
        mz.load("t_bad")
    with pytest.raises(mz.CheckpointError, match="not found"):
        mz.load("t_gone")
    # relative checkpoint names resolve under model_zoo/checkpoints/
    rel = mz.register(name="t_rel", **{**fields, "checkpoint": "x.pt"})
    assert rel.checkpoint_path() == registry.CHECKPOINT_DIR / "x.pt"


# ---------------------------------------------------------------------------------------------
# registering custom models
# ---------------------------------------------------------------------------------------------

def test_register_custom_classifier(clean_registry, tmp_path):
    entry = mz.register(name="linear_fashion_mnist", factory=lambda **kw: TinyLinear(**kw),
                        dataset="fashion_mnist", input_shape=(1, 28, 28),
                        architecture="linear")
    assert "linear_fashion_mnist" in mz.list_models()
    m = mz.create("linear_fashion_mnist").eval()
    assert not m.is_deq and m.zoo_entry is entry
    x = torch.rand(4, 1, 28, 28)
    out = m(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out, m.net(x))
    for bad, msg in [(torch.rand(4, 1, 28, 28) * 3, r"\[0, 1\]"),
                     (torch.rand(4, 3, 28, 28), "channel"),
                     (torch.rand(4, 28, 28), "shape"),
                     (torch.full((4, 1, 28, 28), float("nan")), "NaN")]:
        with pytest.raises(mz.InputError, match=msg):
            m(bad)
    assert m.describe()["architecture"] == "linear"
    assert m.num_parameters() == 28 * 28 * 10 + 10
    # checkpoints of the bare network load into the wrapper
    path = tmp_path / "lin.pt"
    torch.save(m.net.state_dict(), path)
    loaded = mz.load("linear_fashion_mnist", checkpoint=path)
    torch.testing.assert_close(loaded(x), out)
    with pytest.raises(ValueError, match="not a DEQ"):
        mz.load("linear_fashion_mnist", checkpoint=path, defense="early:3")


def test_register_wrong_output_shape_is_caught(clean_registry):
    mz.register(name="wrong_out", factory=lambda **kw: TinyLinear(num_classes=3),
                dataset="fashion_mnist", input_shape=(1, 28, 28), architecture="linear")
    with pytest.raises(ValueError, match=r"expected \(B, 10\)"):
        mz.create("wrong_out")(torch.rand(2, 1, 28, 28))


def test_register_duplicate_and_bad_entries(clean_registry):
    kw = dict(factory=lambda **k: TinyLinear(), dataset="fashion_mnist", input_shape=(1, 28, 28))
    mz.register(name="dup_model", **kw)
    with pytest.raises(ValueError, match="already registered"):
        mz.register(name="dup_model", **kw)
    with pytest.raises(ValueError, match="already registered"):
        mz.register(name="deq_tiny_fashion_mnist", **kw)
    e = mz.register(name="dup_model", overwrite=True, notes="replaced", **kw)
    assert mz.get_entry("dup_model") is e and e.notes == "replaced"
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        mz.register(name="flat", factory=kw["factory"], dataset="x", input_shape=(784,))
    with pytest.raises(TypeError, match="not both"):
        mz.register(mz.get_entry("dup_model"), name="other")


def test_registry_isolation(clean_registry):
    # the fixture restores the built-ins: nothing registered by tests leaks
    assert "dup_model" not in mz.list_models() and "linear_fashion_mnist" not in mz.list_models()
