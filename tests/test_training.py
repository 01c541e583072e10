"""Training recipes: losses, attacks in bounds, Sec. 3.3 draws, Jacobian penalty, config errors,
resume == uninterrupted, DDP (2 gloo processes) == single process with 2 shards."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import model_zoo as mz
from benchmark.train import run_training
from model_zoo.train_config import ConfigError, TrainConfig, load_train_config
from model_zoo.training import (TrainingInterrupted, jacobian_penalty, pgd_attack, trades_attack)

SMALL = dict(channels=[8, 8], head_channels=[4, 4], final_channels=16, num_groups=4)


def _cfg(tmp_path, **train):
    t = {"method": "standard", "epochs": 2, "batch_size": 32, "attack": {"steps": 2}}
    t.update(train)
    return TrainConfig.from_dict({
        "name": "t", "model": "deq_tiny_fashion_mnist", "model_overrides": dict(SMALL),
        "output": str(tmp_path), "seed": 3,
        "data": {"dataset": "synthetic", "val_size": 32, "val_n": 16, "augment": False,
                 "options": {"shape": [1, 28, 28], "n_train": 128, "n_test": 16, "seed": 1}},
        "train": t})


def _losses(tmp_path, **train):
    s = run_training(_cfg(tmp_path, **train), progress=False)
    return [r["train_loss"] for r in s["history"]], s


@pytest.mark.parametrize("method", ["standard", "pgd_at", "trades"])
def test_recipes_losses_finite_and_decreasing(tmp_path, method):
    losses, s = _losses(tmp_path, method=method, epochs=4, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert (tmp_path / "t" / "best.pt").is_file() and (tmp_path / "t" / "log.csv").is_file()
    row = s["history"][-1]
    assert {"val_clean", "val_pgd10", "epoch_s", "f_evals_per_train_sample", "lr"} <= set(row)
    # the deterministic validation PGD can only lower accuracy
    assert row["val_pgd10"] <= row["val_clean"]


def test_pretraining_and_sec33_and_implicit_run(tmp_path):
    for extra in ({"pretrain_steps": 3}, {"random_states": "reference", "method": "pgd_at"},
                  {"random_states": "paper"}, {"gradient": "implicit"},
                  {"jacobian": {"weight": 0.4, "freq": 1.0}}):
        losses, _ = _losses(tmp_path / str(len(str(extra))), epochs=1, **extra)
        assert all(torch.isfinite(torch.tensor(losses))), extra


def test_training_attacks_stay_in_ball():
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist", **SMALL).eval()
    x = torch.rand(6, 1, 28, 28)
    x[:2] = 0.0
    x[2:4] = 1.0
    y = torch.randint(0, 10, (6,))
    fwd = lambda v: m.run(v, defense=mz.FinalState(steps=5)).logits
    for xa in (pgd_attack(fwd, x, y, 0.1, 0.05, 3), trades_attack(fwd, x, 0.1, 0.05, 3)):
        assert (xa - x).abs().max() <= 0.1 + 1e-6
        assert xa.min() >= 0 and xa.max() <= 1


def test_sec33_draws_follow_preset():
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist", **SMALL).train()
    x = torch.rand(5, 1, 28, 28)
    ref, pap = mz.RandomIntermediate("reference"), mz.RandomIntermediate("paper")
    ks, per_sample = set(), set()
    for _ in range(40):
        rec = m.run(x, defense=ref)
        assert ref.last_draw.shape == (1,)
        k = int(ref.last_draw[0])
        ks.add(k)
        # the solver really stops at k: k + 1 evaluations without graph, then 1 + 5 with
        assert rec.nfev_nograd.tolist() == [k + 1] * 5
        assert rec.trajectory.num_states == k
        m.run(x, defense=pap)
        assert pap.last_draw.shape == (5,)
        per_sample.update(pap.last_draw.tolist())
    assert ks == set(range(1, 9))
    assert per_sample == set(range(1, 9))
    # paper preset: logits are the head on z[i] of each sample, with gradient into f
    # (eval mode, so that the head's BatchNorm does not mix the samples' states)
    m.eval()
    rec = m.run(x, defense=pap, per_state=True)
    i = pap.last_draw
    for b in range(5):
        assert torch.allclose(rec.logits[b], rec.state_logits[i[b] - 1, b], atol=1e-5)
    g = torch.autograd.grad(rec.logits.sum(), m.cell.blocks[0].conv1.weight_v, allow_unused=True)[0]
    assert g is not None and g.abs().sum() > 0


def test_jacobian_penalty_matches_brute_force():
    torch.manual_seed(0)
    m = mz.create("deq_tiny_fashion_mnist", channels=(4, 4), head_channels=(2, 2),
                  final_channels=8, num_groups=2).double().eval()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(1)
    est = float(jacobian_penalty(m, x, max_iter=8, vecs=400))
    ctx = m.context(x)
    z = m.solver.solve(ctx.f, m.zero_state(x)).best
    frob = 0.0
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda v: ctx.f(v[None], torch.tensor([b]))[0], z[b])
        frob += float((J ** 2).sum())
    exact = frob / z.numel()
    assert abs(est - exact) / exact < 0.15, (est, exact)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*in train.: epoch\\b"):
        TrainConfig.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="train.method must be one of"):
        TrainConfig.from_dict({"train": {"method": "madry"}})
    with pytest.raises(ConfigError, match="train.attack.eps must be >= 0 and <= 1, got 8"):
        TrainConfig.from_dict({"train": {"attack": {"eps": 8}}})
    with pytest.raises(ConfigError, match="train.epochs must be a positive integer"):
        TrainConfig.from_dict({"train": {"epochs": 0}})
    with pytest.raises(ConfigError, match="train.batch_size must be an integer"):
        TrainConfig.from_dict({"train": {"batch_size": "128"}})
    with pytest.raises(ConfigError, match="random_states.*phantom"):
        TrainConfig.from_dict({"train": {"random_states": "paper", "gradient": "implicit"}})
    with pytest.raises(ConfigError, match="model: unknown model 'deq_tny'"):
        TrainConfig.from_dict({"model": "deq_tny"})
    with pytest.raises(ConfigError, match="model_overrides: cannot build 'deq_tiny_fashion_mnist'"):
        TrainConfig.from_dict({"model_overrides": {"chanels": [8, 8]}})
    with pytest.raises(ConfigError, match="solver must be a mapping"):
        TrainConfig.from_dict({"solver": 8})
    with pytest.raises(ConfigError, match="train.jacobian.stop_epoch must be a positive integer"):
        TrainConfig.from_dict({"train": {"jacobian": {"stop_epoch": 0}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")


def test_shipped_configs_validate():
    from pathlib import Path
    files = sorted(Path(__file__).resolve().parent.parent.joinpath("configs", "train").glob("*.yaml"))
    assert files, "no training configs shipped"
    for f in files:
        load_train_config(f)


def _state(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_equals_uninterrupted(tmp_path):
    cfg_a = _cfg(tmp_path / "a", method="pgd_at", epochs=2, random_states="reference")
    run_training(cfg_a, progress=False)
    cfg_b = _cfg(tmp_path / "b", method="pgd_at", epochs=2, random_states="reference")
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run_training(cfg_b, progress=False, stop_after=5)  # mid-epoch 2 (4 steps per epoch)
    ck = torch.load(tmp_path / "b" / "t" / "last.pt", weights_only=True)
    # 96 training images / batch 32 = 3 steps per epoch: step 5 is the 2nd step of epoch 2
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 5)
    run_training(cfg_b, resume=True, progress=False)
    a, b = _state(tmp_path / "a" / "t" / "last.pt"), _state(tmp_path / "b" / "t" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (tmp_path / "a" / "t" / "log.csv").read_text().splitlines()
    lb = (tmp_path / "b" / "t" / "log.csv").read_text().splitlines()
    assert [l.split(",")[:8] for l in la] == [l.split(",")[:8] for l in lb]
    # the f-evaluations per training sample count every step of the interrupted epoch (and
    # not the validation attack): equal to the uninterrupted run's
    import pandas as pd
    fa = pd.read_csv(tmp_path / "a" / "t" / "log.csv").f_evals_per_train_sample
    fb = pd.read_csv(tmp_path / "b" / "t" / "log.csv").f_evals_per_train_sample
    assert fa.tolist() == fb.tolist() and (fa > 0).all()


def test_periodic_checkpoint_survives_a_crash(tmp_path, monkeypatch):
    """A crash (no signal handler runs, like SIGKILL) after a periodic mid-epoch checkpoint
    loses only the steps after it; resuming ends with the uninterrupted run's weights."""
    from model_zoo.training import Trainer
    cfg_a = _cfg(tmp_path / "a", method="pgd_at", epochs=2)
    run_training(cfg_a, progress=False, checkpoint_every_s=None)
    cfg_b = _cfg(tmp_path / "b", method="pgd_at", epochs=2)
    real = Trainer.train_step
    calls = {"n": 0}

    def crashing(self, x, y, epoch, step):
        calls["n"] += 1
        if calls["n"] == 6:  # the 3rd step of epoch 2: the process dies mid-step
            raise KeyboardInterrupt("simulated kill")
        return real(self, x, y, epoch, step)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg_b, progress=False, checkpoint_every_s=1e-9)  # save after every step
    ck = torch.load(tmp_path / "b" / "t" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 5)
    monkeypatch.setattr(Trainer, "train_step", real)
    run_training(cfg_b, resume=True, progress=False)
    a, b = _state(tmp_path / "a" / "t" / "last.pt"), _state(tmp_path / "b" / "t" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_config(tmp_path):
    run_training(_cfg(tmp_path, epochs=1), progress=False)
    with pytest.raises(ValueError, match="different config"):
        run_training(_cfg(tmp_path, epochs=1, lr=5e-4), resume=True, progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, method):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        run_training(_cfg(out, method=method, epochs=2), progress=False)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method", ["standard", "pgd_at"])
def test_ddp_two_processes_match_single_process(tmp_path, method):
    """DDP with 2 gloo processes == one process with 2 shards, parameters AND BatchNorm
    statistics: also for PGD-AT, whose eval-mode attack reads the running statistics."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), tmp_path / "ddp", method), nprocs=2, join=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(_cfg(tmp_path / "single", method=method, epochs=2), shards=2, progress=False)
    finally:
        torch.set_num_threads(n)
    a = _state(tmp_path / "ddp" / "t" / "last.pt")
    b = _state(tmp_path / "single" / "t" / "last.pt")
    params = {n for n, _ in mz.create("deq_tiny_fashion_mnist", **SMALL).named_parameters()}
    buffers = [k for k in a if "running_" in k]
    assert buffers
    # Same thread count as the single process: the updates agree to float precision.
    for k in list(params) + buffers:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # and it moved away from the initialisation
    torch.manual_seed(3)
    init = mz.create("deq_tiny_fashion_mnist", **SMALL).state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in params)


def test_bench_train_counts_and_speedup_fields(tmp_path):
    from benchmark.bench_train import bench_train
    rows = bench_train(_cfg(tmp_path), rounds=1, batch_size=4, progress=False)
    assert [(r["method"], r["sec33"]) for r in rows] == [
        ("pgd_at", "-"), ("pgd_at", "reference"), ("trades", "-"), ("trades", "reference")]
    # per training sample, N = 8, unroll 1 + 5, attack steps = 2 (the _cfg): PGD-AT = 2 attack
    # forwards + 1 training forward of (9 + 6) f evaluations; TRADES = 1 (p(x)) + 2 + 2
    assert rows[0]["f_evals_per_sample"] == 3 * 15
    assert rows[2]["f_evals_per_sample"] == 5 * 15
    # Sec. 3.3 (reference) stops the solver at k <= N: never more evaluations than the baseline
    assert rows[1]["f_evals_per_sample"] <= rows[0]["f_evals_per_sample"]
    assert rows[3]["f_evals_per_sample"] <= rows[2]["f_evals_per_sample"]
    assert rows[1]["speedup_vs_base"] > 0 and rows[0]["speedup_vs_base"] == 1.0
    # with a graph: the unroll (1 + 5) of every forward except TRADES' p(x); Sec. 3.3 does not
    # shorten it, so its F-equivalent ratio (a graph f = 3 F) is below its f-eval ratio
    assert rows[0]["f_grad_per_sample"] == 3 * 6 and rows[2]["f_grad_per_sample"] == 4 * 6
    assert rows[1]["f_grad_per_sample"] == rows[0]["f_grad_per_sample"]
    assert rows[0]["F_per_sample"] == 3 * 15 + 2 * 3 * 6
    for r in (rows[1], rows[3]):
        assert 1.0 <= r["F_ratio_vs_base"] <= r["f_ratio_vs_base"]


def test_init_from_a_registered_checkpoint_is_hash_verified(tmp_path):
    """``train.init_from`` naming a zoo entry's checkpoint file is verified against the entry's
    SHA-256 (as ``model_zoo.load`` does); a tampered file is refused before any training."""
    from model_zoo.registry import CheckpointError, _REGISTRY, registered_sha256, sha256_file
    model = mz.create("deq_tiny_fashion_mnist", **SMALL)
    ck = tmp_path / "start.pt"
    mz.save_checkpoint(model, ck)
    base = mz.get_entry("deq_tiny_fashion_mnist")
    entry = mz.register(name="tmp_init_from_entry", factory=base.factory, dataset=base.dataset,
                        input_shape=base.input_shape, checkpoint=str(ck), sha256=sha256_file(ck))
    try:
        assert registered_sha256(ck) == entry.sha256
        assert registered_sha256(tmp_path / "other.pt") is None
        s = run_training(_cfg(tmp_path, epochs=1, init_from=str(ck)), progress=False)
        assert s["history"]
        with open(ck, "r+b") as f:       # flip one byte near the end
            f.seek(-20, 2)
            b = f.read(1)
            f.seek(-20, 2)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(CheckpointError, match="SHA-256"):
            run_training(_cfg(tmp_path / "again", epochs=1, init_from=str(ck)), progress=False)
    finally:
        _REGISTRY.pop("tmp_init_from_entry", None)


def test_parallel_zoo_publishes_keep_every_entry(tmp_path, monkeypatch):
    """zoo.json is read, modified and replaced under an exclusive lock: eight concurrent
    updates (as from parallel ``deqbench zoo publish`` runs) leave all eight entries."""
    import json
    import threading
    from benchmark import zoo_publish as zp
    monkeypatch.setattr(zp, "CHECKPOINT_DIR", tmp_path)
    monkeypatch.setattr(zp, "ZOO_FILE", tmp_path / "zoo.json")
    monkeypatch.setattr(zp.model_zoo.registry, "load_zoo_file", lambda overwrite=True: None)
    (tmp_path / "zoo.json").write_text(json.dumps([{"name": "old", "v": 0}]))
    start = threading.Barrier(8)

    def work(k):
        start.wait()
        for v in range(5):
            zp._update_zoo_file({"name": f"m{k}", "v": v})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = {e["name"]: e["v"] for e in json.loads((tmp_path / "zoo.json").read_text())}
    assert got == {"old": 0, **{f"m{k}": 4 for k in range(8)}}
