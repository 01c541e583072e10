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
    if args.compare_old:  # issue 16: old vs new kernels of Sec. 3.2 and Broyden, interleaved
        from benchmark.bench_forward import main as compare_main
        argv = ["--compare-old", "--model", args.model, "--batch-size", str(args.batch_size),
                "--tf", args.tf.split(",")[0], "--r", args.r.split(",")[0],
                "--preset", args.preset, "--rounds", str(args.repeats),
                "--variants", args.variants, "--inputs", args.inputs]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        if args.checkpoint:
            argv += ["--checkpoint", args.checkpoint]
        if args.output:
            argv += ["--output", args.output]
        return compare_main(argv)
    rows = bench_forward(args.model, batch_size=args.batch_size,
                         tfs=_int_list(args.tf, "--tf"), rs=_int_list(args.r, "--r"),
                         preset=args.preset,
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


# ---------------------------------------------------------------------------------------------
# one validation for configs and the command line: `eval` and `attack` build the run-config dict
# their arguments stand for and run benchmark.run_config.from_dict on it; its errors name the
# config key, translated here to the argument that set it
# ---------------------------------------------------------------------------------------------

_ARG_OF_KEY = [  # (config key regex, argument), first match wins
    (r"batch_size", "--batch-size"), (r"device", "--device"), (r"seed", "--seed"),
    (r"data\.n", "--n"), (r"data\.seed", "--seed"), (r"data\.dataset", "--dataset"),
    (r"data\.root", "--data-root"), (r"data\.first_n", "--first-n"), (r"threat\.eps", "--eps"),
    (r"threat.*", "--eps"), (r"models\[0\]\.name", "--model"),
    (r"models\[0\]\.factory", "--model-factory/--model-file"),
    (r"models\[0\]\.kwargs", "--model-kwargs"),
    (r"models\[0\]\.checkpoint", "--checkpoint"), (r"models\[0\]\.sha256", "--sha256"),
    (r"models\[0\]\.defenses", "--defense"), (r"models.*", "--model"),
    (r"attacks\.\w+\.steps", "--steps"), (r"attacks\.\w+\.alpha", "--alpha"),
    (r"attacks\.\w+\.surrogate", "--surrogate"), (r"attacks\.grid\.kas", "--kas"),
    (r"attacks\.grid\.lams", "--lams"), (r"attacks\.grid\.mode", "--mode"),
    (r"attacks\.autoattack\.attacks", "--aa-attacks"),
    (r"attacks\.autoattack\.budget.*", "--aa-budget"), (r"attacks\.\w+\.random_start", "--ta-arg"),
    (r"reliability\.residual_threshold", "--residual-threshold"),
]


def _as_argument_error(e: Exception) -> str:
    """'run config: attacks.pgd.steps: must be ...' -> 'argument --steps: must be ...'."""
    import re
    msg = str(e)
    m = re.match(r"run config: ([^:]+): (.*)$", msg, re.S)
    if not m:
        return msg
    for pat, arg in _ARG_OF_KEY:
        if re.fullmatch(pat, m.group(1)):
            return f"argument {arg}: {m.group(2)}"
    return f"argument for {m.group(1)}: {m.group(2)}"


class UsageError(ValueError):
    """A command-line argument that cannot be used (exit code 2, one line)."""


def parse_value(text: str):
    """A typed ``KEY=VALUE`` value: true/false -> bool, none/null -> None, integers, floats
    (also 1e-3, .5), a fraction A/B -> float; anything else stays a string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t.count("/") == 1:
        a, b = t.split("/")
        try:
            if float(b) != 0:
                return float(a) / float(b)
        except ValueError:
            pass
    return t


def _key_values(items, arg: str, conv=parse_value) -> dict:
    out = {}
    for kv in items or []:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"argument {arg}: expected KEY=VALUE, got {kv!r}")
        try:
            out[k.strip()] = conv(v)
        except ValueError:
            raise UsageError(f"argument {arg}: {k.strip()}: expected an integer, got {v!r}") from None
    return out


def _int_list(text: str, arg: str) -> list:
    """'1-9' or '1,5,9' (or a mix) -> [ints], with an error naming ``arg``."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise UsageError(f"argument {arg}: expected integers or ranges such as 1-9 or "
                             f"1,5,9, got {text!r}") from None
    if not out:
        raise UsageError(f"argument {arg}: empty list")
    return out


def _float_list(text: str, arg: str) -> list:
    try:
        out = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"argument {arg}: expected comma-separated numbers such as 0.5,1, "
                         f"got {text!r}") from None
    if not out:
        raise UsageError(f"argument {arg}: empty list")
    return out


def _defense_arg(text):
    """--defense: a name ('final', 'early:7', 'entropy_reduction') or a JSON object."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise UsageError(f"argument --defense: not valid JSON ({e}); write e.g. "
                             "'{\"name\": \"early\", \"index\": 7}'") from None
        if not isinstance(d, dict):
            raise UsageError(f"argument --defense: a JSON defense must be an object, got {text!r}")
        return d
    return text


def _user_model_args(args, model: dict) -> None:
    """--model-factory MODULE:FN / --model-file FILE.py:FN (+ --model-kwargs JSON): a model from
    user code, the same keys as a run config's ``models: [{factory: ...}]``; --model names it
    (default: the function's name). The config validator registers it under that name."""
    fac, fil = getattr(args, "model_factory", None), getattr(args, "model_file", None)
    if fac and fil:
        raise UsageError("argument --model-file: give either --model-factory or --model-file")
    if fil is not None and not (":" in fil and fil.rpartition(":")[0].endswith(".py")):
        raise UsageError(f"argument --model-file: expected FILE.py:FUNCTION, got {fil!r}")
    spec = fac or fil
    if spec is None:
        if args.model is None:
            raise UsageError("argument --model is required (or --model-factory MODULE:FN / "
                             "--model-file FILE.py:FN for a model from your own code)")
        if getattr(args, "model_kwargs", None):
            raise UsageError("argument --model-kwargs: only with --model-factory/--model-file")
        return
    if args.model is None:
        args.model = spec.rpartition(":")[2]
    model["name"] = args.model
    model["factory"] = spec
    if getattr(args, "model_kwargs", None):
        try:
            kw = json.loads(args.model_kwargs)
        except ValueError as e:
            raise UsageError(f"argument --model-kwargs: not valid JSON ({e})") from None
        if not isinstance(kw, dict):
            raise UsageError(f"argument --model-kwargs: a JSON object, got {args.model_kwargs!r}")
        model["kwargs"] = kw
    if args.defense is None:
        model.pop("defenses")   # a DEQ from user code: its own forward


def _add_user_model_args(p) -> None:
    p.add_argument("--model-factory", default=None, metavar="MODULE:FUNCTION",
                   help="build the model with your own code, e.g. mypkg.models:make_net "
                        "(--model names it, --checkpoint/--sha256 give its weights)")
    p.add_argument("--model-file", default=None, metavar="FILE.py:FUNCTION",
                   help="the same from a Python file, e.g. examples/byo/cnn_fmnist.py:make_model")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of the factory, e.g. '{\"width\": 16}'")


def _validated(args, attack_section=None, attack_opts=None):
    """Run the run-config validator on the config these arguments stand for; returns the
    RunConfig (eps resolved: --eps, else the model's threat model; ``eval`` has no eps)."""
    from benchmark.run_config import ConfigError, _check_n, from_dict
    import model_zoo
    eps = getattr(args, "eps", None)
    if eps is None and attack_section is None and args.command == "eval":
        eps = 0.0  # clean evaluation: no threat model involved
    if eps is None:
        try:
            from benchmark.attack_run import DEFAULT_EPS
            e = model_zoo.get_entry(args.model) if isinstance(args.model, str) else None
            eps = (e.eps or DEFAULT_EPS.get(args.dataset or e.dataset)) if e else 0.1
        except KeyError:
            eps = 0.1  # the unknown model is reported below, by the validator
        if eps is None:
            raise UsageError(f"argument --eps: {args.model!r} has no threat-model eps; pass --eps")
    model = {"name": args.model, "defenses": [args.defense if args.defense is not None else "final"]}
    _user_model_args(args, model)
    if args.checkpoint is not None:
        model["checkpoint"] = args.checkpoint
    if getattr(args, "sha256", None):
        model["sha256"] = args.sha256
    # --dataset may differ from the model's (e.g. synthetic data of the same shape): only the
    # subset size is checked against it, below
    data = {"n": args.n, "seed": args.seed, "first_n": bool(getattr(args, "first_n", False))}
    if getattr(args, "data_root", None):
        data["root"] = args.data_root
    if "factory" in model and args.dataset:
        data["dataset"] = args.dataset  # a model from user code takes the images of --dataset
    raw = {"name": "command-line", "device": args.device, "batch_size": args.batch_size,
           "seed": args.seed, "data": data, "threat": {"eps": eps}, "models": [model],
           "attacks": {attack_section: attack_opts or {}} if attack_section else {}}
    if getattr(args, "residual_threshold", None) is not None:
        raw["reliability"] = {"residual_threshold": args.residual_threshold}
    try:
        cfg = from_dict(raw, source="command line")
        from benchmark.run_config import check_checkpoint_files
        check_checkpoint_files(cfg)
        if args.dataset:
            _check_n({"dataset": args.dataset, "n": args.n})
        from benchmark.run_config import check_device_available
        check_device_available(cfg.device_requested)
    except ConfigError as e:
        raise UsageError(_as_argument_error(e)) from None
    return cfg


def _reliability_lines(summary: dict) -> list:
    out = []
    if summary.get("nonfinite"):
        out.append(f"  WARNING: {summary['nonfinite']} of {summary['n']} examples have "
                   "non-finite logits/states/residuals: counted WRONG (status 'nonfinite')")
    return out


def cmd_eval(args):
    from benchmark.evaluate_model import evaluate_clean
    from model_zoo.scoring import UNCONVERGED_SHARE
    args.defense = _defense_arg(args.defense)
    cfg = _validated(args)
    thr = (cfg.reliability or {}).get("residual_threshold")
    res = evaluate_clean(args.model, checkpoint=args.checkpoint, defense=args.defense,
                         dataset=args.dataset, n=args.n, batch_size=args.batch_size,
                         device=cfg.device, seed=args.seed, root=args.data_root,
                         download=args.download, allow_untrained=args.allow_untrained,
                         first_n=args.first_n, sha256=args.sha256,
                         **({"residual_threshold": thr} if thr is not None else {}))
    res["device_requested"] = cfg.device_requested
    s = res["summary"]
    subset_text = "first n" if args.first_n else f"seed {args.seed}"
    print(f"\n{args.model} on {res['dataset']['name']} test subset n={s['n']} ({subset_text})"
          f"{'' if res['trained'] else '  [UNTRAINED weights]'}")
    print(f"  clean accuracy of the reported forward: {100 * s['clean_acc']:.2f}%")
    if "state_acc" in s:
        print("  accuracy per state z[1..N]: " + " ".join(f"{100 * a:.1f}" for a in s["state_acc"]))
        mean, top = s["mean_final_rel_residual"], s["max_final_rel_residual"]
        rtext = "none finite" if mean is None else f"mean {mean:.3g}, max {top:.3g} (finite ones)"
        print(f"  relative residual of z[N]: {rtext}; "
              f"f evaluations per sample: {s['nfev_per_sample']:.1f}")
        print(f"  unconverged (final relative residual > {s['residual_threshold']:g}): "
              f"{s['unconverged']} of {s['n']} ({100 * s['unconverged_share']:.1f}%)")
        if s["unconverged_share"] > UNCONVERGED_SHARE:
            print(f"  WARNING: more than {100 * UNCONVERGED_SHARE:g}% of the solves did not "
                  "converge: the dynamics settle on garbage (check the weights / solver)")
    print(f"  non-finite outputs (counted wrong): {s['nonfinite']} of {s['n']}")
    for line in _reliability_lines(s):
        print(line)
    print(f"  {s['samples_per_s']:.1f} samples/s on {res['provenance']['device']}")
    if args.output:
        _write_json(args.output, res)
        print(f"  per-example record: {args.output}")
    return 0


def _json_safe(obj):
    """Strict JSON: non-finite floats become null (records carry a status saying why)."""
    import math
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_json_safe(obj), indent=1, default=str, allow_nan=False))


def _attack_section(args):
    """(config section, options) that ``deqbench attack`` arguments stand for."""
    name = args.attack.partition(":")[0]
    if name == "pgd":
        opts = {"steps": args.steps}
    elif name == "grid":
        opts = {"steps": args.steps, "kas": _int_list(args.kas, "--kas"),
                "lams": _float_list(args.lams, "--lams"), "mode": args.mode}
    elif name == "autoattack":
        opts = {"attacks": [a.strip() for a in args.aa_attacks.split(",") if a.strip()],
                "budget": _key_values(args.aa_budget, "--aa-budget", int)}
    elif name == "adaptive":
        opts = {"steps": args.steps}
        if args.aa_budget:    # the adaptive protocol's APGD / Square budget
            opts["budget"] = _key_values(args.aa_budget, "--aa-budget", int)
    else:
        return None, None
    if args.alpha is not None and name != "autoattack":
        opts["alpha"] = args.alpha
    if args.surrogate is not None and name in ("pgd", "autoattack"):
        opts["surrogate"] = args.surrogate
    return name, opts


def cmd_attack(args):
    from benchmark.attack_run import ATTACKS, run_attack
    args.defense = _defense_arg(args.defense)
    name, sub = args.attack.partition(":")[::2]
    if name not in ATTACKS or (name == "torchattacks") != bool(sub):
        raise UsageError(f"argument --attack: unknown attack {args.attack!r}; choose one of "
                         "pgd, grid, autoattack, adaptive, torchattacks:NAME (e.g. torchattacks:PGD)")
    ta = _key_values(args.ta_arg, "--ta-arg")
    if args.steps is not None and (isinstance(args.steps, bool) or args.steps < 1):
        raise UsageError(f"argument --steps: must be an integer >= 1, got {args.steps}")
    section, opts = _attack_section(args)
    cfg = _validated(args, section, opts)
    if name == "torchattacks":
        import torchattacks
        cls = getattr(torchattacks, sub, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, torchattacks.attack.Attack):
            raise UsageError(f"argument --attack: torchattacks has no attack {sub!r}")
        import inspect
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "eps"}
        bad = sorted(set(ta) - params)
        if bad:
            raise UsageError(f"argument --ta-arg: torchattacks.{sub} takes no {bad[0]!r} "
                             f"(it takes: {', '.join(sorted(params))})")
    elif ta:
        raise UsageError("argument --ta-arg: only for --attack torchattacks:NAME")
    budget = (opts or {}).get("budget") or None
    res = run_attack(args.model, args.attack, checkpoint=args.checkpoint, defense=args.defense,
                     n=args.n, seed=args.seed, eps=cfg.eps, alpha=args.alpha, steps=args.steps,
                     surrogate=args.surrogate, mode=args.mode, kas=args.kas, lams=args.lams,
                     aa_attacks=args.aa_attacks, aa_budget=budget, ta_kwargs=ta,
                     batch_size=args.batch_size, device=cfg.device, dataset=args.dataset,
                     root=args.data_root, download=args.download,
                     allow_untrained=args.allow_untrained, first_n=args.first_n,
                     sha256=args.sha256)
    res["device_requested"] = cfg.device_requested
    s, a = res["summary"], res["attack"]
    subset_text = "first n" if args.first_n else f"seed {args.seed}"
    print(f"\n{args.model} ({json.dumps(res['reported'])}) on {res['dataset']['name']} "
          f"test subset n={s['n']} ({subset_text})")
    print(f"  attack: {args.attack}  eps={a.get('eps')}  budget={a.get('budget', 'standard')}  "
          f"surrogate={json.dumps(a.get('surrogate'))}")
    print(f"  robust accuracy (judged on the reported forward): {100 * s['robust_accuracy']:.2f}%")
    for k in ("per_attack", "cumulative"):
        if k in s:
            print(f"  {k}: " + ", ".join(f"{n}: {100 * v:.1f}%" for n, v in s[k].items()))
    if "grid" in res and res["grid"]["min_over_means"] is not None:
        print(f"  min over per-setting means: {100 * res['grid']['min_over_means']:.2f}%")
    print(f"  f evaluations / example: {s['nfev_per_example']:,.0f}; wall {s['wall_s']:.1f} s")
    print(f"  non-finite outputs (counted wrong): {s['nonfinite']} of {s['n']}")
    for line in _reliability_lines(s):
        print(line)
    if args.output:
        _write_json(args.output, res)
        print(f"  per-example record: {args.output}")
    return 0


def cmd_bench_protocol(args):
    from benchmark.bench_protocol import bench_protocol, format_report
    res = bench_protocol(args.config, args.n, baseline=args.baseline, rounds=args.rounds,
                         workers=args.workers, keep=args.keep,
                         attacks=args.attacks.split(",") if args.attacks else None)
    print(format_report(res))
    if args.output:
        _write_json(args.output, res)
        print(f"\nwrote {args.output}")
    return 0


def cmd_bench_grid(args):
    from benchmark.attack_run import bench_grid, format_grid_table
    _int_list(args.kas, "--kas")
    _float_list(args.lams, "--lams")
    bad = [m for m in args.modes.split(",") if m not in ("efficient", "full", "naive")]
    if bad:
        raise UsageError(f"argument --modes: unknown mode {bad[0]!r} (choose from efficient, "
                         "full, naive)")
    args.defense = _defense_arg(args.defense)
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


def _workers_arg(text):
    """``--workers``: an integer >= 1 or 'auto'."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {text!r}")
    return v


WORKERS_HELP = ("local worker processes for the work units: an integer or auto (default: 2 "
                "single-thread processes on a CPU with >= 2 cores, 1 on a GPU; measured 1.4x "
                "the throughput of one 2-thread process on the 2-core CPU)")


ARCHIVE_HELP = ("the archive folder of finished units (overrides the config's archive.dir, "
                "keeping its git / every_s; see benchmark/archive.py): e.g. the repository's "
                "results/ folder when the code runs from a git worktree")


def _apply_archive_arg(cfg, args) -> None:
    if getattr(args, "archive", None):
        from benchmark.archive import check_archive
        cfg.archive = check_archive({**(cfg.archive or {"git": False}), "dir": args.archive})


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's or `kill`'s stop) ends the run like Ctrl-C: finished units stay
    committed, the archive is written and committed, workers are stopped. (Python's default
    would end the process at once, skipping that; a background job also ignores SIGINT.)"""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")
    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (e.g. an embedding application): leave it
        pass


def _evaluate_cmd(args, only=None, title="evaluate"):
    """``only``: None (everything), or cfg -> the set of attacks to run."""
    _stop_on_sigterm()
    from benchmark.run_config import load_run_config
    from benchmark.runner import evaluate
    cfg = load_run_config(args.config)
    _apply_archive_arg(cfg, args)
    if args.device:
        cfg.device, cfg.device_requested = args.device, args.device_requested
    else:
        from benchmark.run_config import check_device_available
        check_device_available(cfg.device_requested)
    preflight(cfg)
    only = only(cfg) if only is not None else None
    res = evaluate(cfg, progress=not args.quiet, only=only, workers=args.workers)
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
    _print_reliability(res["db"])
    print(f"\nresults database: {res['db']}")
    print(f"next: deqbench tables {cfg.run_dir}   deqbench figures {cfg.run_dir}"
          f"   deqbench leaderboard {args.config}")
    return cfg, res


def _print_reliability(db_path) -> None:
    """Console warnings for entries with non-finite outputs or many unconverged solves."""
    from benchmark.reliability import reliability_rows, thresholds, warnings_for
    from benchmark.results_db import ResultsDB
    with ResultsDB(db_path, create=False) as db:
        thr, share = thresholds(db.get_meta("config"))
        lines = warnings_for(reliability_rows(db.records_frame(), thr), thr, share)
    for line in lines:
        print(line, file=sys.stderr)


def preflight(cfg) -> None:
    """What can fail before anything is written: the output folder, every explicitly given
    checkpoint (readable, fits its model) and the test data -- so a bad input leaves no run
    folder behind."""
    import model_zoo
    from benchmark.data import load_dataset
    from benchmark.run_config import ConfigError
    out = Path(cfg.output)
    from benchmark.run_config import check_checkpoint_files
    for p in (out, cfg.run_dir):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{cfg.source}: output: {p} exists and is not a folder")
    try:
        check_checkpoint_files(cfg)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(f"{cfg.source}: {msg[len('run config: '):]}") from None
    for i, m in enumerate(cfg.models):
        if m.checkpoint:
            try:
                model_zoo.load(m.name, checkpoint=m.checkpoint, device="cpu", sha256=m.sha256)
            except (model_zoo.CheckpointError, ValueError) as e:
                raise ConfigError(f"{cfg.source}: models[{i}].checkpoint: {e}") from None
    load_dataset(cfg.data["dataset"], "test", root=cfg.data.get("root"))
    db = cfg.run_dir / "results.sqlite"
    if db.is_file():
        from benchmark.results_db import ResultsDB
        ResultsDB(db, create=False).close()  # a corrupt database: one line, how to recover


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
    _stop_on_sigterm()
    from benchmark.reports import leaderboard_from_db
    from benchmark.run_config import load_run_config
    from benchmark.runner import evaluate
    cfg = load_run_config(args.config)
    _apply_archive_arg(cfg, args)
    preflight(cfg)
    # a finished run only re-reads its database
    res = evaluate(cfg, progress=not args.quiet, workers=args.workers)
    if not res["complete"]:
        raise RuntimeError("the run is incomplete; run the same command again")
    _print_reliability(res["db"])
    paths = leaderboard_from_db(res["db"], root=args.root)
    folder = paths[0].parent
    print(f"{len(paths)} entries in {folder}/; rendered {folder}/leaderboard.md, .csv, .html")
    print((folder / "leaderboard.md").read_text())
    return 0


def cmd_tables(args):
    from benchmark.tables import main as tables_main
    return tables_main([args.run] + (["--out", args.out] if args.out else [])
                       + (["--bench", args.bench] if args.bench else []))


def cmd_gap(args):
    from benchmark.report.gap import main as gap_main
    return gap_main([args.reduced, args.full] + (["--out", args.out] if args.out else []))


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


def _pos_int(text: str) -> int:
    """argparse type of counts (batch sizes, repeats, rounds, shards, n): an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


DEVICE_HELP = "auto (default: CUDA when available, else CPU), cpu or cuda[:k]"


def _subset_args(p):
    p.add_argument("--first-n", action="store_true",
                   help="take the first N test images (published numbers usually are on the "
                        "first n) instead of a seeded random subset")


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
    bf.add_argument("--batch-size", type=_pos_int, default=32)
    bf.add_argument("--tf", default="1,2,4,8")
    bf.add_argument("--r", default="0,1,5,10,20")
    bf.add_argument("--preset", choices=["reference", "paper"], default="reference")
    bf.add_argument("--repeats", type=_pos_int, default=2)
    bf.add_argument("--device", default="auto", help=DEVICE_HELP)
    bf.add_argument("--output", default=None, help="write the rows as JSON here")
    bf.add_argument("--compare-old", action="store_true",
                    help="old vs new kernels of Sec. 3.2 (first --tf, first --r; --repeats = "
                         "interleaved rounds) and of Broyden's memory, in one process")
    bf.add_argument("--variants", default="headline", help="with --compare-old: headline, levers, inexact or all")
    bf.add_argument("--threads", type=int, default=None,
                    help="with --compare-old: torch threads (default: torch's, = the cores)")
    bf.add_argument("--inputs", choices=["test", "random"], default="test",
                    help="with --compare-old: the entry's test images or uniform noise")
    bf.set_defaults(func=cmd_bench_forward)

    tr = sub.add_parser("train", help="train a model from a YAML config (torchrun for DDP)")
    tr.add_argument("config")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT/NAME/last.pt")
    tr.add_argument("--device", default=None, help="auto, cpu or cuda[:k] (default: the "
                    "config's, whose default is auto: CUDA when available, else CPU)")
    tr.add_argument("--shards", type=_pos_int, default=1,
                    help="micro-batches per process (gradient accumulation)")
    tr.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS",
                    help="also save the resumable last.pt inside an epoch this often, so a "
                         "SIGKILL loses at most this much work (0: epoch ends and signals only)")
    tr.set_defaults(func=cmd_train)

    bt = bench.add_parser("train", help="training samples/s: PGD-AT / TRADES with and without Sec. 3.3")
    bt.add_argument("--config", required=True)
    bt.add_argument("--rounds", type=_pos_int, default=3)
    bt.add_argument("--batch-size", type=_pos_int, default=None)
    bt.add_argument("--device", default="auto", help=DEVICE_HELP)
    bt.add_argument("--output", default=None)
    bt.set_defaults(func=cmd_bench_train)

    ev = sub.add_parser("eval", help="clean evaluation of one model on a fixed test subset")
    ev.add_argument("--model", default=None, help="a registered model, or the name of one "
                    "from --model-factory/--model-file")
    _add_user_model_args(ev)
    ev.add_argument("--checkpoint", default=None)
    ev.add_argument("--defense", default=None, help="'final', 'early:7', 'entropy_reduction', ...")
    ev.add_argument("--dataset", default=None)
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--download", action="store_true",
                    help="let torchvision download a missing dataset (needs internet)")
    ev.add_argument("--n", type=int, default=500)
    _subset_args(ev)
    ev.add_argument("--batch-size", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.add_argument("--allow-untrained", action="store_true")
    ev.add_argument("--sha256", default=None, help="expected SHA-256 of --checkpoint (verified)")
    ev.add_argument("--residual-threshold", type=float, default=None,
                    help="final relative residual above which a solve counts as unconverged "
                         "(default 0.3, see model_zoo.scoring)")
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
        ep.add_argument("--device", default=None, help="override the config's device: " + DEVICE_HELP)
        ep.add_argument("--quiet", action="store_true")
        ep.add_argument("--workers", type=_workers_arg, default="auto", help=WORKERS_HELP)
        ep.add_argument("--archive", default=None, metavar="DIR",
                        help=ARCHIVE_HELP)
        ep.set_defaults(func=func)

    lb = sub.add_parser("leaderboard", help="evaluate a run config (if needed) and write its leaderboard")
    lb.add_argument("config")
    lb.add_argument("--root", default="leaderboards")
    lb.add_argument("--quiet", action="store_true")
    lb.add_argument("--workers", type=_workers_arg, default="auto", help=WORKERS_HELP)
    lb.add_argument("--archive", default=None, metavar="DIR", help=ARCHIVE_HELP)
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
    gp = sub.add_parser("gap", help="what a reduced protocol misses: paired, vs a run of the "
                                    "full grid / standard AutoAttack on common examples")
    gp.add_argument("reduced", help="the reduced run (folder or results.sqlite)")
    gp.add_argument("full", help="the full run (folder or results.sqlite)")
    gp.add_argument("--out", default=None, help="folder for gap.md / gap.json (default: FULL)")
    gp.set_defaults(func=cmd_gap)

    cl = sub.add_parser("claims", help="the paper's claims as verdicts: RUN/claims.md + .json")
    cl.add_argument("run", help="run folder (with results.sqlite) or the .sqlite file")
    cl.add_argument("--leaderboard", default=None, help="also copy claims.md/.json into this folder")
    cl.set_defaults(func=cmd_claims)
    ex = sub.add_parser("export", help="per-example table of a run: RUN/export.csv.gz")
    ex.add_argument("run", help="run folder (with results.sqlite) or the .sqlite file")
    ex.add_argument("--out", default=None, help="output file (default RUN/export.csv.gz)")
    ex.set_defaults(func=cmd_export)

    at = sub.add_parser("attack", help="attack one model/defense; per-example records (JSON)")
    at.add_argument("--model", default=None, help="a registered model, or the name of one "
                    "from --model-factory/--model-file")
    _add_user_model_args(at)
    at.add_argument("--checkpoint", default=None)
    at.add_argument("--defense", default=None, help="'final', 'early:7', 'entropy_reduction', ...")
    at.add_argument("--attack", default="pgd",
                    help="pgd | grid | autoattack | adaptive | torchattacks:NAME")
    at.add_argument("--surrogate", default=None,
                    help="gradient source: phantom_final (default), implicit_final, full_backprop, "
                         "ui:i,ka,lam[,preset]")
    at.add_argument("--eps", default=None,
                    help="a number or a fraction such as 8/255 (default: the model's threat model)")
    at.add_argument("--alpha", type=float, default=None, help="PGD step (default eps/4)")
    at.add_argument("--steps", type=int, default=10)
    at.add_argument("--mode", default="efficient", choices=["efficient", "full", "naive"])
    at.add_argument("--kas", default="1-9")
    at.add_argument("--lams", default="0.5,1")
    at.add_argument("--aa-attacks", default="apgd-ce,apgd-t,fab-t,square")
    at.add_argument("--aa-budget", nargs="*", metavar="KEY=INT",
                    help="reduced AutoAttack budget, e.g. apgd_n_iter=20 square_n_queries=500")
    at.add_argument("--ta-arg", nargs="*", metavar="KEY=VALUE",
                    help="torchattacks kwargs, typed: true/false, integers, floats, A/B, else "
                         "strings (e.g. steps=20 random_start=True alpha=2/255)")
    at.add_argument("--n", type=int, default=100)
    _subset_args(at)
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--batch-size", type=int, default=100)
    at.add_argument("--device", default="auto", help=DEVICE_HELP)
    at.add_argument("--sha256", default=None, help="expected SHA-256 of --checkpoint (verified)")
    at.add_argument("--dataset", default=None)
    at.add_argument("--data-root", default=None)
    at.add_argument("--download", action="store_true")
    at.add_argument("--allow-untrained", action="store_true")
    at.add_argument("--output", default=None)
    at.set_defaults(func=cmd_attack)

    bp = bench.add_parser("protocol", help="a run config's protocol on N examples: wall time and "
                          "f_theta evaluations per example and attack; --baseline REV compares "
                          "with another git revision, interleaved")
    bp.add_argument("config")
    bp.add_argument("--n", type=_pos_int, required=True, help="the config's first N examples")
    bp.add_argument("--baseline", default=None, help="git revision to compare with (a worktree)")
    bp.add_argument("--rounds", type=_pos_int, default=1, help="interleaved rounds (A B, B A, ...)")
    bp.add_argument("--workers", type=_workers_arg, default="auto", help=WORKERS_HELP)
    bp.add_argument("--attacks", default=None, help="comma-separated attacks sections to keep "
                    "(default: all of the config's)")
    bp.add_argument("--keep", default=None, help="folder for the runs (default: a temp folder)")
    bp.add_argument("--output", default=None, help="write the result as JSON")
    bp.set_defaults(func=cmd_bench_protocol)

    bg = bench.add_parser("grid", help="(i, Ka, lambda) grid worst case: efficient vs reference protocol")
    bg.add_argument("--model", default="deq_tiny_fmnist_pgdat")
    bg.add_argument("--checkpoint", default=None)
    bg.add_argument("--defense", default=None)
    bg.add_argument("--n", type=_pos_int, default=32)
    bg.add_argument("--seed", type=int, default=0)
    bg.add_argument("--modes", default="efficient,naive")
    bg.add_argument("--kas", default="1-9")
    bg.add_argument("--lams", default="0.5,1")
    bg.add_argument("--batch-size", type=_pos_int, default=100)
    bg.add_argument("--device", default="auto", help=DEVICE_HELP)
    bg.add_argument("--allow-untrained", action="store_true")
    bg.add_argument("--output", default=None)
    bg.set_defaults(func=cmd_bench_grid)
    return p


def _check_device_arg(args) -> None:
    """--device of every command: checked (syntax, and that CUDA exists when asked for) and
    'auto' resolved; the requested value is kept in ``args.device_requested``."""
    from benchmark.run_config import (ConfigError, check_device, check_device_available,
                                      resolve_device)
    dev = getattr(args, "device", None)
    if dev is None:
        return
    try:
        check_device_available(check_device(dev, "device"))
    except ConfigError as e:
        raise UsageError(_as_argument_error(e)) from None
    args.device_requested = dev
    if args.command not in ("eval", "attack"):  # those two resolve it in the validator
        args.device = resolve_device(dev)


def main(argv=None) -> int:
    """The command line. Exit codes: 0 success; 2 a bad input (configuration, argument, file,
    checkpoint, data, database: one line naming it, no traceback, nothing written); 1 an
    unexpected internal error (one line; DEQBENCH_TRACEBACK=1 shows the traceback)."""
    import os
    import sqlite3
    args = build_parser().parse_args(argv)
    from model_zoo.runtime import tune_allocator
    tune_allocator()  # same numbers, fewer page faults (model_zoo/runtime.py); DEQBENCH_MALLOC=default: off
    try:
        _check_device_arg(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("deqbench: stopped; finished work units are kept (and archived, with archive:); "
              "run the same command again to continue", file=sys.stderr)
        return 130
    except (ValueError, KeyError, RuntimeError, OSError, sqlite3.DatabaseError) as e:
        # Known user errors (ConfigError, InputError, DatasetError, CheckpointError,
        # ResultsDBError, UsageError, missing files ...): one clear line, no traceback.
        if os.environ.get("DEQBENCH_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in str(msg):
            msg = f"{e.filename}: {msg}"
        print(f"deqbench: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, and how to see the traceback
        if os.environ.get("DEQBENCH_TRACEBACK"):
            raise
        print(f"deqbench: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
              "(rerun with DEQBENCH_TRACEBACK=1 for the traceback, and please report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
