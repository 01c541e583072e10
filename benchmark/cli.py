"""The ``deqbench`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _zoo_rows():
    import model_zoo
    rows = []
    for name in model_zoo.list_models():
        e = model_zoo.get_entry(name)
        try:
            params = model_zoo.create(name).num_parameters()
        except Exception as exc:  # an architecture that cannot be built here (e.g. missing extra)
            params = f"error: {exc}"
        rows.append({"name": name, "dataset": e.dataset, "architecture": e.architecture,
                     "input_shape": list(e.input_shape), "parameters": params,
                     "training": e.training,
                     "threat_model": f"{e.threat_model} eps={e.eps:g}" if e.eps else e.threat_model,
                     "checkpoint": model_zoo.checkpoint_status(e)})
    return rows


def cmd_zoo_list(args):
    rows = _zoo_rows()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["name", "dataset", "architecture", "parameters", "training", "threat_model", "checkpoint"]
    width = {c: max(len(c), *(len(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join((f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])).ljust(width[c]) for c in cols))
    return 0


def cmd_zoo_show(args):
    import model_zoo
    e = model_zoo.get_entry(args.name)
    d = e.to_dict()
    d["checkpoint_status"] = model_zoo.checkpoint_status(e)
    m = model_zoo.create(args.name)
    d["description"] = m.describe() if hasattr(m, "describe") else {}
    d["parameters"] = m.num_parameters()
    print(json.dumps(d, indent=2, default=str))
    return 0


def cmd_zoo_publish(args):
    from benchmark.zoo_publish import publish
    e = publish(args.run, args.config, args.name, notes=args.notes)
    t = e["extra"]["test_subset"]
    print(f"published {e['name']}: {e['checkpoint']} sha256 {e['sha256'][:16]}...; test subset "
          f"n={t['n']}: clean {100 * t['clean_acc']:.1f}%, PGD-10 {100 * t['pgd10_acc']:.1f}%")
    return 0


def cmd_bench_forward(args):
    from benchmark.bench_forward import bench_forward, format_table
    from benchmark.provenance import provenance
    rows = bench_forward(args.model, batch_size=args.batch_size,
                         tfs=[int(v) for v in args.tf.split(",")],
                         rs=[int(v) for v in args.r.split(",")], preset=args.preset,
                         device=args.device, repeats=args.repeats, checkpoint=args.checkpoint)
    print(f"\nmodel {args.model}, batch {args.batch_size}, device {args.device}, preset {args.preset}")
    print(format_table(rows))
    if args.output:
        out = {"model": args.model, "batch_size": args.batch_size, "preset": args.preset,
               "provenance": provenance(args.device), "rows": rows}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
        print(f"\nwrote {args.output}")
    return 0


def cmd_bench_train(args):
    from benchmark.bench_train import bench_train, format_table
    from benchmark.provenance import provenance
    from model_zoo.train_config import load_train_config
    cfg = load_train_config(args.config)
    rows = bench_train(cfg, rounds=args.rounds, batch_size=args.batch_size, device=args.device)
    print(f"\nmodel {cfg.model}, batch {args.batch_size or cfg.train.batch_size}, device {args.device}")
    print(format_table(rows))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"config": cfg.to_dict(), "rows": rows,
                                                 "provenance": provenance(args.device)}, indent=2))
        print(f"\nwrote {args.output}")
    return 0


def cmd_eval(args):
    from benchmark.evaluate_model import evaluate_clean
    res = evaluate_clean(args.model, checkpoint=args.checkpoint, defense=args.defense,
                         dataset=args.dataset, n=args.n, batch_size=args.batch_size,
                         device=args.device, seed=args.seed, root=args.data_root, download=args.download,
                         allow_untrained=args.allow_untrained)
    s = res["summary"]
    print(f"\n{args.model} on {res['dataset']['name']} test subset n={s['n']} (seed {args.seed})"
          f"{'' if res['trained'] else '  [UNTRAINED weights]'}")
    print(f"  clean accuracy of the reported forward: {100 * s['clean_acc']:.2f}%")
    if "state_acc" in s:
        print("  accuracy per state z[1..N]: " + " ".join(f"{100 * a:.1f}" for a in s["state_acc"]))
        print(f"  mean relative residual of z[N]: {s['mean_final_rel_residual']:.3g}; "
              f"f evaluations per sample: {s['nfev_per_sample']:.1f}")
    print(f"  {s['samples_per_s']:.1f} samples/s on {res['provenance']['device']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1))
        print(f"  per-example record: {args.output}")
    return 0


def _write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


def cmd_attack(args):
    from benchmark.attack_run import run_attack
    budget = {}
    for kv in args.aa_budget or []:
        k, _, v = kv.partition("=")
        budget[k] = int(v)
    ta = {}
    for kv in args.ta_arg or []:
        k, _, v = kv.partition("=")
        ta[k] = float(v) if "." in v or "e" in v else int(v)
    res = run_attack(args.model, args.attack, checkpoint=args.checkpoint, defense=args.defense,
                     n=args.n, seed=args.seed, eps=args.eps, alpha=args.alpha, steps=args.steps,
                     surrogate=args.surrogate, mode=args.mode, kas=args.kas, lams=args.lams,
                     aa_attacks=args.aa_attacks, aa_budget=budget or None, ta_kwargs=ta,
                     batch_size=args.batch_size, device=args.device, dataset=args.dataset,
                     root=args.data_root, download=args.download,
                     allow_untrained=args.allow_untrained)
    s, a = res["summary"], res["attack"]
    print(f"\n{args.model} ({json.dumps(res['reported'])}) on {res['dataset']['name']} "
          f"test subset n={s['n']} (seed {args.seed})")
    print(f"  attack: {args.attack}  eps={a.get('eps')}  budget={a.get('budget', 'standard')}  "
          f"surrogate={json.dumps(a.get('surrogate'))}")
    print(f"  robust accuracy (judged on the reported forward): {100 * s['robust_accuracy']:.2f}%")
    for k in ("per_attack", "cumulative"):
        if k in s:
            print(f"  {k}: " + ", ".join(f"{n}: {100 * v:.1f}%" for n, v in s[k].items()))
    if "grid" in res and res["grid"]["min_over_means"] is not None:
        print(f"  min over per-setting means: {100 * res['grid']['min_over_means']:.2f}%")
    print(f"  f evaluations / example: {s['nfev_per_example']:,.0f}; wall {s['wall_s']:.1f} s")
    if args.output:
        _write_json(args.output, res)
        print(f"  per-example record: {args.output}")
    return 0


def cmd_bench_grid(args):
    from benchmark.attack_run import bench_grid, format_grid_table
    res = bench_grid(args.model, checkpoint=args.checkpoint, defense=args.defense, n=args.n,
                     seed=args.seed, modes=args.modes.split(","), kas=args.kas, lams=args.lams,
                     batch_size=args.batch_size, device=args.device,
                     allow_untrained=args.allow_untrained)
    print(f"\nmodel {args.model}, reported {json.dumps(res['reported'])}, eps {res['eps']}, "
          f"n {args.n}, device {args.device}")
    print(format_grid_table(res))
    if args.output:
        _write_json(args.output, res)
        print(f"\nwrote {args.output}")
    return 0


def _evaluate_cmd(args, only=None, title="evaluate"):
    """``only``: None (everything), or cfg -> the set of attacks to run."""
    from benchmark.run_config import load_run_config
    from benchmark.runner import evaluate
    cfg = load_run_config(args.config)
    if args.device:
        cfg.device = args.device
    only = only(cfg) if only is not None else None
    res = evaluate(cfg, progress=not args.quiet, only=only)
    if "summary" not in res:  # a non-zero torchrun rank
        return cfg, res
    import pandas as pd
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.float_format", "{:.3f}".format):
        print(f"\n{cfg.name} ({title}): {res['units_run']} work units run now"
              f"{'' if res['complete'] else ' (incomplete: run the same command again)'}")
        summ = res["summary"]
        if only is not None and len(summ):
            keep = [c for c in summ.columns if c in ("model", "defense", "n", "clean")
                    or c in only or (c in ("min_over_means", "strongest_setting") and "grid" in only)]
            summ = summ[keep]
        from benchmark.report.stats import summary_with_intervals
        print(summary_with_intervals(summ).to_string(index=False))   # % [95% CI]
        if only is not None and "transfer" in only:
            from benchmark.results_db import ResultsDB
            with ResultsDB(res["db"]) as db:
                t = db.records_frame(attack="transfer")
            if len(t):
                mat = (t.assign(target=t.model + "@" + t.defense)
                        .pivot_table(index="target", columns="setting", values="correct",
                                     aggfunc="mean"))
                print("\ntransfer matrix (accuracy; rows: target, columns: source):")
                print(mat.to_string())
    print(f"\nresults database: {res['db']}")
    print(f"next: deqbench tables {cfg.run_dir}   deqbench figures {cfg.run_dir}"
          f"   deqbench leaderboard {args.config}")
    return cfg, res


def cmd_evaluate(args):
    _evaluate_cmd(args)
    return 0


def cmd_sweep(args):
    _evaluate_cmd(args, only=lambda cfg: {"grid"}, title="sweep: the (i, Ka, lambda) grid")
    return 0


def cmd_transfer(args):
    # the sources' strongest grid settings first, when the config has a grid
    _evaluate_cmd(args, only=lambda cfg: {"transfer"} | ({"grid"} & set(cfg.attacks)),
                  title="transfer")
    return 0


def cmd_leaderboard(args):
    from benchmark.reports import leaderboard_from_db
    from benchmark.run_config import load_run_config
    from benchmark.runner import evaluate
    cfg = load_run_config(args.config)
    res = evaluate(cfg, progress=not args.quiet)  # a finished run only re-reads its database
    if not res["complete"]:
        raise RuntimeError("the run is incomplete; run the same command again")
    paths = leaderboard_from_db(res["db"], root=args.root)
    folder = paths[0].parent
    print(f"{len(paths)} entries in {folder}/; rendered {folder}/leaderboard.md, .csv, .html")
    print((folder / "leaderboard.md").read_text())
    return 0


def cmd_tables(args):
    from benchmark.tables import main as tables_main
    return tables_main([args.run] + (["--out", args.out] if args.out else [])
                       + (["--bench", args.bench] if args.bench else []))


def cmd_claims(args):
    from benchmark.report.claims import main as claims_main
    return claims_main([args.run] + (["--leaderboard", args.leaderboard] if args.leaderboard else []))


def cmd_export(args):
    from benchmark.report.export import main as export_main
    return export_main([args.run] + (["--out", args.out] if args.out else []))


def cmd_figures(args):
    from benchmark.figures import main as figures_main
    return figures_main([args.run] + (["--out", args.out] if args.out else [])
                        + (["--formats", args.formats] if args.formats else [])
                        + [a for p in (args.train_log or []) for a in ("--train-log", p)]
                        + (["--force"] if args.force else []))


def cmd_train(args):
    from benchmark.train import run_training
    from model_zoo.train_config import load_train_config
    from model_zoo.training import TrainingInterrupted
    cfg = load_train_config(args.config)
    try:
        s = run_training(cfg, resume=args.resume, device=args.device, shards=args.shards,
                         checkpoint_every_s=args.checkpoint_every)
    except TrainingInterrupted as e:
        print(f"deqbench: {e}", file=sys.stderr)
        return 130
    if s.get("best"):
        b = s["best"]
        print(f"\n{cfg.name}: {s['steps']} steps in {s['wall_s']:.0f} s "
              f"({s['samples_per_s']:.1f} samples/s); best epoch {b['epoch']}: "
              f"val clean {100 * b['val_clean']:.2f}%, val PGD-10 {100 * b['val_pgd10']:.2f}%")
    print(f"outputs: {s['out_dir']}/ (best.pt, last.pt, log.csv, summary.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deqbench", description="Robustness benchmark for DEQ classifiers")
    sub = p.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="the model zoo").add_subparsers(dest="zoo_command", required=True)
    zl = zoo.add_parser("list", help="list registered models")
    zl.add_argument("--format", choices=["table", "json"], default="table")
    zl.set_defaults(func=cmd_zoo_list)
    zs = zoo.add_parser("show", help="one entry's metadata")
    zs.add_argument("name")
    zs.set_defaults(func=cmd_zoo_show)

    zp = zoo.add_parser("publish", help="ship a finished training run as a zoo entry")
    zp.add_argument("--run", required=True, help="the run folder (with best.pt, log.csv, summary.json)")
    zp.add_argument("--config", required=True)
    zp.add_argument("--name", required=True)
    zp.add_argument("--notes", default="")
    zp.set_defaults(func=cmd_zoo_publish)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    bf = bench.add_parser("forward", help="plain forward vs EntropyReduction over Tf x R (Table 10)")
    bf.add_argument("--model", default="deq_tiny_fashion_mnist")
    bf.add_argument("--checkpoint", default=None)
    bf.add_argument("--batch-size", type=int, default=32)
    bf.add_argument("--tf", default="1,2,4,8")
    bf.add_argument("--r", default="0,1,5,10,20")
    bf.add_argument("--preset", choices=["reference", "paper"], default="reference")
    bf.add_argument("--repeats", type=int, default=2)
    bf.add_argument("--device", default="cpu")
    bf.add_argument("--output", default=None, help="write the rows as JSON here")
    bf.set_defaults(func=cmd_bench_forward)

    tr = sub.add_parser("train", help="train a model from a YAML config (torchrun for DDP)")
    tr.add_argument("config")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT/NAME/last.pt")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    tr.add_argument("--shards", type=int, default=1,
                    help="micro-batches per process (gradient accumulation)")
    tr.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS",
                    help="also save the resumable last.pt inside an epoch this often, so a "
                         "SIGKILL loses at most this much work (0: epoch ends and signals only)")
    tr.set_defaults(func=cmd_train)

    bt = bench.add_parser("train", help="training samples/s: PGD-AT / TRADES with and without Sec. 3.3")
    bt.add_argument("--config", required=True)
    bt.add_argument("--rounds", type=int, default=3)
    bt.add_argument("--batch-size", type=int, default=None)
    bt.add_argument("--device", default="cpu")
    bt.add_argument("--output", default=None)
    bt.set_defaults(func=cmd_bench_train)

    ev = sub.add_parser("eval", help="clean evaluation of one model on a fixed test subset")
    ev.add_argument("--model", required=True)
    ev.add_argument("--checkpoint", default=None)
    ev.add_argument("--defense", default=None, help="'final', 'early:7', 'entropy_reduction', ...")
    ev.add_argument("--dataset", default=None)
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--download", action="store_true",
                    help="let torchvision download a missing dataset (needs internet)")
    ev.add_argument("--n", type=int, default=500)
    ev.add_argument("--batch-size", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--allow-untrained", action="store_true")
    ev.add_argument("--output", default=None, help="write the per-example record (JSON) here")
    ev.set_defaults(func=cmd_eval)

    for name, func, text in (
            ("evaluate", cmd_evaluate, "run the leaderboard protocol of a run config (resumable)"),
            ("sweep", cmd_sweep, "only the (i, Ka, lambda) grid of a run config (per-setting "
                                 "accuracy: use attacks.grid.mode full)"),
            ("transfer", cmd_transfer, "the transfer matrix of a run config (attacks.transfer; "
                                       "the sources' grid runs first when configured)")):
        ep = sub.add_parser(name, help=text)
        ep.add_argument("config")
        ep.add_argument("--device", default=None)
        ep.add_argument("--quiet", action="store_true")
        ep.set_defaults(func=func)

    lb = sub.add_parser("leaderboard", help="evaluate a run config (if needed) and write its leaderboard")
    lb.add_argument("config")
    lb.add_argument("--root", default="leaderboards")
    lb.add_argument("--quiet", action="store_true")
    lb.set_defaults(func=cmd_leaderboard)

    tb = sub.add_parser("tables", help="the paper's tables of a run (Markdown + CSV), from its database")
    tb.add_argument("run", help="run folder (with results.sqlite) or the .sqlite file")
    tb.add_argument("--out", default=None)
    tb.add_argument("--bench", default=None, help="folder of `deqbench bench train|forward "
                    "--output` JSON files for Tables 9-10 (default: RUN/bench)")
    tb.set_defaults(func=cmd_tables)
    fg = sub.add_parser("figures", help="the paper's figures of a run (PNG + PDF), from its database")
    fg.add_argument("run", help="run folder (with results.sqlite) or the .sqlite file")
    fg.add_argument("--out", default=None)
    fg.add_argument("--formats", default=None, help="comma-separated (default png,pdf)")
    fg.add_argument("--train-log", action="append", default=None,
                    help="training log.csv for Fig. 4 (repeatable; default: found from the run)")
    fg.add_argument("--force", action="store_true",
                    help="redraw even when RUN/figures holds the figures of the same inputs")
    fg.set_defaults(func=cmd_figures)
    cl = sub.add_parser("claims", help="the paper's claims as verdicts: RUN/claims.md + .json")
    cl.add_argument("run", help="run folder (with results.sqlite) or the .sqlite file")
    cl.add_argument("--leaderboard", default=None, help="also copy claims.md/.json into this folder")
    cl.set_defaults(func=cmd_claims)
    ex = sub.add_parser("export", help="per-example table of a run: RUN/export.csv.gz")
    ex.add_argument("run", help="run folder (with results.sqlite) or the .sqlite file")
    ex.add_argument("--out", default=None, help="output file (default RUN/export.csv.gz)")
    ex.set_defaults(func=cmd_export)

    at = sub.add_parser("attack", help="attack one model/defense; per-example records (JSON)")
    at.add_argument("--model", required=True)
    at.add_argument("--checkpoint", default=None)
    at.add_argument("--defense", default=None, help="'final', 'early:7', 'entropy_reduction', ...")
    at.add_argument("--attack", default="pgd",
                    help="pgd | grid | autoattack | adaptive | torchattacks:NAME")
    at.add_argument("--surrogate", default=None,
                    help="gradient source: phantom_final (default), implicit_final, full_backprop, "
                         "ui:i,ka,lam[,preset]")
    at.add_argument("--eps", type=float, default=None, help="default: the model's threat model")
    at.add_argument("--alpha", type=float, default=None, help="PGD step (default eps/4)")
    at.add_argument("--steps", type=int, default=10)
    at.add_argument("--mode", default="efficient", choices=["efficient", "full", "naive"])
    at.add_argument("--kas", default="1-9")
    at.add_argument("--lams", default="0.5,1")
    at.add_argument("--aa-attacks", default="apgd-ce,apgd-t,fab-t,square")
    at.add_argument("--aa-budget", nargs="*", metavar="KEY=INT",
                    help="reduced AutoAttack budget, e.g. apgd_n_iter=20 square_n_queries=500")
    at.add_argument("--ta-arg", nargs="*", metavar="KEY=VALUE", help="torchattacks kwargs")
    at.add_argument("--n", type=int, default=100)
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--batch-size", type=int, default=100)
    at.add_argument("--device", default="cpu")
    at.add_argument("--dataset", default=None)
    at.add_argument("--data-root", default=None)
    at.add_argument("--download", action="store_true")
    at.add_argument("--allow-untrained", action="store_true")
    at.add_argument("--output", default=None)
    at.set_defaults(func=cmd_attack)

    bg = bench.add_parser("grid", help="(i, Ka, lambda) grid worst case: efficient vs reference protocol")
    bg.add_argument("--model", default="deq_tiny_fmnist_pgdat")
    bg.add_argument("--checkpoint", default=None)
    bg.add_argument("--defense", default=None)
    bg.add_argument("--n", type=int, default=32)
    bg.add_argument("--seed", type=int, default=0)
    bg.add_argument("--modes", default="efficient,naive")
    bg.add_argument("--kas", default="1-9")
    bg.add_argument("--lams", default="0.5,1")
    bg.add_argument("--batch-size", type=int, default=100)
    bg.add_argument("--device", default="cpu")
    bg.add_argument("--allow-untrained", action="store_true")
    bg.add_argument("--output", default=None)
    bg.set_defaults(func=cmd_bench_grid)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
        # Known user errors: one clear line, no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"deqbench: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
