"""Bring your own model (issue 14): the DEQ protocol, the torchdeq adapter, contiguous data,
models from user code (factories, configs, CLI), ``benchmark()`` and entry identity.

The two outside models live in ``examples/byo/`` (plain user code: a torchdeq DEQ and a CNN
that flattens with ``x.view``); their weights in ``tests/data/byo/`` were trained by
``examples/byo/train_byo.py`` (400 Adam steps each, SHA-256 files beside them).
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import model_zoo as mz
from model_zoo.protocol import (ProtocolError, check_deq_protocol, is_deq_aware,
                                require_deq_protocol)

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "byo"
DATA = ROOT / "tests" / "data" / "byo"
DEQ_CKPT = DATA / "torchdeq_fmnist.pt"
CNN_CKPT = DATA / "cnn_fmnist.pt"


def _sha_file(p):
    return p.with_name(p.name + ".sha256").read_text().split()[0]


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EX))
    import cnn_fmnist
    import torchdeq_fmnist
    yield torchdeq_fmnist, cnn_fmnist
    sys.path.remove(str(EX))


@pytest.fixture(scope="module")
def fmnist_test():
    from benchmark.data import load_dataset
    return load_dataset("fashion_mnist", "test")


@pytest.fixture(scope="module")
def tdeq(examples):
    """(the user's own torchdeq model, the same weights behind the deqbench adapter)."""
    torchdeq_fmnist, _ = examples
    sd = torch.load(DEQ_CKPT, map_location="cpu", weights_only=True)
    net = torchdeq_fmnist.TinyTorchDEQ()
    net.load_state_dict(sd)
    model = torchdeq_fmnist.make_model()
    model.load_state_dict(sd)          # a checkpoint of the bare torchdeq module loads as is
    return net.eval(), model.eval()


def test_shipped_checkpoints_match_their_sha256():
    for p in (DEQ_CKPT, CNN_CKPT):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == _sha_file(p)


# ---------------------------------------------------------------------------------------------
# data: every loader hands out row-major tensors
# ---------------------------------------------------------------------------------------------

class ViewNet(nn.Module):
    """conv -> x.view(B, -1): fails on channels_last-strided inputs."""

    def __init__(self, c=1, hw=28):
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.fc = nn.Linear(4 * hw * hw, 10)

    def forward(self, x):
        x = self.conv(x)
        return self.fc(x.view(x.size(0), -1))


def test_every_loader_returns_row_major_tensors_a_view_model_accepts(tmp_path):
    from benchmark.data import load_dataset, subset
    # MNIST has the same IDX layout: point its loader at the Fashion-MNIST files
    mnist_root = tmp_path / "mnist"
    mnist_root.mkdir()
    for f in Path("/usr/share/datasets/fashion-mnist").glob("*.gz"):
        (mnist_root / f.name).symlink_to(f)
    sets = [load_dataset("fashion_mnist", s) for s in ("train", "val", "test")]
    sets += [load_dataset("mnist", "test", root=mnist_root),
             load_dataset("synthetic", "test", n_test=20, shape=(3, 8, 8))]
    sets += [subset(sets[2], 16, seed=3), subset(sets[2], 16, stratified=True)]
    for ds in sets:
        x = ds.images
        C, H, W = x.shape[1:]
        assert x.stride() == (C * H * W, H * W, W, 1), (ds, x.stride())
        assert ds.labels.is_contiguous()
        out = ViewNet(C, H)(x[:5])
        assert out.shape == (5, 10)
    # the defect itself: channels_last strides break the view model
    bad = sets[2].images[:5].clone().as_strided((5, 1, 28, 28), (784, 1, 28, 1))
    assert bad.stride() == (784, 1, 28, 1) and bad.is_contiguous()   # what numpy gave before
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        ViewNet()(bad)


# ---------------------------------------------------------------------------------------------
# the DEQ protocol
# ---------------------------------------------------------------------------------------------

def test_protocol_names_what_a_model_lacks(tiny_model, tdeq):
    rep = check_deq_protocol(tiny_model, torch.rand(2, 1, 28, 28))
    assert rep.ok and rep.probed and rep.features == ["core", "entropy_reduction"]
    assert check_deq_protocol(tdeq[1], torch.rand(2, 1, 28, 28)).features == \
        ["core", "entropy_reduction"]

    class HalfDEQ(nn.Module):
        is_deq = True

        def context(self, x):
            return None

    rep = check_deq_protocol(HalfDEQ())
    assert not rep.ok
    for name in ("model.solver", "model.zero_state", "model.run", "model.set_defense"):
        assert name in rep.missing["core"]
    assert "model.context" not in rep.missing["core"]
    with pytest.raises(ProtocolError, match="model.solver.*model.zero_state|model.zero_state"):
        is_deq_aware(HalfDEQ())
    # a plain classifier is not DEQ-aware and that is no error
    assert is_deq_aware(ViewNet()) is False
    assert not check_deq_protocol(ViewNet()).ok
    # the registry refuses a half DEQ instead of treating it as a plain classifier
    mz.register(name="half_deq_test", factory=lambda **kw: HalfDEQ(), dataset="fashion_mnist",
                input_shape=(1, 28, 28), overwrite=True)
    with pytest.raises(ProtocolError, match="model.solver"):
        mz.create("half_deq_test")


def test_protocol_probe_catches_wrong_shapes(tdeq):
    import copy
    m = copy.deepcopy(tdeq[1])
    m.zero_state = lambda x: x.new_zeros(x.shape[0], 7)          # wrong D
    rep = check_deq_protocol(m, torch.rand(2, 1, 28, 28))
    assert not rep.ok and any("ctx.f" in s or "probing" in s for s in rep.missing["core"])
    # entropy reduction needs Broyden
    m2 = copy.deepcopy(tdeq[1])
    m2.solver = mz.FixedPoint(max_iter=8)
    rep = require_deq_protocol(m2)
    assert rep.supports("core") and not rep.supports("entropy_reduction")
    assert "a Broyden solver (model.solver is FixedPoint)" in rep.missing["entropy_reduction"]


# ---------------------------------------------------------------------------------------------
# the torchdeq adapter on a trained torchdeq DEQ
# ---------------------------------------------------------------------------------------------

def test_torchdeq_adapter_equals_the_models_own_forward(tdeq, fmnist_test):
    net, model = tdeq
    x, y = fmnist_test.images[:200], fmnist_test.labels[:200]
    # the solver is read from the torchdeq DEQ
    assert type(model.solver).__name__ == "Broyden"
    assert (model.solver.max_iter, model.solver.eps, model.solver.stop_mode) == (8, 1e-3, "rel")
    with torch.no_grad():
        own = net(x)                                   # torchdeq's own eval forward
        rec = model.run(x, per_state=True)
    torch.testing.assert_close(rec.logits, own, rtol=1e-5, atol=1e-5)
    acc = (rec.logits.argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc                              # chance is 0.10
    # at the same number of iterations (no early stop, last iterate) it is z[N] exactly
    for n in (3, 8):
        net.deq.f_tol, net.deq.eval_f_max_iter = 0.0, n
        with torch.no_grad():
            u = net.injection(x[:16])
            z, _ = net.deq(lambda z: net.cell(z, u), torch.zeros_like(u),
                           solver_kwargs={"return_final": True})
            own_n = net.head(z[-1])
            mine = model.run(x[:16], defense=mz.EarlyState(n)).logits
        torch.testing.assert_close(mine, own_n, rtol=1e-5, atol=1e-5)
    net.deq.f_tol, net.deq.eval_f_max_iter = 1e-3, 8
    # the trajectory: N states, per-state logits and entropies
    assert rec.trajectory.num_states == 8 and rec.state_logits.shape == (8, 200, 10)
    assert rec.entropies.shape == (8, 200) and bool(torch.isfinite(rec.entropies).all())
    assert int(rec.nfev_nograd[0]) == 9                 # g(z[0]) and g at z[1..8]


def test_torchdeq_adapter_runs_the_deq_protocol(tdeq, fmnist_test):
    from attacks.evaluation import autoattack_attack, grid_attack
    from attacks.pgd import select_early_state
    from attacks.surrogates import JudgedModule, UnrolledIntermediate, grid_settings
    _, model = tdeq
    x, y = fmnist_test.images[:8], fmnist_test.labels[:8]
    early = model.run(x, defense=mz.EarlyState(4))
    assert early.readout == "z[4]" and early.logits.shape == (8, 10)
    er = model.run(x, defense=mz.EntropyReduction(eps=0.1, beta=0.025, r=2, tf=2))
    d = (er.x_used - x).abs().max().item()
    assert 0 < d <= 0.1 + 1e-6                          # the input was purified, within eps
    g = grid_attack(model, model.defense, x, y, 0.1, 0.025, 3,
                    settings=grid_settings(8, kas=[1, 5], lams=(0.5,)), mode="full")
    assert g.per_setting.shape == (16, 8)
    assert 0 <= g.worst_case_accuracy <= (model(x).argmax(1) == y).float().mean().item()
    out = autoattack_attack(JudgedModule(model, model.defense, UnrolledIntermediate(8, 5, 0.5)),
                            x, y, 0.1, attacks=("apgd-ce",), budget={"apgd_n_iter": 5}, seed=0)
    assert out.correct.shape == (8,)
    sel = select_early_state(model, fmnist_test.images[100:116], fmnist_test.labels[100:116],
                             0.1, 0.025, 2)
    assert 1 <= sel.index <= 8


# ---------------------------------------------------------------------------------------------
# user code -> leaderboard entry: benchmark() and a config + `deqbench leaderboard`
# ---------------------------------------------------------------------------------------------

RB_KEYS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset",
           "venue", "architecture", "eps", "clean_acc", "reported", "autoattack_acc"}


def _published_entry():
    """The model_info entry RobustBench documents (robustbench/leaderboard/template.py)."""
    import re
    from model_zoo import compat
    compat.import_robustbench()
    from robustbench.leaderboard import template
    text = re.search(r"``\s*(\{.*?\})\s*``", template.generate_leaderboard.__doc__, re.S).group(1)
    return json.loads(text)


def _check_robustbench_fields(entry, reported=True):
    """Keys and types as RobustBench's published entries; readable by its ModelInfo."""
    import dataclasses
    pub = _published_entry()                   # imports robustbench through model_zoo.compat
    from robustbench.utils import ModelInfo
    assert set(pub) == RB_KEYS
    want = RB_KEYS if reported else RB_KEYS - {"reported"}
    assert want <= set(entry), want - set(entry)
    assert set(entry) - RB_KEYS <= {"external", "footnote", "unreliable", "threat_model", "deq"}
    for k in want:
        assert type(entry[k]) is type(pub[k]), (k, entry[k], pub[k])
    for k in ("clean_acc", "autoattack_acc") + (("reported",) if reported else ()):
        assert 0 <= float(entry[k]) <= 100
    fields = {f.name for f in dataclasses.fields(ModelInfo)}
    info = ModelInfo(**{k: v for k, v in entry.items() if k in fields})
    assert info.clean_acc == entry["clean_acc"]
    # identity: the evaluated weights
    assert len(entry["deq"]["weights_sha256"]) == 64 and entry["deq"]["checkpoint"]


CNN_ATTACKS = {"pgd": {"steps": 5},
               "autoattack": {"attacks": ["apgd-ce", "square"],
                              "budget": {"apgd_n_iter": 5, "square_n_queries": 50}}}


def test_benchmark_call_on_a_plain_model_and_a_torchdeq_deq(examples, tdeq, tmp_path,
                                                            fmnist_test):
    from benchmark import benchmark
    from benchmark.leaderboard import read_entries
    _, cnn_fmnist = examples
    net = cnn_fmnist.make_model()
    net.load_state_dict(torch.load(CNN_CKPT, weights_only=True))
    res = benchmark(net, dataset="fashion_mnist", n=16, eps=0.1, attacks=CNN_ATTACKS,
                    output=tmp_path / "out", name="view_cnn", training="clean, 400 steps",
                    authors="A. User", link="https://example.org/cnn", reported="85.70")
    assert not res.is_deq
    row = res.summary.iloc[0]
    assert row.model == "view_cnn" and row.n == 16 and 0.6 <= row.clean <= 1.0
    assert row.ALL <= min(row.pgd, row.autoattack) + 1e-9
    assert set(res.records.attack) == {"clean", "pgd", "autoattack"}
    assert res.records[res.records.attack == "clean"].example.nunique() == 16
    e = res.entry
    assert res.entry_path == tmp_path / "out" / "leaderboards" / "fashion_mnist-Linf" / "view_cnn.json"
    assert e["reported"] == "85.70" and e["authors"] == "A. User" and e["link"].startswith("https")
    assert "training: clean, 400 steps" in e["footnote"] and "untrained" not in e["footnote"]
    assert e["deq"]["weights_sha256"] == res.weights_sha256
    _check_robustbench_fields(e)
    # resumable: the same call only re-reads the database
    again = benchmark(net, dataset="fashion_mnist", n=16, eps=0.1, attacks=CNN_ATTACKS,
                      output=tmp_path / "out", name="view_cnn", training="clean, 400 steps",
                      authors="A. User", link="https://example.org/cnn", reported="85.70")
    assert again.summary.ALL.tolist() == res.summary.ALL.tolist()
    # other weights under the same name never replace the entry silently
    other = cnn_fmnist.make_model()
    before = (res.run_dir / "weights.pt").read_bytes()
    with pytest.raises(ValueError, match="holds the run of other weights"):
        benchmark(other, dataset="fashion_mnist", n=16, eps=0.1, attacks=["pgd"],
                  output=tmp_path / "out", name="view_cnn")
    assert (res.run_dir / "weights.pt").read_bytes() == before     # the old run stays intact

    # the torchdeq DEQ: DEQ-aware, its own forward reported, early state + grid + AutoAttack
    _, model = tdeq
    res = benchmark(model, dataset="fashion_mnist", n=8, eps=0.1,
                    defenses=[model.defense.config(), "early:4"],
                    attacks={"pgd": {"steps": 3}, "grid": {"steps": 2, "kas": [1], "lams": [0.5]},
                             "autoattack": {"attacks": ["apgd-ce"], "budget": {"apgd_n_iter": 3}}},
                    output=tmp_path / "out", name="tiny_torchdeq")
    assert res.is_deq and len(res.entries) == 2
    names = sorted(e["name"] for e in res.entries)
    assert names == ["tiny_torchdeq", "tiny_torchdeq+early-4"]   # its own forward: plain name
    rows = res.summary.set_index(res.summary.defense.str.slice(0, 7))
    assert rows.loc["early:4", "state"] == "z[4]"
    own = res.summary[res.summary.defense != "early:4"].iloc[0]
    clean = res.records[(res.records.attack == "clean") & (res.records.defense == own.defense)]
    with torch.no_grad():                       # clean records = the torchdeq forward's
        idx = torch.tensor(sorted(clean.example))
        pred = tdeq[0](fmnist_test.images[idx]).argmax(1)
    assert (clean.sort_values("example").correct.values
            == (pred == fmnist_test.labels[idx]).numpy()).all()
    assert {"grid", "autoattack"} <= set(res.records.attack)
    assert res.records[res.records.attack == "grid"].setting.nunique() >= 9   # 8 states + worst
    for e in res.entries:
        _check_robustbench_fields(e, reported=False)
        assert "reported" not in e                   # the source reported nothing: absent
    assert {e["name"] for e in read_entries(res.entry_path.parent)} >= set(names) | {"view_cnn"}


def test_config_and_cli_journey_for_user_models(tmp_path, capsys):
    """configs/eval/byo_fmnist.yaml (both outside models from user code) through
    `deqbench leaderboard`, with reduced budgets."""
    import yaml
    from benchmark.cli import main
    from benchmark.leaderboard import read_entries
    raw = yaml.safe_load((ROOT / "configs" / "eval" / "byo_fmnist.yaml").read_text())
    raw["output"] = str(tmp_path / "runs")
    raw["data"]["n"], raw["shard_size"] = 8, 8
    raw["attacks"] = {"pgd": {"steps": 2}, "grid": {"steps": 1, "kas": [1], "lams": [0.5]},
                      "autoattack": {"attacks": ["apgd-ce"], "budget": {"apgd_n_iter": 2},
                                     "on_test_time_defenses": False}}
    # (the adaptive attacks on the entropy-reduction entry cost minutes: the README's run)
    for m in raw["models"]:   # paths relative to the repository, the test runs anywhere
        m["factory"] = str(ROOT / m["factory"])
        m["checkpoint"] = str(ROOT / m["checkpoint"])
    cfg = tmp_path / "byo.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["leaderboard", str(cfg), "--root", str(tmp_path / "lb"), "--quiet"]) == 0
    entries = {e["name"]: e for e in read_entries(tmp_path / "lb" / "fashion_mnist-Linf")}
    assert set(entries) == {"tiny_torchdeq_fmnist", "tiny_torchdeq_fmnist+early-4",
                            "tiny_torchdeq_fmnist+entropy_reduction-beta0.025-eps0.1-r2-tf2",
                            "small_cnn_view_fmnist"}
    deq = entries["tiny_torchdeq_fmnist"]
    assert deq["deq"]["weights_sha256"] == _sha_file(DEQ_CKPT)
    assert deq["deq"]["checkpoint"].endswith("torchdeq_fmnist.pt")
    assert "training: clean, 400 Adam steps" in deq["footnote"]
    assert deq["authors"] == "deqbench examples" and "reported" not in deq
    assert entries["small_cnn_view_fmnist"]["deq"]["weights_sha256"] == _sha_file(CNN_CKPT)
    for e in entries.values():
        _check_robustbench_fields(e, reported=False)


def test_config_model_factory_errors_name_the_key(tmp_path):
    from benchmark.run_config import ConfigError, from_dict

    def cfg(**model):
        m = {"name": "mine", "factory": f"{EX / 'cnn_fmnist.py'}:make_model", **model}
        return {"name": "t", "data": {"dataset": "fashion_mnist", "n": 4},
                "threat": {"eps": 0.1}, "model": m}

    c = from_dict(cfg(checkpoint=str(CNN_CKPT), sha256=_sha_file(CNN_CKPT)))
    assert c.models[0].name == "mine" and c.models[0].factory["factory"].endswith(":make_model")
    assert mz.get_entry("mine").sha256 == _sha_file(CNN_CKPT)
    cases = [({"sha256": "0" * 64, "checkpoint": str(CNN_CKPT)}, "models[0].sha256"),
             ({"checkpoint": str(tmp_path / "nope.pt")}, "models[0].checkpoint"),
             ({"factory": "no_such_module_xyz:f"}, "models[0].factory"),
             ({"factory": f"{EX / 'cnn_fmnist.py'}:nope"}, "models[0].factory"),
             ({"reported": "high"}, "models[0].reported"),
             ({"colour": "red"}, "models[0].colour"),
             ({"name": "deq_tiny_fmnist_pgdat", "checkpoint": str(CNN_CKPT)}, "models[0].name")]
    for extra, key in cases:
        with pytest.raises(ConfigError, match=rf"^run config: {key.replace('[', '.').replace(']', '.')}"):
            from_dict(cfg(**extra))
    # the zoo name with another model's weights: the error names both
    with pytest.raises(ConfigError, match="deq_tiny_fmnist_pgdat.pt.*cnn_fmnist.pt|zoo's"):
        from_dict(cfg(name="deq_tiny_fmnist_pgdat", checkpoint=str(CNN_CKPT)))
    # factory without checkpoint (it builds its weights itself): identified by the state_dict
    # hash; a factory that builds other weights on every call is caught when loading
    f = tmp_path / "seeded.py"
    f.write_text("import torch\nfrom cnn_fmnist import SmallNet\n"
                 "def make(width=16):\n    torch.manual_seed(0)\n    return SmallNet(width)\n"
                 "def unseeded(width=16):\n    return SmallNet(width)\n")
    sys.path.insert(0, str(EX))
    c = from_dict(cfg(name="mine_init", factory=f"{f}:make", kwargs={"width": 8}))
    e = mz.get_entry("mine_init")
    assert e.extra["weights"] == "factory" and len(e.sha256) == 64
    assert c.weights()["mine_init"] == e.sha256
    m = mz.load("mine_init")
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    from_dict(cfg(name="mine_unseeded", factory=f"{f}:unseeded"))
    with pytest.raises(mz.CheckpointError, match="now builds weights"):
        mz.load("mine_unseeded")
    sys.path.remove(str(EX))


def test_unknown_model_error_says_how_to_bring_ones_own():
    with pytest.raises(KeyError) as ei:
        mz.get_entry("my_fancy_net")
    msg = str(ei.value)
    assert "model_zoo.register" in msg and "--model-factory" in msg and "factory:" in msg


def test_custom_checkpoint_never_replaces_the_zoo_entry(tmp_path):
    """A zoo name evaluated with another checkpoint gets its own entry name; a different
    model under an existing entry's name is refused, naming both."""
    import shutil
    from benchmark.reports import _check_identity, _identity
    zoo = mz.get_entry("deq_tiny_fmnist_pgdat")

    class FakeDB:
        def __init__(self, w):
            self.w = w

        def get_meta(self, k):
            return self.w if k == "weights" else None

    other = tmp_path / "retrained.pt"
    shutil.copy(zoo.checkpoint_path(), other)
    with open(other, "ab") as f:
        f.write(b"\0")                       # other bytes, other hash
    sha = hashlib.sha256(other.read_bytes()).hexdigest()
    cfg = {"models": [{"name": zoo.name, "checkpoint": str(other)}]}
    ident = _identity(FakeDB({zoo.name: sha}), cfg, zoo.name, zoo)
    assert ident["name"] == f"{zoo.name}-{sha[:8]}" and ident["sha256"] == sha
    assert "training: not stated" in ident["footnote"] and "pgd_at" not in ident["footnote"]
    same = _identity(FakeDB({zoo.name: zoo.sha256}), {"models": [{"name": zoo.name}]}, zoo.name, zoo)
    assert same["name"] == zoo.name and "training: pgd_at" in same["footnote"]
    assert same["checkpoint"].endswith("deq_tiny_fmnist_pgdat.pt")
    # an existing entry of other weights under the same name
    folder = tmp_path / "lb" / "fashion_mnist-Linf"
    folder.mkdir(parents=True)
    (folder / "mine.json").write_text(json.dumps(
        {"name": "mine", "deq": {"weights_sha256": "a" * 64, "checkpoint": "old.pt"}}))
    new = {"name": "mine", "dataset": "fashion_mnist", "threat_model": "Linf",
           "deq": {"weights_sha256": "b" * 64, "checkpoint": "new.pt"}}
    user = mz.register(name="mine_identity", factory=lambda **kw: ViewNet(), dataset="fashion_mnist",
                       input_shape=(1, 28, 28), overwrite=True)
    with pytest.raises(ValueError, match="old.pt.*new.pt"):
        _check_identity(tmp_path / "lb", new, user)
    new["deq"]["weights_sha256"] = "a" * 64
    _check_identity(tmp_path / "lb", new, user)          # the same weights: fine


def test_cli_model_from_user_code(capsys, monkeypatch):
    """--model-file / --model-factory: the same keys as a config's factory model; bad input is
    one line naming the argument, exit 2."""
    from benchmark.cli import main
    monkeypatch.chdir(ROOT)
    args = ["eval", "--model-file", "examples/byo/cnn_fmnist.py:make_model", "--model", "cli_cnn",
            "--checkpoint", str(CNN_CKPT), "--sha256", _sha_file(CNN_CKPT), "--n", "40",
            "--dataset", "fashion_mnist", "--first-n"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cli_cnn on fashion_mnist test subset n=40" in out
    acc = float(out.split("clean accuracy of the reported forward: ")[1].split("%")[0])
    assert acc > 60
    assert mz.get_entry("cli_cnn").sha256 == _sha_file(CNN_CKPT)
    bad = [(["--model-file", "examples/byo/cnn_fmnist.py"], "--model-file: expected FILE.py"),
           (["--model-file", "examples/byo/nope.py:f"], "factory file not found"),
           (["--model-factory", "examples.byo.cnn_fmnist:make_model", "--sha256", "0" * 64],
            "argument --sha256"),
           (["--model-factory", "examples.byo.cnn_fmnist:make_model", "--model-kwargs", "[1]"],
            "--model-kwargs: a JSON object")]
    for extra, msg in bad:
        base = ["eval", "--checkpoint", str(CNN_CKPT), "--n", "4", "--dataset", "fashion_mnist"]
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
