"""``make gpu-check``: a prepared one-shot check for a short loan of one CUDA GPU (<= 8 minutes).

    python -m benchmark.gpu_check [--tiny] [--out FILE.json] [--device auto|cpu|cuda[:k]]

Steps, each in its own subprocess with its own time limit (a step that errors, crashes or runs
out of time records that and the next step starts: a CUDA error or an out-of-memory can not
poison the steps after it, and the JSON is always written):

1. ``cuda_tests``: the tests marked ``cuda`` (``pytest -m cuda``); without CUDA they skip and
   the step says ``skipped`` (no CUDA device).
2. ``bench_forward``: :func:`benchmark.bench_forward.bench_forward` of ``deq_large_cifar10``
   (random init) on 3x32x32 at batch 96, in fp32 and under bf16 autocast: the plain forward's
   samples/s beside the paper's Table 10 (94.9 samples/s, RTX 3090) and Sec. 3.2 at
   (Tf, R) = (2, 10) beside its 11.7 samples/s.
3. ``bench_train``: :func:`benchmark.bench_train.bench_train` of the same model at batch 96,
   PGD-AT and TRADES with and without Sec. 3.3 in fp32 and PGD-AT with and without it under bf16
   autocast, beside the paper's Table 9 (PGD-AT 30.2 / 39.9, TRADES 24.0 / 30.6 samples/s).
4. ``protocol``: the leaderboard protocol (:func:`benchmark.runner.evaluate`) of a run config
   built in code (:func:`benchmark.run_config.from_dict`) on 8 images: CIFAR-10's test set
   when it is on this machine, else seeded synthetic 3x32x32 images written in CIFAR-10's file
   format (the JSON says which).
5. ``nccl``: with >= 2 CUDA GPUs, the same protocol as two ``torchrun`` ranks over NCCL (one GPU
   each; an all-reduce first), merged, compared record by record with step 4's single-process
   run. With fewer GPUs: ``skipped: 1 GPU`` -- except in ``--tiny`` mode, where the same two-rank
   path runs over gloo on the CPU so that it is exercised by the test suite.

``--tiny`` runs every step on the CPU with tiny sizes (``deq_tiny_cifar10``, batch 4, one
round, 2 images, 2 attack steps) in well under a minute: tests/test_gpu_check.py runs it, so the
script cannot rot between GPU loans.

The JSON: ``{"schema", "mode", "environment": {device name, torch / CUDA / cuDNN versions, GPU
count, git commit, ...}, "paper": the reference numbers, "steps": {name: {"status": ok | error |
timeout | skipped, "time_s", "limit_s", "error": None or one line, "result": {...}}},
"wall_s"}``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

SCHEMA = "deqbench.gpu_check/1"
STEPS = ("cuda_tests", "bench_forward", "bench_train", "protocol", "nccl")
REPO = Path(__file__).resolve().parent.parent

# The paper's App. D (one RTX 3090, DEQ-Large on CIFAR-10, batch 96 as the released code).
PAPER = {
    "hardware": "NVIDIA RTX 3090 (paper App. D)",
    "table9_train_samples_per_s": {"pgd_at": 30.2, "pgd_at+sec33": 39.9,
                                   "trades": 24.0, "trades+sec33": 30.6},
    "table10_forward_samples_per_s": {"plain (R=0)": 94.9, "sec32 Tf=2 R=10": 11.7},
}

# Per-step time limits (s). Full mode: 60 + 75 + 150 + 70 + 65 = 420 s, so that the check and the
# machine's start fit an 8-minute loan (a global budget also caps the sum, see --budget-s);
# tiny mode: CPU, seconds each on an idle machine (the limits leave room for a loaded one).
LIMITS = {"full": {"cuda_tests": 60, "bench_forward": 75, "bench_train": 150, "protocol": 70,
                   "nccl": 65},
          "tiny": {"cuda_tests": 60, "bench_forward": 60, "bench_train": 60, "protocol": 60,
                   "nccl": 90}}
BUDGET_S = {"full": 420, "tiny": 240}

SIZES = {
    "full": {"model": "deq_large_cifar10", "batch": 96, "forward_repeats": 2, "tf": 2, "r": 10,
             "train_rounds": 2, "train_attack_steps": 10,
             "train_variants": {"fp32": [("pgd_at", None), ("pgd_at", "reference"),
                                         ("trades", None), ("trades", "reference")],
                                "bf16": [("pgd_at", None), ("pgd_at", "reference")]},
             "n_images": 8, "shard": 4, "attack_steps": 2, "apgd_iter": 2,
             "tests": ["tests"]},
    # deq_tiny's architecture on CIFAR-10's 3x32x32: the same code paths at ~1/100 the cost
    "tiny": {"model": "deq_tiny_cifar10", "batch": 4, "forward_repeats": 1, "tf": 2, "r": 1,
             "train_rounds": 1, "train_attack_steps": 2,
             "train_variants": {"fp32": [("pgd_at", None), ("pgd_at", "reference")],
                                "bf16": [("pgd_at", None), ("pgd_at", "reference")]},
             "n_images": 2, "shard": 1, "attack_steps": 2, "apgd_iter": 2,
             "tests": ["tests/test_gpu_check.py"]},
}
PRECISIONS = ("fp32", "bf16")


def _last_error(log: str) -> str:
    """The last line of a log that names an exception (torchrun ends with its own banner)."""
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.search(r"\w+(Error|Exception|Interrupt)\b", ln)
            and "ChildFailedError" not in ln]
    return (errs or lines or ["(no output)"])[-1]


def run_bounded(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new process group, killed as a group at ``timeout``: a torchrun
    launcher's ranks (or a hung CUDA worker's children) never outlive their step."""
    p = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

def environment(device: str) -> dict:
    """Device name, torch / CUDA / cuDNN versions, GPU count and memory, git commit, host."""
    import torch

    from benchmark.provenance import device_description, git_commit, package_versions
    env = {"device": device, "device_name": None, "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "cudnn": None, "gpus": [], "git_commit": git_commit(), "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "versions": package_versions(), "nccl": None}
    try:
        env["device_name"] = device_description(device)
        if torch.cuda.is_available():
            env["cudnn"] = torch.backends.cudnn.version()
            # the defaults the numbers were measured with (nothing here changes them)
            env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
            env["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                           "matmul": torch.backends.cuda.matmul.allow_tf32}
            env["gpus"] = [{"name": torch.cuda.get_device_name(i),
                            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory
                                                / 2 ** 30, 1)}
                           for i in range(torch.cuda.device_count())]
            with contextlib.suppress(Exception):
                env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:  # a broken driver must not stop the check: it is recorded
        env["error"] = _one_line(f"{type(e).__name__}: {e}")
    return env


# ---------------------------------------------------------------------------------------------
# shared inputs of the protocol steps (written once into the work folder)
# ---------------------------------------------------------------------------------------------

def _cifar10_root():
    """A folder holding CIFAR-10's test batch on this machine (the GPU config's data/cifar10,
    then $DEQBENCH_DATA/cifar10), or None."""
    from benchmark.data import DatasetError, data_root, load_dataset
    for root in (REPO / "data" / "cifar10", data_root() / "cifar10"):
        try:
            load_dataset("cifar10", "test", root=root)
            return root
        except DatasetError:
            continue
    return None


def protocol_inputs(work: Path, sizes: dict, device: str) -> dict:
    """The checkpoint (random init, BatchNorm statistics set from one train-mode forward so the
    output depends on the input) and the data folder of the protocol steps; created once."""
    import torch

    import model_zoo
    meta_path = work / "protocol_inputs.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    root = _cifar10_root()
    if root is not None:
        data = {"root": str(root), "source": f"CIFAR-10 test set from {root}"}
    else:
        # Offline machine without CIFAR-10: seeded synthetic images written as an official
        # test_batch, so the run goes through the real CIFAR-10 loader. Pickle is CIFAR's own
        # format; our loader reads it with its numpy-only unpickler.
        import pickle

        import numpy as np

        from benchmark.data import make_synthetic
        x, y = make_synthetic(max(sizes["n_images"], 16), (3, 32, 32), 10, seed=0, part="test")
        folder = work / "cifar10_synthetic" / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        raw = (x * 255).round().to(torch.uint8).reshape(len(x), -1).numpy()
        (folder / "test_batch").write_bytes(pickle.dumps(
            {"data": np.ascontiguousarray(raw), "labels": [int(v) for v in y]}, protocol=4))
        data = {"root": str(folder.parent),
                "source": "synthetic 3x32x32 (benchmark.data.make_synthetic, seed 0) written as a "
                          "CIFAR-10 test_batch: CIFAR-10 not found in data/cifar10 or "
                          "$DEQBENCH_DATA/cifar10"}
    torch.manual_seed(0)
    model = model_zoo.create(sizes["model"], dropout=0.0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    for m in bns:
        m.momentum = 0.1
    ckpt = work / "protocol_model.pt"
    sha = model_zoo.save_checkpoint(model.eval(), ckpt, {"note": "random init (gpu_check)"})
    out = {"checkpoint": str(ckpt), "sha256": sha, "data": data}
    meta_path.write_text(json.dumps(out))
    return out


GPU_CONFIG = REPO / "configs" / "eval" / "cifar10_deq_large_gpu.yaml"


def protocol_raw(work: Path, sizes: dict, inputs: dict, output: Path, device: str) -> dict:
    """The run config (a dict for :func:`benchmark.run_config.from_dict`) of steps 4 and 5:
    configs/eval/cifar10_deq_large_gpu.yaml's threat (Linf 8/255) and PGD step (2/255) with
    few images and reduced budgets (PGD-2, one grid column, APGD-CE of 2 iterations); its
    defenses but early:select (which needs CIFAR-10's training split): final and Sec. 3.2."""
    import yaml
    gpu = yaml.safe_load(GPU_CONFIG.read_text()) if GPU_CONFIG.is_file() else {}
    threat = gpu.get("threat", {"norm": "Linf", "eps": "8/255"})
    alpha = gpu.get("attacks", {}).get("pgd", {}).get("alpha", 2 / 255)
    return {
        "name": "gpu_check_protocol", "output": str(output), "seed": 0, "device": device,
        "batch_size": sizes["n_images"], "shard_size": sizes["shard"],
        "data": {"dataset": "cifar10", "root": inputs["data"]["root"], "n": sizes["n_images"],
                 "seed": 0, "val_n": sizes["n_images"]},
        "threat": dict(threat),
        "models": [{"name": sizes["model"], "checkpoint": inputs["checkpoint"],
                    "sha256": inputs["sha256"],
                    "defenses": ["final", {"name": "entropy_reduction", "tf": sizes["tf"],
                                           "r": sizes["r"]}]}],
        "attacks": {"pgd": {"steps": sizes["attack_steps"], "alpha": alpha},
                    "grid": {"steps": sizes["attack_steps"], "alpha": alpha, "kas": [1],
                             "lams": [1.0]},
                    "autoattack": {"attacks": ["apgd-ce"],
                                   "budget": {"apgd_n_iter": sizes["apgd_iter"]}}},
    }


# ---------------------------------------------------------------------------------------------
# the steps (run inside a worker subprocess)
# ---------------------------------------------------------------------------------------------

def _autocast(device: str, precision: str):
    import torch
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _peak_memory(device: str):
    import torch
    if torch.device(device).type != "cuda":
        return None
    gib = torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(torch.device(device))
    return round(gib, 2)


def step_bench_forward(ctx) -> dict:
    from benchmark.bench_forward import bench_forward  # H3's module: imported, never edited here
    s, out, errors = ctx["sizes"], {}, []
    for prec in PRECISIONS:
        try:
            with _autocast(ctx["device"], prec):
                rows = bench_forward(s["model"], batch_size=s["batch"], tfs=(s["tf"],),
                                     rs=(s["r"],), device=ctx["device"],
                                     repeats=s["forward_repeats"], progress=False)
            plain = [r for r in rows if r["defense"] == "plain"]
            dfd = [r for r in rows if r["defense"] != "plain"]
            p = {"plain_samples_per_s": plain[0]["samples_per_s"],
                 "plain_f_evals_per_sample": plain[0]["f_nograd"] + plain[0]["f_grad"],
                 "sec32_samples_per_s": dfd[0]["samples_per_s"],
                 "sec32_f_evals_per_sample": dfd[0]["f_nograd"] + dfd[0]["f_grad"],
                 "sec32_time_ratio_vs_plain": dfd[0]["ratio"], "tf": s["tf"], "r": s["r"],
                 "batch_size": s["batch"],
                 "plain_vs_paper_table10": plain[0]["samples_per_s"]
                 / PAPER["table10_forward_samples_per_s"]["plain (R=0)"],
                 "peak_memory_gib": _peak_memory(ctx["device"]), "error": None}
        except Exception as e:
            p = {"error": _one_line(f"{type(e).__name__}: {e}"),
                 "traceback": traceback.format_exc()[-2000:]}
            errors.append(f"{prec}: {p['error']}")
        out[prec] = p
        ctx["partial"]({"model": s["model"], "input_shape": [3, 32, 32], **out})
    return {"result": {"model": s["model"], "input_shape": [3, 32, 32], **out},
            "error": "; ".join(errors) or None}


def _train_config(sizes: dict):
    """configs/train/cifar10_deq_large_pgdat_sec33.yaml (the paper's recipe: batch 96, PGD-10 of
    2/255, solver 8 iterations) with the check's model; the data section is unused (bench_train
    draws random batches), synthetic so that no dataset is needed."""
    from model_zoo.train_config import TrainConfig, read_yaml
    d = read_yaml(REPO / "configs" / "train" / "cifar10_deq_large_pgdat_sec33.yaml")
    d.update(model=sizes["model"], device="auto", output=tempfile.gettempdir())
    d["data"] = {"dataset": "synthetic", "val_size": 8, "val_n": 4, "augment": False,
                 "options": {"shape": [3, 32, 32], "n_train": 32, "n_test": 8, "seed": 0}}
    d["train"]["attack"]["steps"] = sizes["train_attack_steps"]
    return TrainConfig.from_dict(d)


def step_bench_train(ctx) -> dict:
    from benchmark.bench_train import bench_train
    s, out, errors = ctx["sizes"], {}, []
    cfg = _train_config(s)
    paper = PAPER["table9_train_samples_per_s"]
    for prec in PRECISIONS:
        try:
            rows = bench_train(cfg, rounds=s["train_rounds"], batch_size=s["batch"],
                               device=ctx["device"], progress=False,
                               variants=s["train_variants"][prec],
                               autocast=None if prec == "fp32" else prec)
            for r in rows:
                key = r["method"] + ("+sec33" if r["sec33"] != "-" else "")
                r["paper_samples_per_s"] = paper.get(key)
                r["vs_paper"] = r["samples_per_s"] / paper[key] if key in paper else None
            out[prec] = {"rows": rows, "peak_memory_gib": _peak_memory(ctx["device"]),
                         "error": None}
            if not all(r["loss_finite"] for r in rows):
                out[prec]["error"] = "non-finite training loss"
                errors.append(f"{prec}: non-finite training loss")
        except Exception as e:
            out[prec] = {"error": _one_line(f"{type(e).__name__}: {e}"),
                         "traceback": traceback.format_exc()[-2000:]}
            errors.append(f"{prec}: {out[prec]['error']}")
        ctx["partial"]({"model": s["model"], "batch_size": s["batch"],
                        "pgd_steps": s["train_attack_steps"], **out})
    return {"result": {"model": s["model"], "batch_size": s["batch"],
                       "pgd_steps": s["train_attack_steps"], **out},
            "error": "; ".join(errors) or None}


def _summary_rows(summary) -> list:
    import math
    rows = []
    for r in summary.to_dict("records"):
        rows.append({k: (None if isinstance(v, float) and math.isnan(v) else
                         (v.item() if hasattr(v, "item") else v)) for k, v in r.items()})
    return rows


def step_protocol(ctx) -> dict:
    from benchmark.results_db import ResultsDB
    from benchmark.run_config import from_dict
    from benchmark.runner import evaluate
    s, work = ctx["sizes"], ctx["work"]
    inputs = protocol_inputs(work, s, ctx["device"])
    cfg = from_dict(protocol_raw(work, s, inputs, work / "single", ctx["device"]))
    t0 = time.perf_counter()
    res = evaluate(cfg, progress=False)
    wall = time.perf_counter() - t0
    with ResultsDB(res["db"]) as db:
        recs = db.records_frame()
        units = db.units_frame()
    return {"result": {"model": s["model"], "n_images": s["n_images"], "data": inputs["data"],
                       "db": str(res["db"]), "complete": bool(res["complete"]),
                       "units": int(len(units)), "records": int(len(recs)),
                       "evaluate_s": wall, "summary": _summary_rows(res["summary"]),
                       "peak_memory_gib": _peak_memory(ctx["device"])},
            "error": None if res["complete"] else "the protocol run did not complete"}


def compare_records(a_path, b_path) -> dict:
    """Record tables of two runs of one config: keys, correctness and f-evaluation counts."""
    from benchmark.results_db import ResultsDB
    key = ["model", "defense", "attack", "setting", "example"]
    with ResultsDB(a_path) as d:
        a = d.records_frame()
    with ResultsDB(b_path) as d:
        b = d.records_frame()
    m = a.merge(b, on=key, how="outer", suffixes=("_a", "_b"), indicator=True)
    both = m[m["_merge"] == "both"]
    # NaN (no count recorded, e.g. for a grid setting's record) equals NaN here
    fa = both[["nfev_nograd_a", "nfev_grad_a"]].fillna(-1).to_numpy()
    fb = both[["nfev_nograd_b", "nfev_grad_b"]].fillna(-1).to_numpy()
    diff_margin = (both.margin_a.astype(float) - both.margin_b.astype(float)).abs()
    return {"records_single": int(len(a)), "records_sharded": int(len(b)),
            "keys_only_in_one": int((m["_merge"] != "both").sum()),
            "correct_differs": int((both.correct_a != both.correct_b).sum()),
            "f_evals_differ": int((fa != fb).any(axis=1).sum()),
            "max_abs_margin_diff": float(diff_margin.max()) if len(both) else None}


def step_nccl(ctx) -> dict:
    import torch
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu >= 2:
        backend = "nccl"
    elif ctx["mode"] == "tiny":
        backend = "gloo"  # the same two-rank code path on the CPU, so the test suite runs it
    else:
        return {"skipped": f"skipped: {n_gpu} GPU" + ("" if n_gpu == 1 else "s"), "result": None,
                "error": None}
    work = ctx["work"]
    inputs = protocol_inputs(work, ctx["sizes"], ctx["device"])
    spec = work / "nccl_spec.json"
    spec.write_text(json.dumps({"backend": backend, "mode": ctx["mode"], "work": str(work),
                                "device": ctx["device"]}))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmark.gpu_check", "--dist-worker", str(spec)]
    t0 = time.perf_counter()
    try:
        p = run_bounded(cmd, max(ctx["limit_s"] - 5, 10), cwd=REPO, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        return {"result": {"backend": backend}, "error": "torchrun ran past the step's limit"}
    wall = time.perf_counter() - t0
    out_path = work / "nccl_rank0.json"
    if p.returncode != 0 or not out_path.is_file():
        tail = (p.stderr or p.stdout or "")[-3000:]
        return {"result": {"backend": backend, "torchrun_s": wall, "log_tail": tail},
                "error": _one_line(f"torchrun exit code {p.returncode}: {_last_error(tail)}")}
    r = json.loads(out_path.read_text())
    r.update(backend=backend, torchrun_s=wall,
             note=None if backend == "nccl" else
             "fewer than 2 CUDA GPUs: the two-rank path checked over gloo on the CPU (tiny mode)")
    single = work / "single" / "gpu_check_protocol" / "results.sqlite"
    err = None
    if single.is_file():
        r["vs_single_process"] = cmp = compare_records(single, r["db"])
        if cmp["keys_only_in_one"] or cmp["correct_differs"]:
            err = (f"2-rank run differs from the single-process run: {cmp['keys_only_in_one']} "
                   f"records in one only, {cmp['correct_differs']} with other correctness")
    else:
        r["vs_single_process"] = None
    if not r.get("all_reduce_ok"):
        err = f"all_reduce gave {r.get('all_reduce')} instead of 3"
    return {"result": r, "error": err}


def dist_worker(spec_path: str) -> int:
    """One torchrun rank of step 5: an all-reduce, then the protocol run sharded by rank."""
    import torch
    import torch.distributed as dist

    from benchmark.run_config import from_dict
    from benchmark.runner import evaluate
    spec = json.loads(Path(spec_path).read_text())
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    work = Path(spec["work"])
    if spec["backend"] == "nccl":
        # The runner maps no rank to a GPU itself: with the current device set per rank,
        # 'cuda' tensors of this process land on its own GPU.
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    dist.init_process_group(spec["backend"])
    t = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(t)
    sizes = SIZES[spec["mode"]]
    inputs = protocol_inputs(work, sizes, device)
    cfg = from_dict(protocol_raw(work, sizes, inputs, work / "sharded", device))
    t0 = time.perf_counter()
    res = evaluate(cfg, progress=False)
    wall = time.perf_counter() - t0
    if rank == 0:
        out = {"all_reduce": float(t.item()), "all_reduce_ok": float(t.item()) == 3.0,
               "world_size": dist.get_world_size(), "db": str(res["db"]),
               "complete": bool(res["complete"]), "evaluate_s": wall,
               "units_run_rank0": res["units_run"],
               "summary": _summary_rows(res["summary"]) if "summary" in res else None}
        (work / "nccl_rank0.json").write_text(json.dumps(out, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


STEP_FUNCS = {"bench_forward": step_bench_forward, "bench_train": step_bench_train,
              "protocol": step_protocol, "nccl": step_nccl}


def _write_atomic(path, obj) -> None:
    """Write JSON so that a reader (or a kill mid-write) never sees half a file."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, default=str))
    os.replace(tmp, path)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def step_worker(name: str, mode: str, device: str, work: str, out: str, limit_s: float) -> int:
    """Run one step in this process and write ``{"status", "result", "error"}`` to ``out``."""
    def partial(result):
        # what is done so far, kept if the step later runs past its limit
        _write_atomic(out, {"status": "partial", "result": result, "error": None})

    ctx = {"mode": mode, "device": device, "work": Path(work), "sizes": SIZES[mode],
           "limit_s": limit_s, "partial": partial}
    try:
        r = STEP_FUNCS[name](ctx)
        if r.get("skipped"):
            rec = {"status": "skipped", "result": r.get("result"), "error": None,
                   "reason": r["skipped"]}
        else:
            rec = {"status": "error" if r.get("error") else "ok", "result": r.get("result"),
                   "error": r.get("error")}
    except Exception as e:
        rec = {"status": "error", "result": None, "error": _one_line(f"{type(e).__name__}: {e}"),
               "traceback": traceback.format_exc()[-3000:]}
    _write_atomic(out, rec)
    return 0


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def _run_cuda_tests(mode: str, work: Path, limit: float, cuda: bool) -> dict:
    """``pytest -m cuda`` in a subprocess; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET
    xml = work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *SIZES[mode]["tests"]]
    try:
        p = run_bounded(cmd, limit, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "result": None, "error": f"pytest ran past {limit:.0f} s"}
    tail = (p.stdout + p.stderr)[-3000:]
    if p.returncode == 5:
        return {"status": "error", "result": {"log_tail": tail},
                "error": "no test is marked cuda (pytest exit code 5)"}
    if not xml.is_file():
        return {"status": "error", "result": {"log_tail": tail},
                "error": f"pytest exit code {p.returncode} and no report"}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    result = {**counts, "failed": failed, "paths": SIZES[mode]["tests"],
              "pytest_exit_code": p.returncode, "log_tail": tail if failed else None}
    if counts["failures"] or counts["errors"] or p.returncode not in (0,):
        return {"status": "error", "result": result,
                "error": f"{counts['failures']} failed, {counts['errors']} errors: "
                         + ", ".join(failed[:5])}
    if not cuda:
        return {"status": "skipped", "result": result, "error": None,
                "reason": f"no CUDA device: the {counts['tests']} cuda tests were skipped"}
    return {"status": "ok", "result": result, "error": None}


def _run_step(name: str, mode: str, device: str, work: Path, limit: float) -> dict:
    out = work / f"step_{name}.json"
    log = work / f"step_{name}.log"
    cmd = [sys.executable, "-m", "benchmark.gpu_check", "--step", name, "--mode", mode,
           "--device", device, "--work", str(work), "--step-out", str(out),
           "--limit-s", str(limit)]
    try:
        with open(log, "w") as f:
            p = run_bounded(cmd, limit, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        done = (_read_json(out) or {}).get("result")
        return {"status": "timeout", "result": done,
                "error": f"ran past its limit of {limit:.0f} s"
                         + (" (the parts done are in result)" if done else ""),
                "log_tail": log.read_text(errors="replace")[-2000:] if log.is_file() else None}
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    rec = _read_json(out)
    if rec is not None:
        if rec.get("status") != "partial":
            return rec
        return {"status": "error", "result": rec["result"], "log_tail": tail,
                "error": _one_line(f"worker exit code {p.returncode} (crashed) after partial "
                                   f"results: {_last_error(tail)}")}
    return {"status": "error", "result": None, "log_tail": tail,
            "error": _one_line(f"worker exit code {p.returncode} (crashed): {_last_error(tail)}")}


def run_check(mode: str = "full", device: str = "auto", out=None, budget_s=None,
              only=None) -> dict:
    """Run the steps (``only``: a subset of :data:`STEPS`) and write the JSON to ``out``."""
    import torch

    from model_zoo.scoring import resolve_device
    t_start = time.perf_counter()
    device = "cpu" if mode == "tiny" and device == "auto" else resolve_device(device)
    budget = BUDGET_S[mode] if budget_s is None else budget_s
    out = Path(out or (REPO / "runs" / "gpu_check" / f"gpu_check_{mode}.json"))
    report = {"schema": SCHEMA, "mode": mode,
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(device), "paper": PAPER,
              "sizes": {k: v for k, v in SIZES[mode].items() if k != "train_variants"},
              "limits_s": LIMITS[mode], "budget_s": budget, "steps": {}}
    cuda = torch.cuda.is_available() and torch.device(device).type == "cuda"
    if mode == "full" and not cuda:
        report["warning"] = ("full mode without a CUDA device: deq_large on the CPU runs past "
                             "the step limits (use --tiny on a CPU)")
        print(f"[gpu-check] warning: {report['warning']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="deqbench-gpu-check-") as tmp:
        work = Path(tmp)
        for name in STEPS:
            if only and name not in only:
                continue
            left = budget - (time.perf_counter() - t_start)
            limit = min(LIMITS[mode][name], left)
            t0 = time.perf_counter()
            if limit < 5:
                rec = {"status": "timeout", "result": None,
                       "error": f"not started: the {budget:.0f} s budget was spent"}
            elif name == "cuda_tests":
                rec = _run_cuda_tests(mode, work, limit, cuda)
            else:
                rec = _run_step(name, mode, device, work, limit)
            rec["time_s"] = round(time.perf_counter() - t0, 2)
            rec["limit_s"] = round(max(limit, 0.0), 1)
            report["steps"][name] = rec
            print(f"[gpu-check] {name}: {rec['status']} in {rec['time_s']:.1f} s"
                  + (f" -- {rec['error']}" if rec.get("error") else "")
                  + (f" ({rec['reason']})" if rec.get("reason") else ""), flush=True)
    report["wall_s"] = round(time.perf_counter() - t_start, 2)
    report["ok"] = all(s["status"] in ("ok", "skipped") for s in report["steps"].values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    return report


def format_summary(report: dict) -> str:
    """A few lines of the headline numbers beside the paper's."""
    lines = [f"gpu-check ({report['mode']}) on {report['environment'].get('device_name')}, "
             f"torch {report['environment']['torch']}, CUDA {report['environment']['cuda_runtime']}, "
             f"commit {report['environment']['git_commit']}: {report['wall_s']:.0f} s"]
    bf = (report["steps"].get("bench_forward") or {}).get("result") or {}
    for prec in PRECISIONS:
        p = bf.get(prec) or {}
        if p.get("plain_samples_per_s"):
            lines.append(f"  forward {prec}: plain {p['plain_samples_per_s']:.1f} samples/s "
                         f"(paper 94.9), Sec. 3.2 (Tf={p['tf']}, R={p['r']}) "
                         f"{p['sec32_samples_per_s']:.1f} samples/s = "
                         f"{p['sec32_time_ratio_vs_plain']:.2f}x the plain time")
    bt = (report["steps"].get("bench_train") or {}).get("result") or {}
    for prec in PRECISIONS:
        for r in (bt.get(prec) or {}).get("rows", []):
            lines.append(f"  train {prec} {r['method']}{'+sec33' if r['sec33'] != '-' else ''}: "
                         f"{r['samples_per_s']:.1f} samples/s (paper {r['paper_samples_per_s']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="every step on the CPU at tiny sizes (< 1 min)")
    ap.add_argument("--out", default=None, help="the JSON (default runs/gpu_check/gpu_check_MODE.json)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:k]")
    ap.add_argument("--budget-s", type=float, default=None, help="cap on the whole check (s)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STEPS)}")
    # internal: one step in a subprocess / one torchrun rank
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--limit-s", type=float, default=60.0, help=argparse.SUPPRESS)
    ap.add_argument("--dist-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.dist_worker:
        return dist_worker(a.dist_worker)
    if a.step:
        return step_worker(a.step, a.mode, a.device, a.work, a.step_out, a.limit_s)
    only = None
    if a.only:
        only = [s.strip() for s in a.only.split(",") if s.strip()]
        bad = [s for s in only if s not in STEPS]
        if bad:
            print(f"error: --only: unknown step {bad[0]!r} (known: {', '.join(STEPS)})",
                  file=sys.stderr)
            return 2
    if not (a.device in ("auto", "cpu", "cuda") or a.device.startswith("cuda:")):
        print(f"error: --device must be auto, cpu or cuda[:k], got {a.device!r}", file=sys.stderr)
        return 2
    report = run_check("tiny" if a.tiny else "full", a.device, a.out, a.budget_s, only)
    print(format_summary(report))
    out = a.out or (REPO / "runs" / "gpu_check" / f"gpu_check_{report['mode']}.json")
    print(f"wrote {out} (all steps ok or skipped: {report['ok']})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
