"""``benchmark.gpu_check`` (``make gpu-check``): its tiny CPU mode end to end (so the one-shot GPU
check cannot rot between GPU loans), its pieces, and the tests marked ``cuda`` that the check's
first step runs on a GPU (skipped here without one).

The ``cuda`` tests compare each device-dependent path with the CPU on the same weights and
inputs: the forward, a PGD attack (eps-ball and [0, 1] on the GPU), a training step, bf16
autocast, loading a checkpoint onto the device and a protocol run through the runner."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_zoo as mz
from benchmark import gpu_check

REPO = Path(__file__).resolve().parent.parent
# DEQBENCH_CUDA_TEST_DEVICE=cpu runs the cuda tests' code on the CPU (a dry run of the tests
# themselves where no GPU is at hand; their CPU-vs-device comparisons are then trivial)
DEV = os.environ.get("DEQBENCH_CUDA_TEST_DEVICE", "cuda")
needs_cuda = pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device")


def _calibrated(name="deq_tiny_cifar10", seed=0):
    """An untrained DEQ (dropout off) whose BatchNorm statistics come from one train-mode forward
    on random images (momentum 1), so that its output depends on its input; eval mode."""
    torch.manual_seed(seed)
    m = mz.create(name, dropout=0.0)
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    for b in bns:
        b.momentum = 1.0
    m.train()
    with torch.no_grad():
        m(torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1)))
    for b in bns:
        b.momentum = 0.1
    return m.eval()


@pytest.fixture
def exact_cuda():
    """fp32 on the GPU without TF32, so that GPU and CPU agree to float tolerance."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device(DEV)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


# ------------------------------------------------------------------------------------------------
# the tiny mode, end to end (CPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_mode_writes_one_json_with_every_step(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "benchmark.gpu_check", "--tiny", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.is_file(), p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert p.returncode == (0 if r["ok"] else 1)
    assert r["schema"] == gpu_check.SCHEMA and r["mode"] == "tiny"
    env_ = r["environment"]
    assert env_["device"] == "cpu" and env_["torch"] == torch.__version__
    assert env_["device_name"].startswith("cpu") and len(env_["git_commit"]) >= 40
    assert r["paper"]["table9_train_samples_per_s"]["pgd_at"] == 30.2
    assert r["paper"]["table10_forward_samples_per_s"]["plain (R=0)"] == 94.9
    steps = r["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    for name, s in steps.items():
        assert s["status"] in ("ok", "skipped"), (name, s.get("error"), s.get("log_tail"))
        assert s["error"] is None, (name, s["error"])
        assert 0 < s["time_s"] <= s["limit_s"] + 5, (name, s["time_s"], s["limit_s"])
    # 1. the cuda tests were collected and, without CUDA, skipped
    ct = steps["cuda_tests"]
    if torch.cuda.is_available():
        assert ct["status"] == "ok" and ct["result"]["passed"] == ct["result"]["tests"]
    else:
        assert ct["status"] == "skipped" and "no CUDA" in ct["reason"]
        assert ct["result"]["tests"] >= 5 and ct["result"]["skipped"] == ct["result"]["tests"]
    # 2. forward: fp32 and bf16 autocast, plain and Sec. 3.2 throughput and f-evaluations
    bf = steps["bench_forward"]["result"]
    for prec in ("fp32", "bf16"):
        p_ = bf[prec]
        assert p_["error"] is None
        assert p_["plain_samples_per_s"] > 0 and p_["sec32_samples_per_s"] > 0
        assert p_["sec32_f_evals_per_sample"] > p_["plain_f_evals_per_sample"] > 0
        assert p_["plain_vs_paper_table10"] == pytest.approx(p_["plain_samples_per_s"] / 94.9)
    # 3. training: PGD-AT with and without Sec. 3.3 in both precisions, beside Table 9
    bt = steps["bench_train"]["result"]
    for prec in ("fp32", "bf16"):
        rows = bt[prec]["rows"]
        assert [(x["method"], x["sec33"]) for x in rows] == [("pgd_at", "-"), ("pgd_at", "reference")]
        assert all(x["samples_per_s"] > 0 and x["loss_finite"] for x in rows)
        assert [x["paper_samples_per_s"] for x in rows] == [30.2, 39.9]
        assert rows[1]["f_evals_per_sample"] <= rows[0]["f_evals_per_sample"]
        assert rows[0]["autocast"] == prec and rows[0]["batch_size"] == 4
    # 4. the protocol on 2 images (synthetic CIFAR-format data offline), complete
    pr = steps["protocol"]["result"]
    assert pr["complete"] and pr["n_images"] == 2 and pr["records"] > 0
    assert ("synthetic" in pr["data"]["source"]) or ("CIFAR-10 test set" in pr["data"]["source"])
    assert {row["defense"] for row in pr["summary"]} >= {"final"}
    assert all(row["n"] == 2 and 0 <= row["ALL"] <= row["clean"] <= 1 for row in pr["summary"])
    # 5. two ranks (gloo on the CPU), merged, identical to the single-process records
    nc = steps["nccl"]
    if torch.cuda.device_count() >= 2:
        assert nc["result"]["backend"] == "nccl"
    else:
        assert nc["status"] == "ok" and nc["result"]["backend"] == "gloo"
    res = nc["result"]
    assert res["all_reduce_ok"] and res["world_size"] == 2 and res["complete"]
    cmp = res["vs_single_process"]
    assert cmp["records_single"] == cmp["records_sharded"] == pr["records"]
    assert cmp["keys_only_in_one"] == 0 and cmp["correct_differs"] == 0
    assert cmp["f_evals_differ"] == 0


def test_a_failing_step_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch):
    """A step that raises records its error (one line) and the next step still runs; a step
    past its limit is recorded as a timeout; the JSON is written either way."""
    calls = []

    def fake_run_step(name, mode, device, work, limit):
        calls.append(name)
        if name == "bench_forward":
            return {"status": "error", "result": None, "error": "RuntimeError: boom"}
        if name == "bench_train":
            return {"status": "timeout", "result": None, "error": f"ran past its limit of {limit:.0f} s"}
        return {"status": "ok", "result": {}, "error": None}

    monkeypatch.setattr(gpu_check, "_run_step", fake_run_step)
    monkeypatch.setattr(gpu_check, "_run_cuda_tests",
                        lambda mode, work, limit, cuda: {"status": "skipped", "result": {},
                                                         "error": None, "reason": "no CUDA"})
    out = tmp_path / "r.json"
    r = gpu_check.run_check("tiny", out=out)
    assert calls == ["bench_forward", "bench_train", "protocol", "nccl"]
    saved = json.loads(out.read_text())
    assert saved["steps"]["bench_forward"]["error"] == "RuntimeError: boom"
    assert saved["steps"]["bench_train"]["status"] == "timeout"
    assert saved["steps"]["protocol"]["status"] == "ok" and saved["ok"] is False == r["ok"]


def test_a_step_past_its_limit_is_killed_and_keeps_its_partial_result(tmp_path):
    """The step's subprocess (here the full-size forward bench on the CPU, far slower than
    3 s) is killed at its limit; what it had written as done so far is kept."""
    done = {"fp32": {"plain_samples_per_s": 1.0, "error": None}}
    (tmp_path / "step_bench_forward.json").write_text(
        json.dumps({"status": "partial", "result": done, "error": None}))
    rec = gpu_check._run_step("bench_forward", "full", "cpu", tmp_path, 3)
    assert rec["status"] == "timeout" and rec["result"] == done
    assert rec["error"] == "ran past its limit of 3 s (the parts done are in result)"


def test_step_worker_turns_an_exception_into_a_record(tmp_path, monkeypatch):
    def boom(ctx):
        raise ValueError("bad\nthing")
    monkeypatch.setitem(gpu_check.STEP_FUNCS, "protocol", boom)
    out = tmp_path / "s.json"
    gpu_check.step_worker("protocol", "tiny", "cpu", str(tmp_path), str(out), 10)
    rec = json.loads(out.read_text())
    assert rec["status"] == "error" and rec["error"] == "ValueError: bad thing"
    assert "Traceback" in rec["traceback"]


def test_nccl_step_skips_with_one_gpu_in_full_mode(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    r = gpu_check.step_nccl({"mode": "full", "device": "cuda", "work": Path("."),
                             "sizes": gpu_check.SIZES["full"], "limit_s": 60})
    assert r["skipped"] == "skipped: 1 GPU" and r["error"] is None


def test_bad_arguments_exit_2():
    assert gpu_check.main(["--only", "nope"]) == 2
    assert gpu_check.main(["--device", "tpu"]) == 2


def test_full_mode_limits_fit_the_eight_minute_loan():
    # the steps and the machine's start within 8 minutes
    assert sum(gpu_check.LIMITS["full"].values()) <= 420 and gpu_check.BUDGET_S["full"] <= 420
    s = gpu_check.SIZES["full"]
    assert s["model"] == "deq_large_cifar10" and s["batch"] == 96
    assert (s["tf"], s["r"]) == (2, 10)   # the paper's Sec. 3.2 setting (Table 10)


def test_bench_train_reports_samples_per_s_and_the_median_round_speedup():
    """bench_train (Sec. 3.3 speed-up, goal 4): samples/s per variant; the speed-up as the
    median of the per-round time ratios and as the ratio of totals; the exact f-eval ratio; a
    variant without its baseline gets None; bf16 autocast runs and is labelled."""
    from benchmark.bench_train import _median, bench_train
    cfg = gpu_check._train_config(gpu_check.SIZES["tiny"])
    rows = bench_train(cfg, rounds=3, batch_size=2, device="cpu", progress=False,
                       variants=[("pgd_at", None), ("pgd_at", "reference")])
    base, fast = rows
    assert len(base["round_s"]) == len(fast["round_s"]) == 3
    assert base["samples_per_s"] == pytest.approx(6 / sum(base["round_s"]))
    assert fast["speedup_median"] == pytest.approx(
        _median([b / f for b, f in zip(base["round_s"], fast["round_s"])]))
    assert fast["speedup_vs_base"] == pytest.approx(fast["samples_per_s"] / base["samples_per_s"])
    assert fast["f_ratio_vs_base"] == pytest.approx(base["f_evals_per_sample"]
                                                    / fast["f_evals_per_sample"])
    assert base["speedup_median"] == 1.0 and fast["f_ratio_vs_base"] >= 1.0
    lone = bench_train(cfg, rounds=1, batch_size=2, device="cpu", progress=False,
                       variants=[("pgd_at", "reference")], autocast="bf16")
    assert lone[0]["autocast"] == "bf16" and lone[0]["loss_finite"]
    assert lone[0]["speedup_vs_base"] is None and lone[0]["speedup_median"] is None
    with pytest.raises(ValueError, match="autocast must be one of"):
        bench_train(cfg, rounds=1, batch_size=2, autocast="fp8")
    assert _median([3, 1, 2]) == 2 and _median([4, 1, 2, 3]) == 2.5


def test_synthetic_cifar_batch_goes_through_the_real_loader(tmp_path, monkeypatch):
    from benchmark.data import load_dataset
    monkeypatch.setattr(gpu_check, "_cifar10_root", lambda: None)
    inputs = gpu_check.protocol_inputs(tmp_path, gpu_check.SIZES["tiny"], "cpu")
    assert "synthetic" in inputs["data"]["source"]
    ds = load_dataset("cifar10", "test", root=inputs["data"]["root"])
    assert ds.images.shape[1:] == (3, 32, 32) and 0 <= ds.images.min() and ds.images.max() <= 1
    assert mz.sha256_file(inputs["checkpoint"]) == inputs["sha256"]
    # created once: a second call reads the same inputs back
    assert gpu_check.protocol_inputs(tmp_path, gpu_check.SIZES["tiny"], "cpu") == inputs


# ------------------------------------------------------------------------------------------------
# tests marked cuda (step 1 of the GPU check; skipped without CUDA)
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
def test_cuda_forward_matches_cpu(exact_cuda):
    m = _calibrated()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m.run(x, defense=mz.FinalState())
        got = m.to(exact_cuda).run(x.to(exact_cuda), defense=mz.FinalState())
    assert got.logits.device.type == exact_cuda.type
    # Broyden's 8 + 9 damped steps may amplify rounding differences a little
    torch.testing.assert_close(got.logits.cpu(), ref.logits, atol=1e-3, rtol=1e-3)
    top2 = ref.logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2
    assert (got.logits.argmax(1).cpu() == ref.logits.argmax(1))[clear].all()
    assert (got.nfev_nograd.cpu() - ref.nfev_nograd).abs().max() <= 1


@pytest.mark.cuda
@needs_cuda
def test_cuda_pgd_stays_in_the_eps_ball_and_the_image_range(exact_cuda):
    from attacks.evaluation import pgd_attack
    from attacks.surrogates import JudgedModule, UnrolledIntermediate
    m = _calibrated().to(exact_cuda)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(exact_cuda)
    with torch.no_grad():
        y = m.run(x, defense=mz.FinalState()).logits.argmax(1)
    eps = 8 / 255
    # the reported forward judges, the grid's surrogate (Eq. 11: z[4], 5 unrolled steps) steers
    out = pgd_attack(JudgedModule(m, mz.FinalState(), UnrolledIntermediate(4, 5, 0.5)), x, y,
                     eps, eps / 4, steps=3)
    assert out.x_adv.device.type == exact_cuda.type
    assert (out.x_adv - x).abs().max() <= eps + 1e-6
    assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    assert out.correct.dtype == torch.bool and len(out.correct) == 6
    assert (out.nfev_grad > 0).all()


@pytest.mark.cuda
@needs_cuda
def test_cuda_training_step_updates_the_model_on_the_device(tmp_path):
    from benchmark.bench_train import bench_train
    cfg = gpu_check._train_config(gpu_check.SIZES["tiny"])
    rows = bench_train(cfg, rounds=1, batch_size=4, device=DEV, progress=False,
                       variants=[("pgd_at", None), ("pgd_at", "reference")])
    assert all(r["device"] == DEV and r["loss_finite"] and r["samples_per_s"] > 0 for r in rows)
    assert rows[1]["f_evals_per_sample"] <= rows[0]["f_evals_per_sample"]


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_autocast_forward_is_finite_and_agrees(exact_cuda):
    m = _calibrated().to(exact_cuda)
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(exact_cuda)
    with torch.no_grad():
        ref = m.run(x, defense=mz.FinalState()).logits
        with torch.autocast(exact_cuda.type, dtype=torch.bfloat16):
            low = m.run(x, defense=mz.FinalState()).logits
    assert torch.isfinite(low).all()
    # bf16 keeps 8 bits of mantissa: the predictions agree on most points
    assert (low.float().argmax(1) == ref.argmax(1)).float().mean() >= 0.75


@pytest.mark.cuda
@needs_cuda
def test_cuda_checkpoint_loads_onto_the_device(tmp_path):
    m = _calibrated()
    sha = mz.save_checkpoint(m, tmp_path / "m.pt")
    got = mz.load("deq_tiny_cifar10", checkpoint=tmp_path / "m.pt", device=DEV, sha256=sha)
    assert all(p.device.type == torch.device(DEV).type for p in got.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(got.state_dict()[k].cpu(), v), k


@pytest.mark.cuda
@needs_cuda
def test_cuda_protocol_run_matches_cpu(tmp_path, exact_cuda):
    from benchmark.results_db import ResultsDB
    from benchmark.run_config import from_dict
    from benchmark.runner import evaluate
    sizes = dict(gpu_check.SIZES["tiny"], n_images=4, shard=2)
    inputs = gpu_check.protocol_inputs(tmp_path, sizes, "cpu")
    runs = {}
    for dev in ("cpu", DEV):
        cfg = from_dict(gpu_check.protocol_raw(tmp_path, sizes, inputs, tmp_path / dev, dev))
        res = evaluate(cfg, progress=False)
        assert res["complete"]
        with ResultsDB(res["db"]) as d:
            assert d.get_meta("config")["device"] == dev
        runs[dev if dev not in runs else "again"] = res["db"]
    cmp = gpu_check.compare_records(runs["cpu"], runs.get(DEV, runs.get("again")))
    assert cmp["records_single"] == cmp["records_sharded"] > 0
    assert cmp["keys_only_in_one"] == 0 and cmp["correct_differs"] == 0
