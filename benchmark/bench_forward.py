"""``deqbench bench forward``: cost of the plain forward vs the Sec. 3.2 defense (paper Table 10).

Throughput is measured as ratios taken in one run: the plain forward is timed again before
every defended configuration (interleaved), and each ratio uses the plain timing next to it, so
slow drift of a noisy machine cancels. f_theta evaluations per sample are counted exactly.
"""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model_zoo
from model_zoo import EntropyReduction, FinalState
from model_zoo.forward import legacy_kernels
from model_zoo.solvers import legacy_broyden_memory


def _time_forward(model, x, defense, repeats: int):
    best, rec = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():  # inference, as deployed; Sec. 3.2 enables grad where it needs it
            rec = model.run(x, defense=defense)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - t0)
    return best, rec


def bench_forward(model_name: str, batch_size: int = 32, tfs: Sequence[int] = (1, 2, 4, 8),
                  rs: Sequence[int] = (0, 1, 5, 10, 20), preset: str = "reference",
                  device: str = "cpu", repeats: int = 2, seed: int = 0, checkpoint=None,
                  eps: float | None = None, beta: float | None = None, progress: bool = True):
    """Rows of dicts: defense, Tf, R, seconds per batch, samples/s, f-evals per sample (no grad
    / with grad), and the time ratio defended / plain measured beside it."""
    torch.manual_seed(seed)
    if checkpoint:
        model = model_zoo.load(model_name, checkpoint=checkpoint, device=device)
    else:
        model = model_zoo.create(model_name).to(device).eval()
    entry = model_zoo.get_entry(model_name)
    c, h, w = entry.input_shape
    x = torch.rand(batch_size, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
    eps = eps if eps is not None else (entry.eps or 8 / 255)
    beta = beta if beta is not None else eps / 4
    plain = FinalState()
    _time_forward(model, x, plain, 1)  # warm-up (allocator, lazy init)
    rows = []
    grid = [(tf, r) for tf in tfs for r in rs]
    for tf, r in tqdm(grid, desc="bench forward", disable=not progress):
        t_plain, rec_p = _time_forward(model, x, plain, repeats)
        d = EntropyReduction(beta=beta, r=r, tf=tf, eps=eps, preset=preset)
        t_def, rec_d = _time_forward(model, x, d, repeats)
        rows.append({"defense": "plain", "tf": tf, "r": r, "s_per_batch": t_plain,
                     "samples_per_s": batch_size / t_plain,
                     "f_nograd": float(rec_p.nfev_nograd.float().mean()),
                     "f_grad": float(rec_p.nfev_grad.float().mean()), "ratio": 1.0})
        rows.append({"defense": f"entropy_reduction[{preset}]", "tf": tf, "r": r,
                     "s_per_batch": t_def, "samples_per_s": batch_size / t_def,
                     "f_nograd": float(rec_d.nfev_nograd.float().mean()),
                     "f_grad": float(rec_d.nfev_grad.float().mean()),
                     "ratio": t_def / t_plain})
    return rows


def format_table(rows) -> str:
    lines = ["| defense | Tf | R | samples/s | f evals/sample (no grad + grad) | time ratio vs plain |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["defense"] == "plain":
            continue
        lines.append(f"| {r['defense']} | {r['tf']} | {r['r']} | {r['samples_per_s']:.1f} | "
                     f"{r['f_nograd']:.0f} + {r['f_grad']:.0f} | {r['ratio']:.2f}x |")
    plain = [r for r in rows if r["defense"] == "plain"]
    if plain:
        sps = sorted(p["samples_per_s"] for p in plain)
        lines.append(f"\nplain forward (FinalState, interleaved): median {sps[len(sps)//2]:.1f} samples/s, "
                     f"{plain[0]['f_nograd']:.0f} + {plain[0]['f_grad']:.0f} f evals/sample")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# issue 16: the kernel levers of Sec. 3.2 and of Broyden, old vs new in one process
# ---------------------------------------------------------------------------------------------

def bench_model_and_inputs(model_name: str, batch_size: int, inputs: str = "random",
                           checkpoint=None, device: str = "cpu", seed: int = 0):
    """The model (registered weights when the zoo entry has a checkpoint, else untrained and
    seeded) and a batch: ``inputs='random'`` (uniform, seeded) or ``'test'`` (the first
    ``batch_size`` images of a seeded subset of the entry's test split) -> (model, x, y)."""
    entry = model_zoo.get_entry(model_name)
    torch.manual_seed(seed)
    if checkpoint or entry.checkpoint_path() is not None:
        model = model_zoo.load(model_name, checkpoint=checkpoint, device=device)
    else:
        model = model_zoo.create(model_name).to(device).eval()
    c, h, w = entry.input_shape
    if inputs == "test":
        from benchmark.data import load_dataset, subset
        ds = subset(load_dataset(entry.dataset, "test"), batch_size, seed=seed)
        x, y = ds.images[:batch_size].to(device), ds.labels[:batch_size].to(device)
    elif inputs == "random":
        x = torch.rand(batch_size, c, h, w, generator=torch.Generator().manual_seed(seed)).to(device)
        y = torch.arange(batch_size, device=device) % getattr(entry, "num_classes", 10)
    else:
        raise ValueError(f"inputs must be 'random' or 'test', got {inputs!r}")
    return model, x, y


def _timed(fn, device):
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def forward_counted(model, x, defense, legacy: bool = False):
    """``model.run(x, defense=defense)`` without a graph -> (record, f_theta evaluations);
    ``legacy``: with the pre-issue-16 kernels (:func:`legacy_kernels`)."""
    model.f_evals.reset()
    with torch.no_grad():
        if legacy:
            with legacy_kernels():
                rec = model.run(x, defense=defense)
        else:
            rec = model.run(x, defense=defense)
    return rec, model.f_evals.snapshot()


def compare_kernels(model, x, tf: int = 2, r: int = 10, rounds: int = 5, preset: str = "reference",
                    eps: float = 8 / 255, beta: float = 2 / 255, variants=None):
    """Sec. 3.2 at (tf, r), the pre-issue-16 kernels vs each lever vs all, INTERLEAVED: every
    round times the plain forward (FinalState) and every variant once, in turn, on the same
    inputs; medians over rounds. Old variants run with Broyden's copying memory and are
    divided by a plain forward that also copies, new ones by a plain forward with the in-place
    memory. f_theta evaluations are counted (``model.f_evals``); every variant's logits and
    final inputs are compared with the old path's (bitwise and max |diff|).

    ``variants``: {name: kernels} (default: 'old' = 'reference' under ``legacy_kernels()``,
    one entry per lever in ``KERNEL_LEVERS`` and ``INEXACT_LEVERS``, 'new' = 'fast' = the
    exact levers, 'new+inexact' = all levers; 'base' = the old update code with the new
    Broyden memory and MDEQ fusion cache). The single-lever variants also run with the new
    Broyden memory and fusion cache: compare them with 'base'."""
    from model_zoo.forward import INEXACT_LEVERS, KERNEL_LEVERS
    if variants is None:
        variants = {"old": "reference", "base": "reference", **{lv: lv for lv in KERNEL_LEVERS + INEXACT_LEVERS},
                    "new": "fast", "new+inexact": "fast+inexact"}
    dev = x.device
    plain = FinalState()

    def run(defense, legacy):
        return lambda: forward_counted(model, x, defense, legacy)

    jobs = {"plain[old]": run(plain, True), "plain[new]": run(plain, False)}
    for name, k in variants.items():
        d = EntropyReduction(beta=beta, r=r, tf=tf, eps=eps, preset=preset, kernels=k)
        jobs[name] = run(d, name == "old")
    for fn in jobs.values():  # warm-up
        fn()
    names = [k for k in jobs if not k.startswith("plain")]
    times = {k: [] for k in jobs}
    plain_next = {k: [] for k in names}
    outs = {}
    for _ in range(rounds):
        # each variant right after a plain forward of its own kind (old Broyden for 'old'), so
        # that each ratio is taken between neighbours on this shared, drifting machine
        for k in names:
            pk = "plain[old]" if k == "old" else "plain[new]"
            t, outs[pk] = _timed(jobs[pk], dev)
            times[pk].append(t)
            plain_next[k].append(t)
            t, outs[k] = _timed(jobs[k], dev)
            times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_rec = outs["old"][0]
    f64 = float64_reference(model, x, EntropyReduction(beta=beta, r=r, tf=tf, eps=eps,
                                                       preset=preset, kernels="reference"))
    rows = []
    for k in jobs:
        rec, fe = outs[k]
        is_plain = k.startswith("plain")
        per_round = [1.0] if is_plain else [a / b for a, b in zip(times[k], plain_next[k])]
        row = {"variant": k, "tf": tf, "r": r, "preset": preset, "s_per_batch": med[k],
               "ratio_vs_plain": statistics.median(per_round),
               # old / variant within a round (the two runs a few seconds apart)
               "speedup_vs_old": (statistics.median([a / b for a, b in zip(times["old"], times[k])])
                                  if not is_plain else None),
               "f_nograd_per_sample": fe["nograd"] / x.shape[0],
               "f_grad_per_sample": fe["grad"] / x.shape[0]}
        if not is_plain:
            row.update(logits_bitwise_equal_old=bool(torch.equal(rec.logits, ref_rec.logits)),
                       logits_max_abs_diff_old=float((rec.logits - ref_rec.logits).abs().max()),
                       x_used_bitwise_equal_old=bool(torch.equal(rec.x_used, ref_rec.x_used)),
                       x_used_pixels_differing=int((rec.x_used != ref_rec.x_used).sum()),
                       **distance_to_float64(rec, f64, beta))
        rows.append(row)
    old_d = next(r for r in rows if r["variant"] == "old")
    for row in rows:
        if "f64_pixels_moved" in row:
            row["within_float_tolerance"] = within_float_tolerance(row, old_d)
    return rows


def float64_copy(model):
    """A float64 deep copy of ``model``."""
    import copy
    with torch.no_grad():
        # weight-normed weights computed under autograd are non-leaf tensors, which deepcopy
        # refuses: recompute them without a graph first (the forward recomputes them anyway)
        if hasattr(model, "reset_weight_norm"):
            model.reset_weight_norm()
        return copy.deepcopy(model).double()


def float64_reference(model, x, defense, m64=None):
    """The same defense computed in float64 (a float64 copy of the model, the old kernels):
    the yardstick for 'the same numbers to float tolerance'. ``m64``: a copy from
    :func:`float64_copy` to reuse across batches."""
    m64 = float64_copy(model) if m64 is None else m64
    with torch.no_grad(), legacy_kernels():
        return m64.run(x.double(), defense=defense)


def distance_to_float64(rec, f64, beta: float) -> dict:
    """How far a float32 record is from the float64 computation of the same defense: input
    pixels moved by more than beta / 100 (a flipped sign step moves one by up to beta; float32
    rounding of a pixel in [0, 1] is < 1e-7), the largest logit difference, and predictions
    that differ."""
    dx = (rec.x_used.double() - f64.x_used).abs()
    return {"f64_pixels_moved": int((dx > beta / 100).sum()),
            "f64_logits_max_abs_diff": float((rec.logits.double() - f64.logits).abs().max()),
            "f64_predictions_differing": int((rec.logits.argmax(1) != f64.logits.argmax(1)).sum())}


def within_float_tolerance(row: dict, old: dict) -> bool:
    """A variant gives 'the same numbers to float tolerance' when it is no farther from the
    float64 computation than the old float32 code itself is, up to a factor of 2 (+ 1 pixel,
    + 1e-5 on the logits, so that an old distance of 0 does not demand bitwise equality), and
    predicts the same classes as float64 wherever the old code does. With sign steps the old
    float32 code is not bitwise float64 either: its own distance is the rounding floor."""
    return (row["f64_pixels_moved"] <= 2 * old["f64_pixels_moved"] + 1
            and row["f64_logits_max_abs_diff"] <= 2 * old["f64_logits_max_abs_diff"] + 1e-5
            and row["f64_predictions_differing"] <= old["f64_predictions_differing"])


def compare_broyden_memory(model, x, y, rounds: int = 7, i: int = None, ka: int = 5,
                           lam: float = 0.5):
    """Broyden's memory written in place vs copied each step, INTERLEAVED (old, new, old, ...):
    (a) the no-grad solve of the model's solver from z0 = 0; (b) one grid PGD step: the
    surrogate ``attacks.surrogates.UnrolledIntermediate(i, ka, lam)`` (no-grad solve to z[i],
    ka damped steps with gradient), cross-entropy, its gradient w.r.t. x. Returns rows with the
    median times, speed-up old / new (median of per-round ratios), f evals, and whether the
    iterates / gradients are bitwise equal."""
    from attacks.surrogates import UnrolledIntermediate
    i = i or model.solver.max_iter
    sur = UnrolledIntermediate(i, ka, lam)

    def solve():
        ctx = model.context(x)
        return model.solver.solve(ctx.f, model.zero_state(x)).states

    def step():
        xv = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(sur.logits(model, xv), y, reduction="sum")
        return torch.autograd.grad(loss, xv)[0]

    rows = []
    for name, fn in (("no-grad solve", solve), (f"grid PGD step (i={i}, ka={ka})", step)):
        def old():
            with legacy_broyden_memory():
                return fn()
        fn(), old()  # warm-up
        t_old, t_new = [], []
        for _ in range(rounds):
            a, o_old = _timed(old, x.device)
            b, o_new = _timed(fn, x.device)
            t_old.append(a)
            t_new.append(b)
        model.f_evals.reset()
        fn()
        fe = model.f_evals.snapshot()
        same = (all(torch.equal(p, q) for p, q in zip(o_old, o_new)) if isinstance(o_old, list)
                else bool(torch.equal(o_old, o_new)))
        rows.append({"measure": name, "s_old": statistics.median(t_old),
                     "s_new": statistics.median(t_new),
                     "speedup": statistics.median([a / b for a, b in zip(t_old, t_new)]),
                     "bitwise_equal": same, "f_nograd_per_sample": fe["nograd"] / x.shape[0],
                     "f_grad_per_sample": fe["grad"] / x.shape[0]})
    return rows


def float_tolerance_check(model_name: str, n: int = 512, batch_size: int = 64, seed: int = 0,
                          kernels="fast+inexact", tf: int = 2, r: int = 10,
                          preset: str = "reference") -> dict:
    """Sec. 3.2 with the old kernels, with ``kernels`` and in float64 on ``n`` test images of
    the entry (a seeded subset): each float32 side's accuracy under the defense, its distance
    to float64 (pixels moved by > beta / 100, largest logit difference, predictions that
    differ) and the predictions on which the two float32 sides disagree."""
    from benchmark.data import load_dataset, subset
    entry = model_zoo.get_entry(model_name)
    model = model_zoo.load(model_name)
    eps = entry.eps or 8 / 255
    kw = dict(r=r, tf=tf, eps=eps, beta=eps / 4, preset=preset)
    ds = subset(load_dataset(entry.dataset, "test"), n, seed=seed)
    recs = {"old": [], "new": [], "f64": []}
    m64 = float64_copy(model)  # once, not per batch
    for i in tqdm(range(0, n, batch_size), desc="float tolerance", leave=False):
        x = ds.images[i:i + batch_size]
        recs["old"].append(forward_counted(model, x, EntropyReduction(**kw, kernels="reference"),
                                           legacy=True)[0])
        recs["new"].append(forward_counted(model, x, EntropyReduction(**kw, kernels=kernels))[0])
        recs["f64"].append(float64_reference(model, x, EntropyReduction(**kw, kernels="reference"),
                                             m64=m64))
    from types import SimpleNamespace
    y = ds.labels[:n]
    cat = {k: SimpleNamespace(x_used=torch.cat([q.x_used for q in v]),
                              logits=torch.cat([q.logits for q in v])) for k, v in recs.items()}
    pred = {k: c.logits.argmax(1) for k, c in cat.items()}
    out = {"model": model_name, "n": n, "kernels": kernels, "tf": tf, "r": r, "preset": preset,
           "eps": eps, "pixels": cat["old"].x_used.numel(),
           "f64_accuracy": float((pred["f64"] == y).float().mean()),
           "predictions_differing_old_vs_new": int((pred["old"] != pred["new"]).sum())}
    for k in ("old", "new"):
        out[k] = {"accuracy": float((pred[k] == y).float().mean()),
                  **distance_to_float64(cat[k], cat["f64"], kw["beta"])}
    out["within_float_tolerance"] = within_float_tolerance(out["new"], out["old"])
    return out


def format_compare(kernel_rows, broyden_rows=()) -> str:
    lines = ["| variant | s/batch | time ratio vs plain | speed-up vs old | f evals/sample "
             "(no grad + grad) | logits = old | x_used = old | vs float64: pixels moved, max "
             "logit diff, predictions | float tolerance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in kernel_rows:
        eq = ("" if "logits_bitwise_equal_old" not in r else
              ("bitwise" if r["logits_bitwise_equal_old"] else f"max diff {r['logits_max_abs_diff_old']:.2e}"))
        xe = ("" if "x_used_bitwise_equal_old" not in r else
              ("bitwise" if r["x_used_bitwise_equal_old"] else f"{r['x_used_pixels_differing']} pixels differ"))
        sp = "" if r["speedup_vs_old"] is None else f"{r['speedup_vs_old']:.3f}x"
        d64 = ("" if "f64_pixels_moved" not in r else
               f"{r['f64_pixels_moved']}, {r['f64_logits_max_abs_diff']:.2e}, "
               f"{r['f64_predictions_differing']}")
        tol = "" if "within_float_tolerance" not in r else (
            "within" if r["within_float_tolerance"] else "**outside**")
        lines.append(f"| {r['variant']} | {r['s_per_batch']:.3f} | {r['ratio_vs_plain']:.2f}x | {sp} | "
                     f"{r['f_nograd_per_sample']:.0f} + {r['f_grad_per_sample']:.0f} | {eq} | {xe} | "
                     f"{d64} | {tol} |")
    if broyden_rows:
        lines += ["", "| Broyden memory | s old | s new | speed-up | bitwise equal | f evals/sample |",
                  "|---|---|---|---|---|---|"]
        for r in broyden_rows:
            lines.append(f"| {r['measure']} | {r['s_old']:.3f} | {r['s_new']:.3f} | {r['speedup']:.3f}x | "
                         f"{r['bitwise_equal']} | {r['f_nograd_per_sample']:.0f} + {r['f_grad_per_sample']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m benchmark.bench_forward --compare-old``: the issue-16 comparison (old vs new
    kernels of Sec. 3.2 and of Broyden's memory, interleaved) on one model and batch."""
    import argparse
    import json
    from pathlib import Path
    ap = argparse.ArgumentParser(prog="python -m benchmark.bench_forward")
    ap.add_argument("--compare-old", action="store_true", required=True)
    ap.add_argument("--float-tolerance", type=int, default=0, metavar="N",
                    help="instead of timing: old vs 'fast+inexact' vs float64 on N test images")
    ap.add_argument("--model", default="deq_tiny_fmnist_trades")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--inputs", choices=["test", "random"], default="test")
    ap.add_argument("--tf", type=int, default=2)
    ap.add_argument("--r", type=int, default=10)
    ap.add_argument("--preset", choices=["reference", "paper"], default="reference")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--broyden-rounds", type=int, default=7, help="0: skip the Broyden rows")
    ap.add_argument("--variants", default="headline",
                    help="'headline' (old, new, new+inexact), 'levers' (old, base, each exact "
                         "lever, new), 'inexact' (old, new, then the inexact levers added one "
                         "by one) or 'all'")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--output", default=None)
    a = ap.parse_args(argv)
    if a.batch_size < 1 or a.rounds < 1 or a.broyden_rounds < 0:
        ap.error("--batch-size and --rounds must be >= 1, --broyden-rounds >= 0")
    if a.threads is not None:
        if a.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    from model_zoo.runtime import allocator_state, tune_allocator
    tune_allocator()
    if a.float_tolerance:
        ft = float_tolerance_check(a.model, a.float_tolerance, a.batch_size, tf=a.tf, r=a.r,
                                   preset=a.preset)
        print(f"{a.model}, {ft['n']} test images, (Tf, R) = ({a.tf}, {a.r}), preset {a.preset}: "
              f"float64 accuracy {100 * ft['f64_accuracy']:.2f}%")
        for k, lab in (("old", "old float32"), ("new", "fast+inexact")):
            q = ft[k]
            print(f"  {lab}: accuracy {100 * q['accuracy']:.2f}%, vs float64 {q['f64_pixels_moved']} "
                  f"of {ft['pixels']} pixels moved, logits max diff {q['f64_logits_max_abs_diff']:.2e}, "
                  f"{q['f64_predictions_differing']} predictions differ")
        print(f"  old vs fast+inexact: {ft['predictions_differing_old_vs_new']} predictions differ; "
              f"within float tolerance: {ft['within_float_tolerance']}")
        if a.output:
            Path(a.output).parent.mkdir(parents=True, exist_ok=True)
            Path(a.output).write_text(json.dumps(ft, indent=2))
            print(f"wrote {a.output}")
        return 0
    model, x, y = bench_model_and_inputs(a.model, a.batch_size, a.inputs, a.checkpoint)
    entry = model_zoo.get_entry(a.model)
    eps = entry.eps or 8 / 255
    from model_zoo.forward import INEXACT_LEVERS, KERNEL_LEVERS
    every = {"old": "reference", "base": "reference",
             **{lv: lv for lv in KERNEL_LEVERS + INEXACT_LEVERS}, "new": "fast",
             "new+channels_last": KERNEL_LEVERS + ("channels_last",),
             "new+channels_last+bn_fold": KERNEL_LEVERS + ("channels_last", "bn_fold"),
             "new+inexact": "fast+inexact"}
    pick = {"headline": ("old", "new", "new+inexact"),
            "levers": ("old", "base") + KERNEL_LEVERS + ("new",),
            "inexact": ("old", "new", "new+channels_last", "new+channels_last+bn_fold",
                        "new+inexact"),
            "all": tuple(every)}
    if a.variants not in pick:
        ap.error(f"--variants must be one of {sorted(pick)}")
    kr = compare_kernels(model, x, a.tf, a.r, a.rounds, a.preset, eps=eps, beta=eps / 4,
                         variants={k: every[k] for k in pick[a.variants]})
    br = compare_broyden_memory(model, x, y, a.broyden_rounds) if a.broyden_rounds else []
    print(f"model {a.model}, batch {a.batch_size} ({a.inputs} images), (Tf, R) = ({a.tf}, {a.r}), "
          f"preset {a.preset}, eps {eps:.4g}, beta eps/4, {torch.get_num_threads()} thread(s), "
          f"{a.rounds} interleaved rounds")
    print(format_compare(kr, br))
    if a.output:
        from benchmark.provenance import provenance
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps({"model": a.model, "batch_size": a.batch_size,
                                              "inputs": a.inputs, "tf": a.tf, "r": a.r,
                                              "preset": a.preset, "kernels": kr, "broyden": br,
                                              "threads": torch.get_num_threads(),
                                              "allocator": allocator_state(),
                                              "provenance": provenance("cpu")}, indent=2))
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
