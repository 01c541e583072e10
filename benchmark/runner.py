"""``deqbench evaluate``: run the leaderboard protocol of a run config into the results database.

Protocol per (model, defense) -- the paper's Sec. 4, judged on the reported forward:
``clean`` (per-state entropies and residuals), ``pgd`` (ready-made PGD at the final state:
phantom gradient), ``grid`` (the (i, Ka, lambda) settings; DEQs with plain forwards, and test-time
defenses when ``on_test_time_defenses``), ``autoattack`` (with the strongest grid setting of the
shard as surrogate, else the phantom gradient), ``adaptive`` (BPDA / defended trajectory /
transfer, for EntropyReduction). The reported robust accuracy "ALL" is the per-example worst
case over everything run (:func:`summarize`).

Work is cut into units (model, defense, attack, shard of ``shard_size`` examples), each committed
atomically; a killed run restarted with the same command skips finished units. Under
``torchrun`` rank r takes shards r, r + W, ...; each rank writes ``results.rank<r>.sqlite`` and
rank 0 merges them into ``results.sqlite``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

import model_zoo
from attacks.evaluation import (FEvalMeter, adaptive_attacks, autoattack_attack, derive_seed,
                                grid_attack, obfuscation_flags, pgd_attack, pgd_attack_steps,
                                reported_margin, rescore, setting_name)
from attacks.surrogates import (JudgedModule, PhantomFinal, UnrolledIntermediate,
                                grid_settings, make_surrogate)
from benchmark.data import load_dataset, subset
from benchmark.provenance import provenance
from benchmark.results_db import ResultsDB, merge
from benchmark.run_config import RunConfig, defense_text, parse_source
from model_zoo.forward import EarlyState, EntropyReduction, make_defense

__all__ = ["evaluate", "summarize", "db_path", "defense_key"]


def defense_key(spec) -> str:
    return defense_text(spec)


def db_path(cfg: RunConfig, rank: int = 0, world: int = 1):
    return cfg.run_dir / ("results.sqlite" if world == 1 else f"results.rank{rank}.sqlite")


def _shards(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _plain(defense) -> bool:
    return not isinstance(defense, EntropyReduction)


def _resolve_defense(db: ResultsDB, cfg: RunConfig, model, spec, mkey: str, progress: bool):
    """The forward of ``spec``; ``early:select`` runs the paper's selection on the validation
    split once and stores the choice in the database (a resumed run reuses it)."""
    defense = make_defense(spec)
    inner = defense.inner if isinstance(defense, EntropyReduction) else defense
    if isinstance(inner, EarlyState) and inner.index == "select":
        key = f"early_select/{mkey}"
        got = db.get_meta(key)
        if got is None:
            from attacks.pgd import select_early_state
            val = load_dataset(cfg.data["dataset"], "val", root=cfg.data.get("root"))
            val = subset(val, min(cfg.data["val_n"], len(val)), seed=cfg.data["val_seed"])
            pgd = cfg.attacks.get("pgd", {})
            chosen = select_early_state(model, val.images.to(cfg.device), val.labels.to(cfg.device),
                                        cfg.eps, pgd.get("alpha", cfg.eps / 4),
                                        pgd.get("steps", 10), batch_size=cfg.batch_size,
                                        seed=cfg.seed)
            got = {"index": chosen.index, "selection": chosen.selection}
            db.set_meta(key, got)
        inner.resolve(got["index"], got["selection"])
    if isinstance(defense, EntropyReduction):
        # Purify within the run's eps with steps eps/4 unless the spec sets them (the
        # constructor's defaults are the reference's CIFAR-10 8/255 and 2/255).
        given = spec if isinstance(spec, dict) else {}
        if "eps" not in given:
            defense.eps = cfg.eps
        if "beta" not in given:
            defense.beta = cfg.eps / 4
    return defense


def _clean_records(model, defense, x, y, idx):
    recs = []
    with torch.no_grad():
        if getattr(model, "is_deq", False):
            rec = model.run(x, defense=defense, per_state=True)
            logits = rec.logits
            ent = rec.entropies
            und = _undefended_entropies(model, defense, x)
            for k in range(len(y)):
                recs.append({"setting": "-", "example": idx[k], "label": int(y[k]),
                             "correct": int(logits[k].argmax() == y[k]),
                             "margin": float(reported_margin(logits[k:k + 1].float(), y[k:k + 1])[0]),
                             "state": rec.readout, "entropies": ent[:, k].tolist(),
                             "residuals": rec.trajectory.rel_trace[k].tolist(),
                             "nfev_nograd": float(rec.nfev_nograd[k]),
                             "nfev_grad": float(rec.nfev_grad[k]),
                             "extra": None if und is None else
                             {"entropies_undefended": und[:, k].tolist()}})
        else:
            logits = model(x)
            m = reported_margin(logits.float(), y)
            for k in range(len(y)):
                recs.append({"setting": "-", "example": idx[k], "label": int(y[k]),
                             "correct": int(logits[k].argmax() == y[k]), "margin": float(m[k]),
                             "state": "output", "nfev_nograd": 0.0, "nfev_grad": 0.0})
    return recs


def _undefended_entropies(model, defense, x):
    """For the Sec. 3.2 test-time defense: H(z[t]) (N, B) of the same model WITHOUT it (its
    readout forward) on the same inputs -- the paper's Fig. 3 (b) compares the two. None for
    every other forward."""
    if not isinstance(defense, EntropyReduction):
        return None
    with torch.no_grad():
        return model.run(x, defense=defense.inner, per_state=True).entropies


def _outcome_records(out, idx, y, setting, state, model=None, defense=None, x=None):
    """Records of an attack outcome; for DEQs also the per-state entropies H(z[t]) and relative
    residuals of the (defended) dynamics at the final adversarial examples (Fig. 2, Tables 6-7)
    and, given the clean inputs ``x``, the relative deviation ||z~[t] - z[t]|| / ||z[t]|| of the
    perturbed from the clean dynamics at every state t (``extra.deviation``, Fig. 3c)."""
    ent = res = dev = None
    if model is not None and getattr(model, "is_deq", False) and len(idx):
        with torch.no_grad():
            rec = model.run(out.x_adv.to(y.device), defense=defense, per_state=True)
            if x is not None:
                dev = state_deviation(model.run(x.to(y.device), defense=defense).trajectory,
                                      rec.trajectory)
        ent, res = rec.entropies, rec.trajectory.rel_trace
        und = _undefended_entropies(model, defense, out.x_adv.to(y.device))
    else:
        und = None
    recs = []
    for k, r in enumerate(out.records(idx)):
        extra = {"broken_by": r["broken_by"]}
        if dev is not None:
            extra["deviation"] = [round(float(v), 7) for v in dev[k]]
        if und is not None:
            extra["entropies_undefended"] = und[:, k].tolist()
        recs.append({"setting": setting, "example": r["example"], "label": int(y[k]),
                     "correct": int(r["correct"]), "margin": r["margin"], "state": state,
                     "nfev_nograd": r["nfev_nograd"], "nfev_grad": r["nfev_grad"],
                     "entropies": None if ent is None else ent[:, k].tolist(),
                     "residuals": None if res is None else res[k].tolist(),
                     "extra": extra})
    return recs


def state_deviation(clean, perturbed) -> torch.Tensor:
    """(B, T) relative deviation ||z~[t] - z[t]||_2 / ||z[t]||_2 per example and state t = 1..T
    of two trajectories of the same batch (T = the shorter one's number of states)."""
    T = min(clean.num_states, perturbed.num_states)
    if T == 0:
        return torch.zeros(clean.best.shape[0], 0)
    z = torch.stack(clean.states[:T], 1).flatten(2).float()      # (B, T, D)
    zt = torch.stack(perturbed.states[:T], 1).flatten(2).float()
    return ((zt - z).norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-12)).cpu()


def _top_settings(db: ResultsDB, mkey, dkey, k: int) -> list:
    """The ``k`` grid settings that broke the most examples of the run (ties by name). Every
    grid unit precedes every top_settings unit in the plan, so all shards of a single-process
    run get the same settings (under torchrun: those of the rank's own shards)."""
    rows = db.conn.execute(
        "SELECT setting, SUM(1 - correct) AS broken FROM records WHERE model = ? AND defense = ? "
        "AND attack = 'grid' AND setting != 'worst' "
        "GROUP BY setting ORDER BY broken DESC, setting LIMIT ?", (mkey, dkey, k)).fetchall()
    return [r[0] for r in rows]


def _top_setting_records(db, cfg, model, defense, mkey, dkey, opts, x, y, idx, state, seed,
                         progress):
    """The paper's Table 4: APGD-CE (and any other gradient attack of ``opts['attacks']``) with
    each of the top-``k`` grid settings of these examples as its gradient, and Square (black
    box: it only queries the reported forward, so once); records ``'apgd-ce@ui(...)'``,
    ``'square'``. Every outcome is judged on the reported forward."""
    names = opts.get("attacks", ["apgd-ce", "square"])
    settings = _top_settings(db, mkey, dkey, opts.get("k", 3))
    if not settings:
        raise ValueError(f"attacks.top_settings needs the grid's per-setting records of {mkey} "
                         f"[{dkey}]: add attacks.grid to the run")
    recs, confs = [], {}
    for name in names:
        for st in (settings[:1] if name == "square" else settings):
            judged = JudgedModule(model, defense, _parse_setting(st))
            out = autoattack_attack(judged, x, y, cfg.eps, attacks=[name], budget=opts.get("budget"),
                                    seed=seed, batch_size=cfg.batch_size, progress=progress)
            label = name if name == "square" else f"{name}@{st}"
            recs += _outcome_records(out, idx, y, label, state, model, defense, x)
            confs[label] = out.config
    return recs, {"attack": "top_settings", "settings": settings, "attacks": names,
                  "budget": next(iter(confs.values())).get("budget"),
                  "budget_knobs": next(iter(confs.values())).get("budget_knobs"), "runs": confs}


def _strongest_setting(db: ResultsDB, mkey, dkey, idx) -> Optional[str]:
    """The grid setting that broke the most of these examples (None without grid records)."""
    rows = db.conn.execute(
        "SELECT setting, SUM(1 - correct) AS broken FROM records WHERE model = ? AND defense = ? "
        f"AND attack = 'grid' AND setting != 'worst' AND example IN ({','.join('?' * len(idx))}) "
        "GROUP BY setting ORDER BY broken DESC, setting LIMIT 1", (mkey, dkey, *idx)).fetchone()
    return None if rows is None or not rows[1] else rows[0]


def _parse_setting(name: str) -> UnrolledIntermediate:
    # 'ui(i=3,ka=5,lam=0.5[,paper])'
    body = name[name.index("(") + 1:-1].split(",")
    kv = dict(p.split("=") for p in body if "=" in p)
    return UnrolledIntermediate(int(kv["i"]), int(kv["ka"]), float(kv["lam"]),
                                "paper" if "paper" in body else "reference")


def _surrogate_for(db, model, mkey, dkey, idx, spec):
    """The gradient source of ``spec`` for a DEQ ('strongest' = the grid setting that broke the
    most of these examples, else the phantom gradient at the final state); None for non-DEQs."""
    if not getattr(model, "is_deq", False):
        return None
    if spec == "strongest":
        best = _strongest_setting(db, mkey, dkey, idx)
        return _parse_setting(best) if best else PhantomFinal()
    return make_surrogate(spec)


def _transfer_sources(cfg: RunConfig) -> list:
    opts = cfg.attacks.get("transfer", {})
    return opts.get("sources") or [f"{m.key}@{defense_text(d)}" for m in cfg.models
                                   for d in m.defenses]


def _craft_transfer(db, cfg, ms, ds, resolve, opts, x, y, idx) -> list:
    """Adversarial examples crafted against source (model ms, defense ds) on these examples:
    PGD with each surrogate of ``opts['surrogates']`` ('strongest' = the source's strongest grid
    setting on these examples when its grid ran, else the phantom gradient at the final state),
    judged on the source's own reported forward. Returns [(surrogate name, x_adv)]."""
    src_model, src_def = resolve(ms, ds)
    dkey = defense_key(ds)
    eps, alpha = cfg.eps, opts.get("alpha", cfg.eps / 4)
    out, seen = [], set()
    for spec in opts.get("surrogates", ["strongest"]):
        sur = _surrogate_for(db, src_model, ms.key, dkey, idx, spec)
        name = setting_name(sur) if sur is not None else "model"
        if name in seen:
            continue
        seen.add(name)
        o = pgd_attack(JudgedModule(src_model, src_def, sur), x, y, eps, alpha,
                       opts.get("steps", 10), seed=derive_seed(cfg.seed, "transfer", ms.key, dkey,
                                                                name, idx[0]),
                       batch_size=cfg.batch_size)
        out.append((name, o.x_adv))
    return out


def _transfer_records(db, cfg, model, defense, opts, x, y, idx, state, resolve, cache):
    """Per source: the target's reported forward on the source's adversarial examples; a point
    counts robust only if the target classifies it correctly clean and under every surrogate's
    example of that source (the paper's Table 3 reports the minimum over the attacks)."""
    judged = JudgedModule(model, defense)
    with torch.no_grad():
        clean = judged.reported_logits(x).argmax(-1) == y
    recs = []
    for spec in _transfer_sources(cfg):
        ms, ds = parse_source(spec, cfg)
        key = (ms.key, defense_key(ds), idx[0])
        if key not in cache:
            cache[key] = _craft_transfer(db, cfg, ms, ds, resolve, opts, x, y, idx)
        correct = clean.clone()
        margin = torch.full((len(x),), float("inf"), device=x.device)
        meter = FEvalMeter(model, len(x))  # the target's f-evaluations on this source's examples
        for _name, xa in cache[key]:
            c, m = rescore(judged, xa, x, y, cfg.eps, meter, batch_size=cfg.batch_size)
            correct &= c
            margin = torch.minimum(margin, m.to(margin.dtype))
        nf = meter.total  # crafting cost is the source's, not counted here
        for k in range(len(idx)):
            recs.append({"setting": f"{ms.key}@{defense_key(ds)}", "example": idx[k],
                         "label": int(y[k]), "correct": int(correct[k]),
                         "margin": float(margin[k]), "state": state,
                         "nfev_nograd": float(nf[k]), "nfev_grad": 0.0,
                         "extra": {"surrogates": [n for n, _ in cache[key]]}})
    return recs


def _check_records(db, cfg, model, defense, mkey, dkey, opts, x, y, idx, state, seed):
    """Per-example records behind the gradient-obfuscation indicators (attacks.evaluation.
    obfuscation_flags): PGD-k and PGD-2k (more iterations must not help the defense), Square
    (black-box must not beat white-box), PGD-2k at a large eps (accuracy should reach ~0) and,
    for DEQs, whether the surrogate agrees with the reported forward on the clean input.
    Settings: 'pgd{k}', 'pgd{2k}', 'square{q}' (these count in ALL), 'large_eps{e}' and
    'clean_agreement' (these do not)."""
    eps = cfg.eps
    steps, alpha = opts.get("steps", 10), opts.get("alpha", eps / 4)
    q = opts.get("square_queries", 1000)
    big = opts.get("large_eps", min(1.0, 5 * eps))
    sur = _surrogate_for(db, model, mkey, dkey, idx, opts.get("surrogate", "strongest"))
    judged = JudgedModule(model, defense, sur)
    bs = cfg.batch_size
    # PGD-k and PGD-2k share seed and start: one 2k-step run gives both (pgd_attack_steps)
    pgd = pgd_attack_steps(judged, x, y, eps, alpha, (steps, 2 * steps), seed=seed, batch_size=bs)
    outs = {
        f"pgd{steps}": pgd[steps],
        f"pgd{2 * steps}": pgd[2 * steps],
        f"square{q}": autoattack_attack(judged, x, y, eps, attacks=["square"],
                                        budget={"square_n_queries": q}, seed=seed, batch_size=bs),
        f"large_eps{big:g}": pgd_attack(judged, x, y, big, big / 4, 2 * steps, seed=seed,
                                        batch_size=bs, name="pgd_large_eps"),
    }
    recs = []
    for name, out in outs.items():
        recs += _outcome_records(out, idx, y, name, state)
    if sur is not None:
        with torch.no_grad():
            agree = (judged.reported_logits(x).argmax(-1)
                     == sur.logits(model, x).argmax(-1))
    else:
        agree = torch.ones(len(x), dtype=torch.bool)
    for k in range(len(idx)):
        recs.append({"setting": "clean_agreement", "example": idx[k], "label": int(y[k]),
                     "correct": int(agree[k]), "state": state})
    return recs, {"attack": "checks", "steps": steps, "alpha": alpha, "square_queries": q,
                  "large_eps": big, "eps": eps, "seed": seed, **judged.config()}


CHECKS_NOT_ATTACKS = ("large_eps", "clean_agreement")  # check records that are not eps-attacks


def flags_from_records(g) -> Optional[dict]:
    """The obfuscation flags of one (model, defense) from its 'checks' records (None without)."""
    c = g[g.attack == "checks"]
    if c.empty:
        return None
    acc = c.groupby("setting").correct.mean()
    clean = g[g.attack == "clean"].set_index("example").correct
    def robust(setting):  # robust accuracy over all examples (clean-wrong points count 0)
        s = c[c.setting == setting].set_index("example").correct
        return float((s.reindex(clean.index).fillna(0) * clean).mean())
    pgd = sorted((int(s[3:]), s) for s in acc.index if s.startswith("pgd"))
    white = {s: robust(s) for _, s in pgd}
    black = {s: robust(s) for s in acc.index if s.startswith("square")}
    large = [s for s in acc.index if s.startswith("large_eps")]
    return obfuscation_flags(white, black or None, {k: robust(s) for k, s in pgd},
                             large_eps=robust(large[0]) if large else None,
                             clean_agreement=float(acc["clean_agreement"])
                             if "clean_agreement" in acc.index else None)


def _run_unit(db, cfg, model, defense, mkey, dkey, attack, opts, x, y, idx, progress,
              resolve=None, cache=None):
    eps = cfg.eps
    is_deq = getattr(model, "is_deq", False)
    seed = derive_seed(cfg.seed, mkey, dkey, attack, idx[0])
    state = None
    if is_deq:
        inner = defense.inner if isinstance(defense, EntropyReduction) else defense
        state = "final" if not isinstance(inner, EarlyState) else f"z[{inner.index}]"
    alpha = opts.get("alpha", eps / 4)
    steps = opts.get("steps", 10)
    if attack == "clean":
        return _clean_records(model, defense, x, y, idx), {}
    if attack == "pgd":
        sur = make_surrogate(opts.get("surrogate", "phantom_final")) if is_deq else None
        out = pgd_attack(JudgedModule(model, defense, sur), x, y, eps, alpha, steps,
                         random_start=opts.get("random_start", True), seed=seed,
                         batch_size=cfg.batch_size)
        return _outcome_records(out, idx, y, setting_name(sur) if sur else "model", state,
                                model, defense, x), out.config
    if attack == "grid":
        settings = grid_settings(model.solver.max_iter, kas=opts.get("kas", range(1, 10)),
                                 lams=tuple(opts.get("lams", (0.5, 1.0))),
                                 preset=opts.get("preset", "reference"))
        g = grid_attack(model, defense, x, y, eps, alpha, steps, settings=settings,
                        mode=opts.get("mode", "efficient"), seed=seed, batch_size=cfg.batch_size,
                        progress=progress)
        recs = _outcome_records(g.worst, idx, y, "worst", state, model, defense, x)
        for si, name in enumerate(g.settings):
            for k in range(len(idx)):
                v = int(g.per_setting[si, k])
                if v >= 0:
                    # H of the reported forward at this setting's adversarial example and at the
                    # clean input: Eqs. (12)-(13) per grid attack (Tables 6-7)
                    h = float(g.entropy[si, k])
                    recs.append({"setting": name, "example": idx[k], "label": int(y[k]),
                                 "correct": v, "state": state,
                                 "extra": None if h != h else
                                 {"H": round(h, 6), "H_clean": round(float(g.clean_entropy[k]), 6)}})
        return recs, g.worst.config
    if attack == "autoattack":
        sur = _surrogate_for(db, model, mkey, dkey, idx, opts.get("surrogate", "strongest"))
        out = autoattack_attack(JudgedModule(model, defense, sur), x, y, eps,
                                attacks=opts.get("attacks", ("apgd-ce", "apgd-t", "fab-t", "square")),
                                budget=opts.get("budget"), seed=seed, batch_size=cfg.batch_size,
                                progress=progress)
        return _outcome_records(out, idx, y, "ensemble", state, model, defense, x), out.config
    if attack == "top_settings":
        return _top_setting_records(db, cfg, model, defense, mkey, dkey, opts, x, y, idx, state,
                                    seed, progress)
    if attack == "adaptive":
        out = adaptive_attacks(model, defense, x, y, eps, alpha, steps, seed=seed,
                               ka=opts.get("ka", 9), lam=opts.get("lam", 0.5),
                               batch_size=cfg.batch_size)
        return _outcome_records(out, idx, y, "worst", state, model, defense, x), out.config
    if attack == "checks":
        return _check_records(db, cfg, model, defense, mkey, dkey, opts, x, y, idx, state, seed)
    if attack == "transfer":
        recs = _transfer_records(db, cfg, model, defense, opts, x, y, idx, state, resolve,
                                 cache if cache is not None else {})
        return recs, {"attack": "transfer", "sources": _transfer_sources(cfg),
                      "surrogates": opts.get("surrogates", ["strongest"]),
                      "steps": opts.get("steps", 10), "alpha": alpha, "eps": eps, "seed": cfg.seed}
    raise ValueError(f"unknown attack {attack!r}")


def _applicable(attack, model, defense, opts) -> bool:
    is_deq = getattr(model, "is_deq", False)
    if attack == "grid":
        return is_deq and (_plain(defense) or opts.get("on_test_time_defenses", False))
    if attack == "adaptive":
        return is_deq and not _plain(defense)
    if attack == "top_settings":
        return is_deq and (_plain(defense) or opts.get("on_test_time_defenses", False))
    if attack in ("autoattack", "checks"):
        return _plain(defense) or opts.get("on_test_time_defenses", True)
    return True


ORDER = ("clean", "pgd", "grid", "top_settings", "autoattack", "adaptive", "checks", "transfer")


def evaluate(cfg: RunConfig, progress: bool = True, rank: Optional[int] = None,
             world: Optional[int] = None, stop_after_units: Optional[int] = None,
             only: Optional[set] = None) -> dict:
    """Run (or continue) the protocol of ``cfg``; returns ``{'db': path, 'units_run': k,
    'summary': DataFrame}``. ``stop_after_units`` (tests) returns after that many new units.
    ``only``: run just these attacks of the config (clean always runs): ``deqbench sweep`` is
    ``{'grid'}``, ``deqbench transfer`` is ``{'grid', 'transfer'}`` (the sources' strongest
    grid settings are needed first); the same database serves a later full ``evaluate``."""
    if only is not None:
        missing = set(only) - set(cfg.attacks)
        if missing:
            raise ValueError(f"the run config has no attacks.{sorted(missing)[0]} section")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    dist = world > 1 and torch.distributed.is_available() and "MASTER_ADDR" in os.environ
    if dist and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = db_path(cfg, rank, world)
    merged_path = cfg.run_dir / "results.sqlite"
    if world > 1 and merged_path.is_file():
        # Rank 0 merges into results.sqlite, skipping the units it already holds: it must not
        # hold results of another configuration (checked on every rank, before any barrier).
        with ResultsDB(merged_path) as merged_db:
            old = merged_db.get_meta("config_hash")
        if old is not None and old != cfg.hash():
            raise ValueError(f"{merged_path} holds results of a different configuration (hash "
                             f"{old} vs {cfg.hash()}); give the run a new name or delete "
                             f"{cfg.run_dir}")
    db = ResultsDB(path)
    old = db.get_meta("config_hash")
    if old is not None and old != cfg.hash():
        before = db.get_meta("weights") or {}
        changed = [k for k, v in cfg.weights().items() if k in before and before[k] != v]
        db.close()
        why = (f"the weights of {', '.join(changed)} changed since it ran (re-trained or "
               "re-published)" if changed else "a different configuration")
        raise ValueError(f"{path} holds results of {why} (hash {old} vs {cfg.hash()}); give "
                         f"the run a new name or delete {cfg.run_dir}")
    if old is None:
        db.set_meta("config", cfg.to_dict())
        db.set_meta("config_hash", cfg.hash())
        db.set_meta("weights", cfg.weights())
        db.set_meta("config_source", cfg.source)
        db.set_meta("seed", cfg.seed)
        db.set_meta("provenance", provenance(cfg.device))
        db.set_meta("start_time", time.time())
    db.set_meta(f"last_invocation/{rank}", provenance(cfg.device))
    ds = load_dataset(cfg.data["dataset"], "test", root=cfg.data.get("root"))
    ds = subset(ds, min(cfg.data["n"], len(ds)), seed=cfg.data["seed"])
    db.set_meta("dataset", {"name": ds.info.name, "split": "test", "n": len(ds),
                            "seed": cfg.data["seed"], "indices": [int(i) for i in ds.indices]})
    shards = [s for j, s in enumerate(_shards(len(ds), cfg.shard_size)) if j % world == rank]
    done = db.done_units()
    plan = []
    targets = None
    if "transfer" in cfg.attacks and cfg.attacks["transfer"].get("targets"):
        targets = {(ms.key, defense_key(ds)) for ms, ds in
                   (parse_source(t, cfg) for t in cfg.attacks["transfer"]["targets"])}
    # transfer units last: their sources' own attacks (the strongest grid setting) come first
    for attack in ORDER:
        if attack != "clean" and (attack not in cfg.attacks
                                  or (only is not None and attack not in only)):
            continue
        for m in cfg.models:
            for dspec in m.defenses:
                if attack == "transfer" and targets is not None \
                        and (m.key, defense_key(dspec)) not in targets:
                    continue
                for lo, hi in shards:
                    plan.append((m, dspec, attack, lo, hi))
    todo = [p for p in plan if f"{p[0].key}|{defense_key(p[1])}|{p[2]}|{p[3]}-{p[4]}" not in done]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=f"evaluate {cfg.name}")
    models, defenses, transfer_cache = {}, {}, {}

    def resolve(m, dspec):
        dkey = defense_key(dspec)
        if m.key not in models:
            models[m.key] = model_zoo.load(m.name, checkpoint=m.checkpoint, device=cfg.device)
        model = models[m.key]
        if (m.key, dkey) not in defenses:
            defenses[(m.key, dkey)] = (_resolve_defense(db, cfg, model, dspec, m.key, progress)
                                       if getattr(model, "is_deq", False) else None)
        return model, defenses[(m.key, dkey)]

    ran = 0
    for m, dspec, attack, lo, hi in todo:
        dkey = defense_key(dspec)
        uid = f"{m.key}|{dkey}|{attack}|{lo}-{hi}"
        model, defense = resolve(m, dspec)
        if not _applicable(attack, model, defense, cfg.attacks.get(attack, {})):
            db.commit_unit(uid, m.key, dkey, attack, f"{lo}-{hi}", [], 0.0, {"skipped": True}, rank)
        else:
            torch.manual_seed(derive_seed(cfg.seed, uid))
            x = ds.images[lo:hi].to(cfg.device)
            y = ds.labels[lo:hi].to(cfg.device)
            idx = [int(i) for i in ds.indices[lo:hi]]
            t0 = time.perf_counter()
            recs, conf = _run_unit(db, cfg, model, defense, m.key, dkey, attack,
                                   cfg.attacks.get(attack, {}), x, y, idx, progress,
                                   resolve=resolve, cache=transfer_cache)
            wall = time.perf_counter() - t0
            for r in recs:
                r["wall_s"] = wall / max(len(idx), 1)
            db.commit_unit(uid, m.key, dkey, attack, f"{lo}-{hi}", recs, wall,
                           {"attack": conf, "defense": None if defense is None else defense.config()},
                           rank)
        ran += 1
        if bar is not None:
            bar.update(1)
        if stop_after_units is not None and ran >= stop_after_units:
            break
    if bar is not None:
        bar.close()
    complete = len(db.done_units()) >= len(plan)
    if complete:
        db.set_meta("end_time", time.time())
    db.close()
    out_path = path
    if world > 1:
        if dist:
            torch.distributed.barrier()
        if rank == 0:
            out_path = cfg.run_dir / "results.sqlite"
            parts = [db_path(cfg, r, world) for r in range(world)]
            merge(out_path, parts)
            # complete only if every rank finished its shards (each sets end_time when done)
            ends = []
            for p in parts:
                with ResultsDB(p) as d:
                    ends.append(d.get_meta("end_time"))
            complete = all(e is not None for e in ends)
            if complete:
                with ResultsDB(out_path) as d:
                    d.set_meta("end_time", max(ends))
    result = {"db": out_path, "units_run": ran, "complete": complete}
    if rank == 0 and (world == 1 or dist):
        with ResultsDB(out_path) as d:
            result["summary"] = summarize(d)
    return result


def summarize(db: ResultsDB):
    """Per (model, defense): accuracies derived from the per-example records.

    clean; pgd; grid (per-example worst case over the grid settings run) and min_over_means
    (lowest per-setting accuracy, when every setting covered every example); autoattack;
    adaptive; ALL = per-example worst case over every attack record (a point counts as robust
    only if it is correct clean and under every attack); f-evals per clean forward."""
    import pandas as pd
    df = db.records_frame()
    rows = []
    if df.empty:
        return pd.DataFrame(rows)
    for (mk, dk), g in df.groupby(["model", "defense"], sort=False):
        clean = g[g.attack == "clean"]
        n = clean.example.nunique()
        row = {"model": mk, "defense": dk, "n": n,
               "clean": clean.correct.mean() if n else float("nan"),
               "state": clean.state.iloc[0] if n else None,
               "f_evals_per_forward": (clean.nfev_nograd + clean.nfev_grad).mean() if n else None}
        final = {"clean": clean.set_index("example").correct}
        ch = g[(g.attack == "checks") & ~g.setting.str.startswith(CHECKS_NOT_ATTACKS)]
        if len(ch):  # PGD-k, PGD-2k and Square of the obfuscation checks are attacks too
            final["checks"] = ch.groupby("example").correct.min()
            flags = flags_from_records(g)
            row["flags"] = ",".join(k for k, v in flags.items()
                                    if isinstance(v, dict) and v.get("flag")) or "none"
        top = g[g.attack == "top_settings"]
        if len(top):  # APGD-CE / Square at the top grid settings (Table 4): worst case
            s = top.groupby("example").correct.min()
            final["top_settings"] = s
            row["top_settings"] = s.reindex(clean.example).fillna(0).mean()
        tr = g[g.attack == "transfer"]
        if len(tr):  # the per-example worst case over the transfer sources
            s = tr.groupby("example").correct.min()
            final["transfer"] = s
            row["transfer"] = s.reindex(clean.example).fillna(0).mean()
        for att, setting in (("pgd", None), ("grid", "worst"), ("autoattack", "ensemble"),
                             ("adaptive", "worst")):
            a = g[g.attack == att]
            if setting is not None:
                a = a[a.setting == setting]
            if len(a):
                s = a.set_index("example").correct
                final[att] = s
                row[att] = s.reindex(clean.example).fillna(0).mean()
        grid = g[(g.attack == "grid") & (g.setting != "worst")]
        if len(grid):
            counts = grid.groupby("setting").example.nunique()
            if (counts == n).all():
                per = grid.groupby("setting").correct.mean()
                row["min_over_means"] = per.min()
                row["strongest_setting"] = per.idxmin()
        allc = pd.concat(final, axis=1).reindex(clean.example).fillna(0).min(axis=1)
        row["ALL"] = allc.mean()
        rows.append(row)
    return pd.DataFrame(rows)
