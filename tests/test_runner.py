"""``deqbench evaluate`` (benchmark.runner): config validation, the results database and its
summary, resumption (re-run, SIGKILL, ``stop_after_units``), 2-process (gloo) sharding, and the
atomicity of :meth:`ResultsDB.commit_unit` / :func:`merge`.

Every run here is tiny (12 Fashion-MNIST test images in shards of 4, 2-step PGD, a one-setting
grid, 3-iteration APGD-CE) on small checkpoints written into tmp folders."""
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import model_zoo as mz
from benchmark.results_db import ResultsDB, merge
from benchmark.run_config import ConfigError, from_dict, load_run_config
from benchmark.runner import evaluate, summarize
from tests.conftest import calibrate_batchnorm

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file()
                                and not (FMNIST / "t10k-images-idx3-ubyte").is_file(),
                                reason="Fashion-MNIST (dataset-fashion-mnist) not installed")

N, SHARD = 12, 4
N_SHARDS = 3
# (model key, defense) pairs x (clean, pgd, grid, autoattack) x shards
PAIRS = [("deq_tiny_fashion_mnist", "final"), ("deq_tiny_fashion_mnist", "early:select"),
         ("small_cnn_fashion_mnist", "final")]
ATTACKS = ("clean", "pgd", "grid", "autoattack")
PLANNED = len(PAIRS) * len(ATTACKS) * N_SHARDS
KEY = ["model", "defense", "attack", "setting", "example"]


@pytest.fixture(autouse=True)
def _one_thread():
    # The subprocesses run with OMP_NUM_THREADS=1; compare with in-process runs at equal threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A BatchNorm-calibrated untrained deq_tiny_fashion_mnist and a briefly trained small CNN
    (so that both have non-trivial clean and robust accuracies)."""
    d = tmp_path_factory.mktemp("ckpt")
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        deq = calibrate_batchnorm(mz.create("deq_tiny_fashion_mnist", dropout=0.0),
                                  torch.rand(64, 1, 28, 28))
        mz.save_checkpoint(deq, d / "deq.pt")
        torch.manual_seed(0)
        cnn = mz.create("small_cnn_fashion_mnist")
        if FMNIST.is_dir():
            from benchmark.data import load_dataset
            ds = load_dataset("fashion_mnist", "test")
            x, y = ds.images[5000:7000], ds.labels[5000:7000]  # not the evaluated images
            opt = torch.optim.Adam(cnn.parameters(), 3e-3)
            cnn.train()
            for _ in range(30):
                i = torch.randint(0, len(y), (32,))
                loss = torch.nn.functional.cross_entropy(cnn(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        cnn.eval()
        mz.save_checkpoint(cnn, d / "cnn.pt")
        # the registry rebuilds the default architectures: the checkpoints must load into them
        x = torch.rand(5, 1, 28, 28)
        deq_l = mz.load("deq_tiny_fashion_mnist", checkpoint=d / "deq.pt")
        cnn_l = mz.load("small_cnn_fashion_mnist", checkpoint=d / "cnn.pt")
        with torch.no_grad():
            assert torch.allclose(deq_l(x), deq.eval()(x), atol=1e-5)
            assert torch.allclose(cnn_l(x), cnn(x), atol=1e-6)
    finally:
        torch.set_num_threads(n0)
    return {"deq": str(d / "deq.pt"), "cnn": str(d / "cnn.pt")}


def _raw(ckpts, output, name="tiny", **over):
    raw = {
        "name": name, "output": str(output), "seed": 0, "device": "cpu", "batch_size": 16,
        "shard_size": SHARD,
        "data": {"dataset": "fashion_mnist", "n": N, "seed": 0, "val_n": 8},
        "threat": {"norm": "Linf", "eps": 0.05},
        "models": [{"name": "deq_tiny_fashion_mnist", "checkpoint": ckpts["deq"],
                    "defenses": ["final", "early:select"]},
                   {"name": "small_cnn_fashion_mnist", "checkpoint": ckpts["cnn"]}],
        "attacks": {"pgd": {"steps": 2},
                    "grid": {"steps": 2, "kas": [1], "lams": [1.0]},
                    "autoattack": {"attacks": ["apgd-ce"], "budget": {"apgd_n_iter": 3}}},
    }
    raw.update(over)
    return raw


def _cfg(ckpts, output, **over):
    return from_dict(_raw(ckpts, output, **over))


def _write_yaml(ckpts, output, **over) -> Path:
    p = Path(output) / "config.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(_raw(ckpts, output, **over)))
    return p


def _query(path, sql, params=()):
    con = sqlite3.connect(str(path), timeout=60)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def _records(path) -> pd.DataFrame:
    con = sqlite3.connect(str(path), timeout=60)
    try:
        df = pd.read_sql_query("SELECT * FROM records", con)
    finally:
        con.close()
    return df.drop(columns=["wall_s"]).sort_values(KEY).reset_index(drop=True)


def _units(path) -> pd.DataFrame:
    con = sqlite3.connect(str(path), timeout=60)
    try:
        df = pd.read_sql_query("SELECT unit_id, model, defense, attack, shard, n_examples, config "
                               "FROM units", con)
    finally:
        con.close()
    return df.sort_values("unit_id").reset_index(drop=True)


def _vec(s):
    return None if s is None or (isinstance(s, float) and np.isnan(s)) else json.loads(s)


def assert_same_records(a_path, b_path):
    """Record tables equal up to timing: keys, labels, correctness, states, f-evaluation counts
    and extras exactly; margins within 1e-6; entropies/residuals within 1e-5. Same work units."""
    a, b = _records(a_path), _records(b_path)
    assert len(a) > 0
    assert len(a) == len(b), (f"{len(a)} vs {len(b)} records; only in one: "
                              f"{set(map(tuple, a[KEY].values)) ^ set(map(tuple, b[KEY].values))}")
    assert not a.duplicated(KEY).any() and not b.duplicated(KEY).any()
    exact = KEY + ["label", "correct", "state", "nfev_nograd", "nfev_grad", "unit_id"]
    pd.testing.assert_frame_equal(a[exact], b[exact])
    for u, v in zip(a.extra, b.extra):     # exactly, but the float deviations within 1e-5
        u, v = _vec(u), _vec(v)
        du = (u or {}).pop("deviation", None)
        dv = (v or {}).pop("deviation", None)
        assert u == v and (du is None) == (dv is None)
        if du is not None:
            np.testing.assert_allclose(du, dv, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a.margin.to_numpy(float), b.margin.to_numpy(float), atol=1e-6,
                               rtol=0)
    for col in ("entropies", "residuals"):
        for u, v in zip(a[col], b[col]):
            u, v = _vec(u), _vec(v)
            assert (u is None) == (v is None)
            if u is not None:
                np.testing.assert_allclose(u, v, atol=1e-5, rtol=0)
    pd.testing.assert_frame_equal(_units(a_path), _units(b_path))


def _assert_complete(path):
    u = _units(path)
    assert len(u) == PLANNED and u.unit_id.is_unique
    # every record belongs to a finished unit, and each unit holds exactly its records
    orphans = _query(path, "SELECT COUNT(*) FROM records WHERE unit_id NOT IN "
                           "(SELECT unit_id FROM units)")[0][0]
    assert orphans == 0
    per_unit = dict(_query(path, "SELECT unit_id, COUNT(*) FROM records GROUP BY unit_id"))
    for uid, n in zip(u.unit_id, u.n_examples):
        assert per_unit.get(uid, 0) == n, uid


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli(config):
    return [sys.executable, "-m", "benchmark.cli", "evaluate", str(config), "--quiet"]


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """One uninterrupted single-process run: (config, result, database path)."""
    out = tmp_path_factory.mktemp("reference")
    cfg = _cfg(checkpoints, out)
    n0 = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = evaluate(cfg, progress=False)
    finally:
        torch.set_num_threads(n0)
    return cfg, res, Path(res["db"])


# ------------------------------------------------------------------------------------------------
# 1. configuration errors
# ------------------------------------------------------------------------------------------------

def _ok():
    return {"name": "t", "threat": {"eps": 0.1}, "models": ["deq_tiny_fashion_mnist"],
            "attacks": {"pgd": {"steps": 2}}}


def _with(**over):
    raw = _ok()
    for k, v in over.items():
        raw[k] = v
    return raw


@pytest.mark.parametrize("raw, match", [
    (_with(epochs=3), r"run config: epochs: unknown key"),
    (_with(attacks={"cw": {}}), r"attacks\.cw: unknown attack"),
    (_with(attacks={"pgd": {"stepz": 3}}), r"attacks\.pgd\.stepz: unknown option"),
    (_with(attacks={"pgd": {"steps": 0}}), r"attacks\.pgd\.steps: must be an integer >= 1"),
    (_with(threat={"eps": -0.1}), r"threat\.eps: must be a number in \[0, 1\].*-0\.1"),
    (_with(threat={"eps": 2}), r"threat\.eps: must be a number in \[0, 1\].*got 2"),
    (_with(threat={"eps": 0.1, "norm": "L2"}), r"threat\.norm: only 'Linf'"),
    (_with(attacks={"grid": {"lams": [0.5, 1.5]}}), r"attacks\.grid\.lams: .*\(0, 1\], got 1\.5"),
    (_with(attacks={"grid": {"kas": [1, 0]}}), r"attacks\.grid\.kas: .*>= 1, got 0"),
    (_with(attacks={"grid": {"mode": "fast"}}), r"attacks\.grid\.mode: .*got 'fast'"),
    (_with(models=["deq_tiny_fashion_mnist", "no_such_model"]),
     r"models\[1\]\.name: unknown model 'no_such_model'"),
    (_with(models=["deq_tiny_fashion_mnist", {"name": "deq_tiny_fashion_mnist"}]),
     r"models\[1\]: duplicate model 'deq_tiny_fashion_mnist'.*label"),
    (_with(models=[{"name": "deq_tiny_fashion_mnist", "ckpt": "x.pt"}]),
     r"models\[0\]\.ckpt: unknown key"),
    (_with(models=[{"name": "deq_tiny_fashion_mnist", "defenses": "final"}]),
     r"models\[0\]\.defenses: must be a list"),
    (_with(models=[]), r"models: a non-empty list"),
    (_with(attacks={"autoattack": {"attacks": ["apgd-ce", "cw"]}}),
     r"attacks\.autoattack\.attacks: unknown attack 'cw'"),
    (_with(attacks={"autoattack": {"budget": {"apgd_iters": 3}}}),
     r"attacks\.autoattack\.budget\.apgd_iters: unknown knob"),
    (_with(attacks={"autoattack": {"budget": {"apgd_n_iter": 0}}}),
     r"attacks\.autoattack\.budget\.apgd_n_iter: must be an integer >= 1, got 0"),
    (_with(attacks={"autoattack": {"surrogate": "ui:1,0,0.5"}}),
     r"attacks\.autoattack\.surrogate: ka must be an integer >= 1"),
    (_with(attacks={"pgd": {"surrogate": "phantom"}}), r"attacks\.pgd\.surrogate: unknown surrogate"),
    (_with(attacks={"pgd": {"surrogate": "strongest"}}), r"attacks\.pgd\.surrogate: unknown surrogate"),
    (_with(attacks={"checks": {"surrogate": "nope"}}), r"attacks\.checks\.surrogate: .*'strongest'"),
    (_with(attacks={"checks": {"large_eps": 2}}), r"attacks\.checks\.large_eps: .*\(0, 1\], got 2"),
    (_with(attacks={"checks": {"square_queries": 0}}), r"attacks\.checks\.square_queries: .*>= 1"),
    (_with(attacks={"checks": {"on_test_time_defenses": "no"}}),
     r"attacks\.checks\.on_test_time_defenses: must be true or false"),
    (_with(attacks={"grid": {"preset": "code"}}), r"attacks\.grid\.preset: must be 'reference' or 'paper'"),
    (_with(attacks={"adaptive": {"ka": 0}}), r"attacks\.adaptive\.ka: must be an integer >= 1"),
    (_with(attacks={"adaptive": {"lam": 0}}), r"attacks\.adaptive\.lam: must be a number in \(0, 1\]"),
    (_with(data={"seed": -1}), r"data\.seed: must be an integer >= 0"),
    (_with(data={"dataset": "cifar10"}), r"data\.dataset: 'cifar10' does not match .*'fashion_mnist'"),
    (_with(data={"n": 0}), r"data\.n: must be an integer >= 1"),
    (_with(data={"size": 10}), r"data\.size: unknown key"),
    (_with(shard_size=0), r"shard_size: must be an integer >= 1"),
    (_with(name="a/b"), r"name: a non-empty name without '/'"),
    (_with(device="tpu"), r"device: must be 'cpu' or 'cuda"),
    (_with(attacks={"transfer": {"sources": ["nope@final"]}}),
     r"attacks\.transfer: 'nope@final': no model 'nope'"),
    (_with(attacks={"transfer": {"targets": ["deq_tiny_fashion_mnist@early:3"]}}),
     r"attacks\.transfer: .* not evaluated with defense 'early:3'"),
    (_with(attacks={"transfer": {"surrogates": ["ui:1,0,0.5"]}}),
     r"attacks\.transfer\.surrogates: ka must be an integer >= 1"),
    (_with(models=["deq_tiny_fashion_mnist", "deq_tiny_cifar10"]),
     r"data\.dataset: required when the models come from different datasets"),
])
def test_config_errors_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(raw)


def test_config_valid_and_file_errors(tmp_path):
    cfg = from_dict(_with(models=["deq_tiny_fashion_mnist",
                                  {"name": "deq_tiny_fashion_mnist", "label": "deq2",
                                   "defenses": ["final", "early:3"]}],
                          threat={"eps": "1/10"}))
    assert [m.key for m in cfg.models] == ["deq_tiny_fashion_mnist", "deq2"]
    assert cfg.eps == pytest.approx(0.1) and cfg.data["dataset"] == "fashion_mnist"
    # the hash ignores where and how the run is stored, not what it computes
    h = cfg.hash()
    assert from_dict(_with(models=cfg.to_dict()["models"], threat={"eps": 0.1},
                           output="elsewhere", description="x", batch_size=7)).hash() == h
    assert from_dict(_with(models=cfg.to_dict()["models"], threat={"eps": 0.1}, seed=1)).hash() != h
    with pytest.raises(ConfigError, match="not found: .*missing.yaml"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [a, b\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_run_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_run_config(lst)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_ok()))
    assert load_run_config(good).source == str(good)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs" / "eval")
                                         .glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_are_valid(path):
    """Every run config we ship validates and names registered models; the demo's reduced
    budgets are the ones its header documents."""
    cfg = load_run_config(path)
    assert cfg.models and all(m.name in mz.list_models() or m.checkpoint for m in cfg.models)
    if path.name == "fmnist_zoo_demo.yaml":
        assert (cfg.data["n"], cfg.shard_size) == (48, 48)
        assert cfg.attacks["autoattack"]["budget"] == {
            "apgd_n_iter": 10, "apgd_t_n_target_classes": 2, "fab_n_iter": 10,
            "fab_n_target_classes": 2, "square_n_queries": 200}
        assert cfg.attacks["checks"]["steps"] == 5
        assert cfg.attacks["top_settings"] == {"k": 2, "attacks": ["apgd-ce"],
                                               "budget": {"apgd_n_iter": 10}}
        assert len(cfg.models) == 6 and sum(len(m.defenses) for m in cfg.models) == 10


# ------------------------------------------------------------------------------------------------
# 2. the database and the summary
# ------------------------------------------------------------------------------------------------

@needs_data
def test_evaluate_writes_meta_units_records(reference):
    cfg, res, path = reference
    assert path == cfg.run_dir / "results.sqlite" and path.is_file()
    assert res["complete"] and res["units_run"] == PLANNED
    with ResultsDB(path) as db:
        meta = db.meta()
    assert meta["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert meta["config_hash"] == cfg.hash()
    assert meta["seed"] == 0
    prov = meta["provenance"]
    assert prov["git_commit"] and {"python", "torch", "numpy"} <= set(prov["versions"])
    assert prov["versions"]["torch"] == torch.__version__.split("+")[0] or \
        prov["versions"]["torch"] == torch.__version__
    assert meta["start_time"] <= meta["end_time"] <= time.time()
    assert meta["dataset"]["n"] == N and len(meta["dataset"]["indices"]) == N
    sel = meta["early_select/deq_tiny_fashion_mnist"]
    assert {"index", "selection"} <= set(sel)
    _assert_complete(path)
    recs = _records(path)
    assert set(recs.example) == set(meta["dataset"]["indices"])
    # states as reported: final, the selected early state, the CNN's output
    for (mk, dk), g in recs.groupby(["model", "defense"]):
        state = {"final": "final", "early:select": f"z[{sel['index']}]"}[dk] \
            if mk.startswith("deq") else "output"
        assert set(g.state.dropna()) == {state}, (mk, dk)
    # DEQ clean passes carry per-state entropies and residuals
    clean_deq = recs[(recs.attack == "clean") & recs.model.str.startswith("deq")]
    assert clean_deq.entropies.notna().all() and clean_deq.residuals.notna().all()
    # DEQ attack outcomes carry the per-state deviation of the perturbed from the clean
    # dynamics (Fig. 3c): N = 8 states, >= 0. PGD perturbs exactly the clean-correct points
    # (random start), so their dynamics moved and the others' did not (x_adv = x there)
    deq = recs[recs.model.str.startswith("deq")]
    for (dk, attack), g in deq[deq.attack.isin(["pgd", "autoattack"])].groupby(["defense", "attack"]):
        devs = [_vec(e).get("deviation") for e in g.extra]
        assert all(isinstance(d, list) and len(d) == 8 for d in devs), attack
        d = np.array(devs)
        assert (d >= 0).all(), attack
        if attack == "pgd":
            clean = deq[(deq.attack == "clean") & (deq.defense == dk)].set_index("example").correct
            cc = clean.reindex(g.example).to_numpy() == 1
            assert cc.any() and (d[cc].max(1) > 1e-4).all() and (d[~cc] == 0).all(), dk
    # the CNN has no grid records; its grid units are committed as skipped
    assert not len(recs[(recs.model == "small_cnn_fashion_mnist") & (recs.attack == "grid")])
    u = _units(path)
    skipped = u[(u.model == "small_cnn_fashion_mnist") & (u.attack == "grid")]
    assert len(skipped) == N_SHARDS and (skipped.n_examples == 0).all()
    assert all(json.loads(c) == {"skipped": True} for c in skipped.config)


@needs_data
def test_summary_equals_aggregates_of_records(reference):
    cfg, res, path = reference
    summ = res["summary"]
    with ResultsDB(path) as db:
        pd.testing.assert_frame_equal(summarize(db), summ)
    recs = _records(path)
    assert len(summ) == len(PAIRS)
    assert list(zip(summ.model, summ.defense)) == PAIRS
    attack_sel = {"pgd": None, "grid": "worst", "autoattack": "ensemble"}
    nontrivial = 0
    for _, row in summ.iterrows():
        g = recs[(recs.model == row.model) & (recs.defense == row.defense)]
        clean = g[g.attack == "clean"].set_index("example").correct
        assert row.n == N == len(clean)
        assert row.clean == pytest.approx(clean.mean())
        nf = g[g.attack == "clean"]
        assert row.f_evals_per_forward == pytest.approx((nf.nfev_nograd + nf.nfev_grad).mean())
        per = {"clean": clean}
        for att, setting in attack_sel.items():
            a = g[g.attack == att]
            if setting is not None:
                a = a[a.setting == setting]
            if not len(a):
                assert pd.isna(row.get(att)), (row.model, att)
                continue
            s = a.set_index("example").correct
            assert s.index.is_unique and set(s.index) == set(clean.index)
            per[att] = s
            assert row[att] == pytest.approx(s.mean()), (row.model, row.defense, att)
        allc = pd.concat(per, axis=1).min(axis=1)
        assert row.ALL == pytest.approx(allc.mean())
        assert row.ALL <= min(row[k] for k in per) + 1e-12
        # an example robust in ALL is correct under every attack record, grid settings included
        robust = set(allc[allc == 1].index)
        others = g[g.example.isin(robust)]
        assert (others.correct == 1).all()
        # the grid's worst case is the per-example minimum over the settings recorded
        grid = g[(g.attack == "grid") & (g.setting != "worst")]
        if len(grid):
            assert grid.setting.nunique() == 8  # i = 1..8, Ka = 1, lambda = 1
            worst_min = grid.groupby("example").correct.min()
            assert (worst_min.reindex(per["grid"].index) == per["grid"]).all()
            assert (per["grid"] <= per["clean"]).all()
            counts = grid.groupby("setting").example.nunique()
            if (counts == N).all():
                means = grid.groupby("setting").correct.mean()
                assert row.min_over_means == pytest.approx(means.min())
                assert row.strongest_setting == means.idxmin()
            else:
                assert pd.isna(row.get("min_over_means"))
        nontrivial += 0 < row.ALL or 0 < row.clean
    assert nontrivial >= 2, summ  # the fixture models are not trivially wrong everywhere


# ------------------------------------------------------------------------------------------------
# 3. re-running
# ------------------------------------------------------------------------------------------------

@needs_data
def test_rerun_is_a_noop_and_other_config_is_refused(reference, checkpoints, tmp_path):
    cfg, res, path = reference
    # a copy of the finished run folder (the hash ignores the output folder)
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    again = evaluate(_cfg(checkpoints, tmp_path, description="again", batch_size=5),
                     progress=False)
    assert again["units_run"] == 0 and again["complete"]
    pd.testing.assert_frame_equal(again["summary"], res["summary"])
    assert_same_records(path, again["db"])
    n_records = _query(again["db"], "SELECT COUNT(*) FROM records")[0][0]
    for over in ({"seed": 1}, {"threat": {"eps": 0.1}},
                 {"attacks": {"pgd": {"steps": 3}}}):
        with pytest.raises(ValueError, match="different configuration"):
            evaluate(_cfg(checkpoints, tmp_path, **over), progress=False)
    assert _query(again["db"], "SELECT COUNT(*) FROM records")[0][0] == n_records
    with ResultsDB(again["db"]) as db:
        assert db.get_meta("config_hash") == cfg.hash()
        assert db.get_meta("weights") == cfg.weights()
    # the same config with other weights in the same checkpoint file (a re-trained model):
    # refused, naming the model whose weights changed
    ck = Path(checkpoints["cnn"])
    saved = ck.read_bytes()
    try:
        torch.manual_seed(1)
        mz.save_checkpoint(mz.create("small_cnn_fashion_mnist"), ck)
        with pytest.raises(ValueError, match="weights of small_cnn_fashion_mnist changed"):
            evaluate(_cfg(checkpoints, tmp_path), progress=False)
    finally:
        ck.write_bytes(saved)
    assert _query(again["db"], "SELECT COUNT(*) FROM records")[0][0] == n_records


# ------------------------------------------------------------------------------------------------
# 4. resume after SIGKILL (subprocess)
# ------------------------------------------------------------------------------------------------

@needs_data
def test_resume_after_sigkill_equals_uninterrupted(reference, checkpoints, tmp_path):
    _, _, ref_path = reference
    config = _write_yaml(checkpoints, tmp_path)
    db = tmp_path / "tiny" / "results.sqlite"
    proc = subprocess.Popen(_cli(config), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                break
            if db.is_file():
                try:
                    k = _query(db, "SELECT COUNT(*) FROM units")[0][0]
                except sqlite3.OperationalError:  # schema not created yet
                    k = 0
                if k >= 4:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = k
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        out = proc.communicate()[0].decode(errors="replace")
    assert killed_at is not None, f"run ended (rc {proc.returncode}) before it could be killed:\n{out}"
    assert proc.returncode == -signal.SIGKILL
    done = _query(db, "SELECT COUNT(*) FROM units")[0][0]
    assert 4 <= done < PLANNED, done
    # nothing of an unfinished unit is in the database
    assert _query(db, "SELECT COUNT(*) FROM records WHERE unit_id NOT IN "
                      "(SELECT unit_id FROM units)")[0][0] == 0
    with ResultsDB(db) as d:
        assert d.get_meta("end_time") is None
        start = d.get_meta("start_time")
    # restart with the same command: it runs exactly the missing units
    r = subprocess.run(_cli(config), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{PLANNED - done} work units run now" in r.stdout, r.stdout
    assert "incomplete" not in r.stdout
    _assert_complete(db)
    with ResultsDB(db) as d:
        assert d.get_meta("start_time") == start and d.get_meta("end_time") >= start
    assert_same_records(ref_path, db)


# ------------------------------------------------------------------------------------------------
# 5. stop_after_units + continue == one run
# ------------------------------------------------------------------------------------------------

@needs_data
def test_partial_then_continued_equals_single_run(reference, checkpoints, tmp_path):
    _, ref_res, ref_path = reference
    # 14 units: past the first units of (deq, early:select), whose selection is stored in meta
    part = evaluate(_cfg(checkpoints, tmp_path), progress=False, stop_after_units=14)
    assert part["units_run"] == 14 and not part["complete"]
    assert _query(part["db"], "SELECT COUNT(*) FROM units")[0][0] == 14
    with ResultsDB(part["db"]) as d:
        assert d.get_meta("end_time") is None
        sel = d.get_meta("early_select/deq_tiny_fashion_mnist")
    assert sel is not None
    rest = evaluate(_cfg(checkpoints, tmp_path), progress=False)
    assert rest["units_run"] == PLANNED - 14 and rest["complete"]
    with ResultsDB(rest["db"]) as d:
        assert d.get_meta("early_select/deq_tiny_fashion_mnist") == sel
    _assert_complete(rest["db"])
    assert_same_records(ref_path, rest["db"])
    pd.testing.assert_frame_equal(rest["summary"], ref_res["summary"])


# ------------------------------------------------------------------------------------------------
# 6. torchrun-style sharding over 2 gloo processes
# ------------------------------------------------------------------------------------------------

@needs_data
def test_two_process_sharding_equals_single_process(reference, checkpoints, tmp_path,
                                                   monkeypatch):
    _, ref_res, ref_path = reference
    ref_summary = ref_res["summary"]
    config = _write_yaml(checkpoints, tmp_path)
    port = _free_port()
    procs = [subprocess.Popen(_cli(config), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2,
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(outs)
    run = tmp_path / "tiny"
    r0, r1, merged = (run / "results.rank0.sqlite", run / "results.rank1.sqlite",
                      run / "results.sqlite")
    assert r0.is_file() and r1.is_file() and merged.is_file()
    # rank r took shards r, r + 2, ...: rank 0 shards 0-4 and 8-12, rank 1 shard 4-8
    per_pair = len(PAIRS) * len(ATTACKS)
    assert sorted(set(_units(r0).shard)) == ["0-4", "8-12"] and len(_units(r0)) == 2 * per_pair
    assert sorted(set(_units(r1).shard)) == ["4-8"] and len(_units(r1)) == per_pair
    assert set(_query(r1, "SELECT rank FROM units")) == {(1,)}
    _assert_complete(merged)
    assert_same_records(ref_path, merged)
    with ResultsDB(merged) as d:
        meta = d.meta()
    with ResultsDB(ref_path) as d:
        ref_meta = d.meta()
    assert meta["config_hash"] == ref_meta["config_hash"]
    assert meta["dataset"] == ref_meta["dataset"]
    assert meta["early_select/deq_tiny_fashion_mnist"] == ref_meta["early_select/deq_tiny_fashion_mnist"]
    assert "end_time" in meta
    assert "results database:" in outs[0] and "work units run now" in outs[0]
    # the same command again (here rank by rank, without a process group) has nothing to do
    cfg = load_run_config(config)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert evaluate(cfg, progress=False, rank=1, world=2)["units_run"] == 0
    assert evaluate(cfg, progress=False, rank=0, world=2)["units_run"] == 0
    assert_same_records(ref_path, merged)
    # and a single-process run finds the merged database complete
    again = evaluate(cfg, progress=False, rank=0, world=1)
    assert again["units_run"] == 0 and again["complete"] and again["db"] == merged
    pd.testing.assert_frame_equal(again["summary"], ref_summary)


@needs_data
def test_sharded_run_refuses_merged_db_of_other_config(reference, checkpoints, tmp_path,
                                                       monkeypatch):
    """Rank 0 merges into results.sqlite and skips the units already there: a sharded run of
    another configuration must be refused by every rank, not be silently 'merged' into it."""
    cfg, _, ref_path = reference
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for rank in (1, 0):
        with pytest.raises(ValueError, match="results.sqlite holds results of a different"):
            evaluate(_cfg(checkpoints, tmp_path, seed=1), progress=False, rank=rank, world=2)
    assert not list((tmp_path / cfg.name).glob("results.rank*.sqlite"))
    assert_same_records(ref_path, tmp_path / cfg.name / "results.sqlite")


# ------------------------------------------------------------------------------------------------
# 7. ResultsDB.commit_unit atomicity and merge
# ------------------------------------------------------------------------------------------------

def _rec(example, correct=1, **kw):
    r = {"setting": "-", "example": example, "label": 3, "correct": correct, "margin": 0.5,
         "state": "final", "entropies": [0.1, 0.2], "nfev_nograd": 9.0, "nfev_grad": 0.0}
    r.update(kw)
    return r


def _commit(db, uid, examples, **kw):
    return db.commit_unit(uid, "m", "final", "clean", uid, [_rec(e) for e in examples], 1.0,
                          {"a": 1}, **kw)


def test_commit_unit_is_atomic(tmp_path):
    with ResultsDB(tmp_path / "r.sqlite") as db:
        assert _commit(db, "u1", [0, 1]) == 2
        bad = [_rec(2), _rec(3), _rec(4)]
        del bad[2]["correct"]  # the 3rd record violates NOT NULL
        with pytest.raises(sqlite3.IntegrityError):
            db.commit_unit("u2", "m", "final", "clean", "2-5", bad, 1.0)
        assert not db.is_done("u2") and db.done_units() == {"u1"}
        assert db.count("records") == 2
        assert db.conn.execute("SELECT COUNT(*) FROM records WHERE unit_id = 'u2'").fetchone()[0] == 0
        # a duplicate (model, defense, attack, setting, example) of a committed unit: rolled back
        with pytest.raises(sqlite3.IntegrityError):
            _commit(db, "u3", [5, 1])
        assert not db.is_done("u3") and db.count("records") == 2
        # committing a finished unit again is an error and writes nothing
        with pytest.raises(RuntimeError, match="already in the database"):
            _commit(db, "u1", [7, 8])
        assert db.count("records") == 2 and db.count("units") == 1
        # the database is still usable after the failures
        assert _commit(db, "u2", [2, 3, 4]) == 3
        assert db.done_units() == {"u1", "u2"}
        f = db.records_frame(unit_id="u2")
        assert sorted(f.example) == [2, 3, 4] and json.loads(f.entropies[0]) == [0.1, 0.2]
        assert db.conn.execute("SELECT n_examples, config FROM units WHERE unit_id = 'u2'"
                               ).fetchone() == (3, json.dumps({"a": 1}))
    # a second connection (another process) sees exactly the committed state
    with ResultsDB(tmp_path / "r.sqlite") as db:
        assert db.done_units() == {"u1", "u2"} and db.count("records") == 5


def test_kept_adversarial_examples_round_trip_and_merge(tmp_path):
    """A unit's kept adversarial examples are stored bit for bit with its records (one
    transaction), read back per example with the unit's config, copied by merge, and a unit
    whose row count does not match its examples is refused before anything is written."""
    a, t = tmp_path / "a.sqlite", tmp_path / "t.sqlite"
    xs = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    xs[0, 0, 0, 0] = 1e-42  # a denormal survives the bytes
    with ResultsDB(a) as db:
        db.commit_unit("m|d|pgd|0-3", "m", "d", "pgd", "0-3",
                       [{"setting": "s", "example": e, "label": 0, "correct": 1} for e in (5, 6, 7)],
                       1.0, {"attack": {"steps": 2}}, adversarial={"pgd": ([5, 6, 7], xs)})
        got = db.adversarial("m", "d", "pgd", "pgd", [7, 5, 9])
        assert len(got) == 1 and got[0][0] == {"attack": {"steps": 2}}
        assert set(got[0][1]) == {5, 7}
        assert torch.equal(got[0][1][5], xs[0]) and torch.equal(got[0][1][7], xs[2])
        assert db.adversarial("m", "d", "pgd", "other", [5]) == []
        assert db.adversarial("m", "d", "autoattack", "pgd", [5]) == []
        with pytest.raises(ValueError, match="2 examples, 3 rows"):
            db.commit_unit("m|d|pgd|3-5", "m", "d", "pgd", "3-5", [], 1.0,
                           adversarial={"pgd": ([1, 2], xs)})
        assert db.count("adversarial") == 3 and not db.is_done("m|d|pgd|3-5")
    assert merge(t, [a]) == 1
    with ResultsDB(t) as db:
        assert db.count("adversarial") == 3
        assert torch.equal(db.adversarial("m", "d", "pgd", "pgd", [6])[0][1][6], xs[1])


def test_merge_skips_units_already_present(tmp_path):
    a, b, t = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "t.sqlite"
    with ResultsDB(a) as db:
        db.set_meta("config_hash", "h")
        _commit(db, "u1", [0, 1])
        _commit(db, "u2", [2, 3], rank=0)
    with ResultsDB(b) as db:
        db.set_meta("config_hash", "other")
        db.set_meta("only_b", 1)
        # u2 again (same primary keys: merging it would violate the records' PRIMARY KEY)
        _commit(db, "u2", [2, 3], rank=1)
        _commit(db, "u3", [4], rank=1)
    with ResultsDB(t) as db:
        _commit(db, "u1", [0, 1])
    assert merge(t, [a, b]) == 2  # u2 (from a) and u3; u1 was there, u2 of b is skipped
    with ResultsDB(t) as db:
        assert db.done_units() == {"u1", "u2", "u3"}
        assert db.count("records") == 5
        f = db.records_frame()
        assert not f.duplicated(KEY).any()
        assert dict(db.conn.execute("SELECT unit_id, rank FROM units")) == {
            "u1": 0, "u2": 0, "u3": 1}
        # meta: first source wins, missing keys come from later sources
        assert db.get_meta("config_hash") == "h" and db.get_meta("only_b") == 1
    assert merge(t, [a, b]) == 0
    with ResultsDB(t) as db:
        assert db.count("records") == 5 and db.count("units") == 3
    # a rank's database that is not there (another node, no shared folder) is an error, and
    # nothing is merged or created
    gone = tmp_path / "results.rank1.sqlite"
    with pytest.raises(FileNotFoundError, match="shared filesystem"):
        merge(t, [a, gone])
    assert not gone.exists()


# ------------------------------------------------------------------------------------------------
# 5. deqbench sweep / deqbench transfer
# ------------------------------------------------------------------------------------------------

@needs_data
def test_sweep_then_transfer_matrix(checkpoints, tmp_path, capsys):
    """``sweep`` runs only clean + grid; ``transfer`` adds one record per (target, source,
    example) whose diagonal is the target's own PGD with its strongest grid setting; the summary's
    ALL folds the transfer attacks into the per-example worst case."""
    from attacks.evaluation import derive_seed, pgd_attack, setting_name
    from attacks.surrogates import JudgedModule
    from benchmark.cli import main
    from benchmark.data import load_dataset, subset
    from benchmark.runner import _parse_setting, _resolve_defense, _strongest_setting

    raw = _raw(checkpoints, tmp_path, name="tr",
               attacks={"grid": {"steps": 2, "kas": [1], "lams": [1.0], "mode": "full"},
                        "transfer": {"steps": 2}})
    cfg_path = tmp_path / "tr.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(cfg_path), "--quiet"]) == 0
    db = tmp_path / "tr" / "results.sqlite"
    recs = _records(db)
    assert set(recs.attack) == {"clean", "grid"}
    out = capsys.readouterr().out
    assert "min_over_means" in out and str(db) in out
    assert main(["transfer", str(cfg_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "transfer matrix" in out
    recs = _records(db)
    t = recs[recs.attack == "transfer"]
    sources = {f"{m}@{d}" for m, d in PAIRS}
    assert len(t) == len(PAIRS) * len(sources) * N
    for (mk, dk), g in t.groupby(["model", "defense"]):
        assert set(g.setting) == sources and g.groupby("setting").example.nunique().eq(N).all()
        clean = recs[(recs.attack == "clean") & (recs.model == mk) & (recs.defense == dk)]
        wrong = set(clean[clean.correct == 0].example)
        assert not set(g[g.correct == 1].example) & wrong  # never robust when wrong clean

    cfg = from_dict(raw)
    ds = subset(load_dataset("fashion_mnist", "test"), N, seed=0)
    with ResultsDB(db) as rdb:
        for mk, dk in PAIRS:
            spec = next(m for m in cfg.models if m.key == mk)
            model = mz.load(spec.name, checkpoint=spec.checkpoint)
            defense = _resolve_defense(rdb, cfg, model, dk, mk, False) if mk.startswith("deq") else None
            diag = t[(t.model == mk) & (t.defense == dk) & (t.setting == f"{mk}@{dk}")].set_index("example")
            for lo in range(0, N, SHARD):
                x, y = ds.images[lo:lo + SHARD], ds.labels[lo:lo + SHARD]
                idx = [int(i) for i in ds.indices[lo:lo + SHARD]]
                sur = None
                if mk.startswith("deq"):
                    best = _strongest_setting(rdb, mk, dk, idx)
                    assert best is not None
                    sur = _parse_setting(best)
                name = setting_name(sur) if sur is not None else "model"
                own = pgd_attack(JudgedModule(model, defense, sur), x, y, cfg.eps, cfg.eps / 4, 2,
                                 seed=derive_seed(0, "transfer", mk, dk, name, idx[0]))
                assert diag.loc[idx].correct.tolist() == own.correct.int().tolist(), (mk, dk, lo)
        summ = summarize(rdb)
    assert "transfer" in summ.columns
    assert (summ.ALL <= summ.transfer + 1e-12).all() and (summ.ALL <= summ.grid.fillna(1) + 1e-12).all()
    # targets restrict the rows, and a config without the section is refused clearly
    with pytest.raises(ValueError, match="no attacks.transfer section"):
        evaluate(from_dict(_raw(checkpoints, tmp_path, name="x")), progress=False, only={"transfer"})


@needs_data
def test_obfuscation_checks_become_records_flags_and_leaderboard_fields(checkpoints, tmp_path):
    from benchmark.reports import leaderboard_from_db
    from benchmark.runner import flags_from_records
    raw = _raw(checkpoints, tmp_path, name="chk",
               attacks={"pgd": {"steps": 2},
                        "checks": {"steps": 2, "square_queries": 10, "large_eps": 0.5}})
    raw["models"][0]["defenses"] = ["final"]
    res = evaluate(from_dict(raw), progress=False)
    recs = _records(res["db"])
    c = recs[recs.attack == "checks"]
    assert set(c.setting) == {"pgd2", "pgd4", "square10", "large_eps0.5", "clean_agreement"}
    assert (c.groupby("setting").example.nunique() == N).all()
    for (mk, dk), g in recs.groupby(["model", "defense"]):
        flags = flags_from_records(g)
        clean = g[g.attack == "clean"].set_index("example").correct
        big = c[(c.model == mk) & (c.setting == "large_eps0.5")].set_index("example").correct
        # at 5x the eps the attack must win almost everywhere on these weak models
        assert flags["large_eps_not_zero"]["accuracy"] == pytest.approx(
            float((big.reindex(clean.index) * clean).mean()))
        assert set(flags) >= {"black_box_stronger", "more_iterations_raise_accuracy",
                              "large_eps_not_zero", "surrogate_disagrees_on_clean", "any"}
        agree = flags["surrogate_disagrees_on_clean"]["agreement"]
        assert agree == 1.0 if mk.startswith("small_cnn") else 0.0 <= agree <= 1.0
    with ResultsDB(res["db"]) as db:
        summ = summarize(db).set_index("model")
    # PGD-2k and Square count in ALL, the large-eps attack does not
    for mk, row in summ.iterrows():
        g = recs[(recs.model == mk) & ((recs.attack != "checks")
                                       | recs.setting.isin(["pgd2", "pgd4", "square10"]))]
        assert row.ALL == pytest.approx(g.groupby("example").correct.min().mean())
        assert isinstance(row["flags"], str)
    paths = leaderboard_from_db(res["db"], root=tmp_path / "lb")
    entries = [json.loads(p.read_text()) for p in paths]
    assert all("flags" in e["deq"] and "any" not in e["deq"]["flags"] for e in entries)
    deq_entry = next(e for e in entries if e["name"] == "deq_tiny_fashion_mnist")
    assert deq_entry["deq"]["defense_params"] == {"steps": 9, "lam": 0.5, "first_full": True,
                                                  "from_state": "best"}
    assert "defense_params" not in next(e for e in entries if e["name"].startswith("small_cnn"))["deq"]
    # an entry this run wrote earlier (a defense since dropped) is removed on the next write;
    # another run's entry in the same folder is kept
    folder = paths[0].parent
    stale, other = dict(entries[0]), dict(entries[0])
    stale.update(name="gone+early-3", footnote="deqbench run chk; training: untrained")
    other.update(name="other_run_model", footnote="deqbench run another; training: x")
    for e in (stale, other):
        (folder / f"{e['name']}.json").write_text(json.dumps(e))
    again = leaderboard_from_db(res["db"], root=tmp_path / "lb")
    assert sorted(again) == sorted(paths)
    assert not (folder / "gone+early-3.json").exists() and (folder / "other_run_model.json").exists()
    assert "other_run_model" in (folder / "leaderboard.md").read_text()
    assert "gone+early-3" not in (folder / "leaderboard.md").read_text()


@needs_data
def test_checks_reuse_the_ensembles_square_on_the_points_it_ran_on(checkpoints, tmp_path):
    """With AutoAttack's Square at the checks' budget, the checks' Square record of a point
    AutoAttack's Square ran on IS that result (correct, margin; no f-evaluations charged twice),
    and Square runs only on the other points; ``share_square: false`` runs it everywhere."""
    from benchmark.suite.checks import ensemble_square
    attacks = {"grid": {"steps": 2, "kas": [1], "lams": [1.0]},
               "autoattack": {"attacks": ["apgd-ce", "square"],
                              "budget": {"apgd_n_iter": 2, "square_n_queries": 12}},
               "checks": {"steps": 1, "square_queries": 12, "large_eps": 0.5}}
    runs = {}
    for share in (True, False):
        raw = _raw(checkpoints, tmp_path / str(share), name=f"sq{share}", threat={"norm": "Linf", "eps": 0.02},
                   attacks={**attacks, "checks": {**attacks["checks"], "share_square": share}})
        raw["models"][0]["defenses"] = ["final"]
        runs[share] = evaluate(from_dict(raw), progress=False)
        assert runs[share]["complete"]
    shared_total = own_total = 0
    for share, res in runs.items():
        recs = _records(res["db"])
        for mk, g in recs.groupby("model"):
            aa = g[g.attack == "autoattack"].set_index("example")
            sq = g[(g.attack == "checks") & (g.setting == "square12")].set_index("example")
            clean = g[g.attack == "clean"].set_index("example").correct
            assert sorted(sq.index) == sorted(clean.index) and len(sq) == N
            members = {e: json.loads(x)["members"] for e, x in aa.extra.items()}
            ran = [e for e, m in members.items() if "square" in m]
            # the ensemble's Square ran exactly on the points its APGD left robust
            assert ran == [e for e, m in members.items() if m.get("apgd-ce", [0])[0] == 1]
            for e in ran:
                assert aa.correct[e] == members[e]["square"][0]
            extras = {e: json.loads(x) for e, x in sq.extra.items()}
            reused = [e for e, x in extras.items() if x.get("from") == "autoattack"]
            assert (sq.correct <= clean.reindex(sq.index)).all()
            if share:
                assert reused == ran
                shared_total += len(ran)
                for e in ran:
                    assert sq.correct[e] == members[e]["square"][0]
                    assert sq.margin[e] == pytest.approx(members[e]["square"][1], abs=0, rel=1e-12)
                    assert sq.nfev_nograd[e] == 0 and sq.nfev_grad[e] == 0
                    assert extras[e]["broken_by"] == ([] if sq.correct[e] else ["square"])
                own = [e for e in sq.index if e not in ran and clean[e]]
                assert (sq.nfev_nograd[own] > 0).all() or not mk.startswith("deq")  # CNN: no f
                own_total += len(own)
                with ResultsDB(res["db"]) as db:
                    assert set(ensemble_square(db, mk, "final", list(map(int, sq.index)), 0.02, 12)) == set(ran)
                    assert ensemble_square(db, mk, "final", list(map(int, sq.index)), 0.02, 13) == {}
                    assert ensemble_square(db, mk, "final", list(map(int, sq.index)), 0.05, 12) == {}
            else:
                assert reused == []
                assert (sq.nfev_nograd[clean[clean == 1].index] > 0).all() or not mk.startswith("deq")
        cfgs = [json.loads(c) for c in _units(res["db"]).query("attack == 'checks'").config]
        assert sum(c["attack"]["square_from_autoattack"] for c in cfgs) == (shared_total if share else 0)
    assert shared_total > 0 and own_total > 0   # both kinds of point occur in the sample
    with pytest.raises(ConfigError, match=r"attacks\.checks\.share_square: must be true or false"):
        from_dict(_raw(checkpoints, tmp_path, attacks={"checks": {"share_square": "yes"}}))


def test_table4_and_transfer_reuse_the_attacks_they_would_repeat(checkpoints, tmp_path):
    """Table 4's APGD-CE at the strongest setting is AutoAttack's first member (same gradient,
    eps and knobs: its examples are re-judged on the reported forward, not re-attacked), and
    transfer from a source whose PGD unit ran transfer's attack (here the CNN) transfers that
    unit's examples; ``share_autoattack`` / ``reuse_pgd: false`` attack again, and nothing is
    kept in the database's ``adversarial`` table."""
    attacks = {"pgd": {"steps": 2},
               "grid": {"steps": 2, "kas": [1], "lams": [1.0]},
               "autoattack": {"attacks": ["apgd-ce", "square"],
                              "budget": {"apgd_n_iter": 2, "square_n_queries": 8}},
               "top_settings": {"k": 1, "attacks": ["apgd-ce"], "budget": {"apgd_n_iter": 2}},
               "transfer": {"steps": 2}}
    for share in (True, False):
        raw = _raw(checkpoints, tmp_path / str(share), name=f"t4{share}",
                   attacks={**attacks,
                            "top_settings": {**attacks["top_settings"], "share_autoattack": share},
                            "transfer": {**attacks["transfer"], "reuse_pgd": share}})
        raw["models"][0]["defenses"] = ["final"]
        res = evaluate(from_dict(raw), progress=False)
        assert res["complete"]
        recs = _records(res["db"])
        deq = recs[recs.model.str.startswith("deq")]
        units = _units(res["db"])
        t4conf = json.loads(units.query("attack == 'top_settings' and model.str.startswith('deq')",
                                        engine="python").config.iloc[0])["attack"]
        label = f"apgd-ce@{t4conf['settings'][0]}"
        t4 = deq[(deq.attack == "top_settings") & (deq.setting == label)].set_index("example")
        aa = deq[deq.attack == "autoattack"].set_index("example")
        clean = deq[deq.attack == "clean"].set_index("example").correct
        assert len(t4) == N and sorted(t4.index) == sorted(clean.index)
        extras = {e: json.loads(x) for e, x in t4.extra.items()}
        with ResultsDB(res["db"]) as db:
            n_kept = db.count("adversarial")
            cnn_pgd = db.adversarial("small_cnn_fashion_mnist", "final", "pgd", "pgd",
                                     list(map(int, clean.index)))
        tr = recs[recs.attack == "transfer"]
        from_pgd = {s: json.loads(x)["from_pgd"] for s, x in zip(tr.setting, tr.extra)}
        if share:
            assert all(x.get("from") == "autoattack" for x in extras.values())
            members = {e: json.loads(x)["members"] for e, x in aa.extra.items()}
            for e in t4.index:
                if clean[e]:  # AutoAttack's first member ran here: its result, re-judged
                    c, m = members[e]["apgd-ce"]
                    assert t4.correct[e] == c
                    assert t4.margin[e] == pytest.approx(m, rel=1e-5, abs=1e-5)
                else:
                    assert t4.correct[e] == 0 and extras[e]["broken_by"] == ["clean"]
            assert (t4.nfev_grad == 0).all() and (t4.nfev_nograd > 0).all()
            assert t4.entropies.notna().all()  # the dynamics at the reused examples
            # kept: AutoAttack's first member of the DEQ (N rows) and the CNN's PGD (N rows);
            # not the DEQ's PGD (transfer attacks a DEQ source with its strongest grid setting)
            assert n_kept == 2 * N and sum(len(xs) for _, xs in cnn_pgd) == N
            assert len(cnn_pgd) == len(units.query("attack == 'pgd'")) // 2  # one per shard
            assert from_pgd["small_cnn_fashion_mnist@final"] == ["model"]
            assert from_pgd["deq_tiny_fashion_mnist@final"] == []
            # the CNN attacked with its own PGD examples: exactly its PGD records
            own = tr[(tr.model == "small_cnn_fashion_mnist")
                     & (tr.setting == "small_cnn_fashion_mnist@final")].set_index("example")
            pgd = recs[(recs.model == "small_cnn_fashion_mnist")
                       & (recs.attack == "pgd")].set_index("example")
            assert (own.correct == pgd.correct.reindex(own.index)).all()
        else:
            assert not any(x.get("from") for x in extras.values())
            assert n_kept == 0 and cnn_pgd == []
            assert all(v == [] for v in from_pgd.values())
    with pytest.raises(ConfigError, match=r"attacks\.top_settings\.share_autoattack: must be true"):
        from_dict(_raw(checkpoints, tmp_path, attacks={**attacks, "top_settings": {
            "share_autoattack": "yes"}}))
    with pytest.raises(ConfigError, match=r"attacks\.transfer\.reuse_pgd: must be true"):
        from_dict(_raw(checkpoints, tmp_path, attacks={**attacks, "transfer": {"reuse_pgd": 1}}))
    with pytest.raises(ConfigError, match=r"attacks\.grid\.skip_last_f: must be true"):
        from_dict(_raw(checkpoints, tmp_path, attacks={**attacks, "grid": {"skip_last_f": "no"}}))


def test_state_deviation_of_real_trajectories():
    """||z~[t] - z[t]|| / ||z[t]|| per example and state, checked against the states themselves:
    0 for the same input, > 0 and equal to the hand computation for a perturbed one."""
    from benchmark.runner import state_deviation
    torch.manual_seed(0)
    model = mz.create("deq_tiny_fashion_mnist", dropout=0.0).eval()
    x = torch.rand(3, 1, 28, 28)
    xt = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        clean, again, pert = (model.run(v).trajectory for v in (x, x, xt))
    assert state_deviation(clean, again).abs().max() == 0
    d = state_deviation(clean, pert)
    T = min(clean.num_states, pert.num_states)
    assert d.shape == (3, T) and T == model.solver.max_iter
    for t in (1, T):
        z, zt = clean.state(t).flatten(1), pert.state(t).flatten(1)
        expect = (zt - z).norm(dim=1) / z.norm(dim=1)
        torch.testing.assert_close(d[:, t - 1], expect)
    assert (d > 0).all()


def test_transfer_sources_with_a_dict_defense(tmp_path):
    """A dict defense (e.g. a Tf x R setting of Sec. 3.2) is a transfer source/target written as
    its JSON key -- the default all-pairs list of a run with such a defense is valid."""
    from benchmark.run_config import parse_source
    from benchmark.runner import _transfer_sources
    er = {"name": "entropy_reduction", "tf": 1, "r": 2}
    ck = {"deq": "unused.pt", "cnn": "unused.pt"}
    raw = _raw(ck, tmp_path, attacks={"transfer": {"steps": 2}})
    raw["models"][0]["defenses"] = ["final", er]
    cfg = from_dict(raw)
    srcs = _transfer_sources(cfg)
    key = 'deq_tiny_fashion_mnist@{"name": "entropy_reduction", "r": 2, "tf": 1}'
    assert key in srcs and len(srcs) == 3
    m, d = parse_source(key, cfg)
    assert m.name == "deq_tiny_fashion_mnist" and d == er
    m, d = parse_source('deq_tiny_fashion_mnist@{"tf": 1, "r": 2, "name": "entropy_reduction"}', cfg)
    assert d == er                                   # any key order of the same JSON
    raw["attacks"]["transfer"]["sources"] = ['deq_tiny_fashion_mnist@{"name": "entropy_reduction"}']
    with pytest.raises(ConfigError, match="is not evaluated with defense"):
        from_dict(raw)


@needs_data
def test_top_settings_table4(checkpoints, tmp_path):
    """attacks.top_settings (the paper's Table 4): APGD-CE with each of the top-k grid settings
    as gradient and Square once, judged on the reported forward; their records count in ALL and
    Table 4 lists PGD / APGD-CE / Square per top setting."""
    from benchmark import tables as T
    raw = _raw(checkpoints, tmp_path, name="top",
               attacks={"grid": {"steps": 2, "kas": [1, 2], "lams": [1.0], "mode": "full"},
                        "top_settings": {"k": 2, "attacks": ["apgd-ce", "square"],
                                         "budget": {"apgd_n_iter": 3, "square_n_queries": 5}}})
    raw["models"] = [{"name": "deq_tiny_fashion_mnist", "checkpoint": checkpoints["deq"],
                      "defenses": ["final"]}]
    res = evaluate(from_dict(raw), progress=False)
    recs = _records(res["db"])
    top = recs[recs.attack == "top_settings"]
    labels = sorted(set(top.setting))
    assert len(labels) == 3 and "square" in labels
    assert sum(lab.startswith("apgd-ce@ui(") for lab in labels) == 2
    assert (top.groupby("setting").example.nunique() == N).all()
    with ResultsDB(res["db"]) as db:
        summ = summarize(db).iloc[0]
    per_ex = recs[recs.attack != "clean"].groupby("example").correct.min()
    clean = recs[recs.attack == "clean"].set_index("example").correct
    assert summ.ALL == pytest.approx(float((per_ex.reindex(clean.index).fillna(0) * clean).mean()))
    assert summ.ALL <= summ.top_settings + 1e-12
    t4 = T.table4_top_settings(res["db"])
    assert len(t4) == 2 and set(t4.columns) >= {"pgd", "apgd-ce", "square"}
    assert t4.square.nunique() == 1
    for _, r in t4.iterrows():
        a = top[top.setting == f"apgd-ce@{r.setting}"].set_index("example").correct
        assert r["apgd-ce"] == pytest.approx(float((a.reindex(clean.index).fillna(0) * clean).mean()))
    with pytest.raises(ConfigError, match="attacks.top_settings: needs attacks.grid"):
        from_dict(dict(raw, attacks={"top_settings": {"k": 2}}))


# ------------------------------------------------------------------------------------------------
# local worker processes (issue 16: two single-thread processes on a 2-core CPU)
# ------------------------------------------------------------------------------------------------

@needs_data
def test_parallel_workers_equal_serial_run(reference, checkpoints, tmp_path, monkeypatch):
    """Two local worker processes, each unit sent once its dependencies are committed: the
    same records and units as the serial single-thread run (every unit is seeded by its own
    id), one database, and a rerun has nothing to do."""
    from benchmark.runner import resolve_workers
    _, ref_res, ref_path = reference
    cfg = _cfg(checkpoints, tmp_path)
    monkeypatch.delenv("DEQBENCH_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)   # 2 workers x 1 thread, as on the CI CPU
    assert resolve_workers("auto", cfg) == (2, 1)
    res = evaluate(cfg, progress=False, workers=2)
    assert res["complete"] and res["units_run"] == PLANNED
    path = Path(res["db"])
    assert path == cfg.run_dir / "results.sqlite"
    assert not list(cfg.run_dir.glob("results.rank*.sqlite"))
    _assert_complete(path)
    assert_same_records(ref_path, path)
    pd.testing.assert_frame_equal(res["summary"], ref_res["summary"])
    with ResultsDB(path) as db:
        assert db.get_meta("last_invocation/0/workers") == {"workers": 2, "threads_per_worker": 1}
    assert evaluate(cfg, progress=False, workers=2)["units_run"] == 0


def test_workers_argument_and_dependencies(checkpoints, tmp_path, monkeypatch):
    from benchmark.runner import _unit_deps, resolve_workers
    cfg = _cfg(checkpoints, tmp_path)
    monkeypatch.delenv("DEQBENCH_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert resolve_workers("auto", cfg, world=2)[0] == 1      # torchrun: one process per rank
    assert resolve_workers(3, cfg) == (3, 1)
    monkeypatch.setenv("DEQBENCH_WORKERS", "1")
    assert resolve_workers("auto", cfg)[0] == 1
    for bad in (0, -1, 1.5, True, "two"):
        with pytest.raises(ValueError, match="workers must be an integer >= 1 or 'auto'"):
            resolve_workers(bad, cfg)
    m_deq, m_cnn = cfg.models
    todo = [(m_deq, "final", "clean", 0, 4), (m_cnn, "final", "clean", 0, 4),
            (m_deq, "final", "grid", 0, 4), (m_deq, "final", "grid", 4, 8),
            (m_deq, "final", "top_settings", 0, 4), (m_cnn, "final", "transfer", 0, 4),
            (m_deq, "final", "pgd", 0, 4), (m_deq, "final", "autoattack", 0, 4),
            (m_deq, "final", "checks", 0, 4), (m_cnn, "final", "transfer", 4, 8),
            (m_deq, "final", "strength", 0, 4)]
    deps = _unit_deps(todo)
    assert deps[0] == set() and deps[1] == set()
    assert deps[2] == {0} and deps[3] == set()          # its model's clean unit, same shard
    # top_settings reads its model's grid of EVERY shard (the run's k strongest settings)
    assert deps[4] == {0, 2, 3}
    # transfer reads every model's grid of its shard (and waits for the clean units), not
    # the top_settings, AutoAttack or checks units planned before it
    assert deps[5] == {0, 1, 2}
    assert deps[6] == {0}                                # pgd reads nothing
    assert deps[7] == {0, 2}                             # 'strongest': the grid of the shard
    assert deps[8] == {0, 2, 7}                          # checks: also AutoAttack's Square
    assert deps[9] == {3}                                # shard 4-8: its grid only
    assert deps[10] == {0, 2, 6, 7}                      # strength: grid, pgd, autoattack

    # which unit an idle worker takes: the ready one earliest in plan order; the pinned
    # (transfer) units only on worker 0, which takes a ready one before anything else
    from benchmark.runner import _pick
    pinned = [a == "transfer" for _m, _d, a, _lo, _hi in todo]
    def pick(w, done, pending=None):
        pending = [j for j in range(len(todo)) if j not in done] if pending is None else pending
        return _pick(w, pending, deps, done, pinned)
    assert pick(0, set()) == 0 and pick(1, {0}) == 1
    assert pick(1, {0, 1}) == 2                                  # the grid of shard 0-4
    assert pick(0, {0, 1, 2}) == 5                               # transfer is ready: first
    assert pick(1, {0, 1, 2}) == 3                               # never a pinned one
    assert pick(1, set(), pending=[5, 9]) is None
    assert pick(1, {0, 2}, pending=[10]) is None                 # strength: pgd, AA not done
    assert pick(1, {0, 2, 6, 7}, pending=[10]) == 10

    # an attack that does not declare what it reads waits for every lower-order unit
    from benchmark.suite import get_attack
    monkeypatch.setattr(type(get_attack("transfer")), "reads", None)
    assert _unit_deps(todo)[5] == {0, 1, 2, 4}
    monkeypatch.undo()
    # the pruned grid's later shards wait for the first one (its calibration is reused)
    pruned = from_dict({**_raw(checkpoints, tmp_path), "attacks": {
        "grid": {"steps": 2, "kas": [1], "lams": [1.0], "mode": "pruned", "calibration": 2}}})
    assert _unit_deps(todo, pruned)[3] == {2} and _unit_deps(todo, cfg)[3] == set()


def test_cli_workers_flag_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmark.cli", "evaluate", "x.yaml",
                          "--workers", "0"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "--workers: must be an integer >= 1 or 'auto', got '0'" in out.stderr
    assert "Traceback" not in out.stderr
