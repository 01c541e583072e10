"""``transfer``: black-box transfer between the run's entries (the paper's Table 3). Per source
(model, defense) -- default: every entry of the run -- PGD with each of ``surrogates`` crafts
adversarial examples against the source's own reported forward; each target's reported forward
is judged on them. A point counts robust for a source only if the target classifies it
correctly clean and under every surrogate's example (the minimum over the attacks); the summary
takes the per-example worst case over sources. Planned last, after the sources' grids."""
from __future__ import annotations

import json

import torch

from attacks.evaluation import FEvalMeter, derive_seed, pgd_attack, rescore, setting_name
from attacks.pgd import check_linf_ball
from attacks.surrogates import JudgedModule
from benchmark.run_config import defense_text, parse_source
from benchmark.suite._common import surrogate_for
from benchmark.suite._registry import ProtocolAttack, config_error, register_attack
from model_zoo.scoring import score_logits


def transfer_sources(cfg) -> list:
    """The 'MODEL@DEFENSE' sources of ``cfg``'s transfer attack (default: every entry)."""
    opts = cfg.attacks.get("transfer", {})
    return opts.get("sources") or [f"{m.key}@{defense_text(d)}" for m in cfg.models
                                   for d in m.defenses]


def pgd_serves_transfer(ctx, pgd_surrogate: str) -> bool:
    """Whether the PGD unit ``ctx`` (gradient ``pgd_surrogate``) should keep its adversarial
    examples for transfer (:func:`stored_pgd`): its entry is a transfer source and transfer
    would run the same gradient there -- a surrogate spec it names, or for 'strongest' a source
    without a grid setting (a non-DEQ, or a DEQ whose grid does not run: a Sec. 3.2 entry,
    whose 'strongest' is the phantom gradient)."""
    cfg = ctx.cfg
    opts = cfg.attacks.get("transfer")
    if opts is None or opts.get("reuse_pgd", True) is False:
        return False
    if not any(m.key == ctx.mkey and defense_text(d) == ctx.dkey
               for m, d in (parse_source(s, cfg) for s in transfer_sources(cfg))):
        return False
    surs = opts.get("surrogates", ["strongest"])
    if not ctx.is_deq:
        return "strongest" in surs
    if pgd_surrogate in surs:
        return True
    from benchmark.suite._registry import get_attack
    grid_runs = "grid" in cfg.attacks and get_attack("grid").applicable(
        ctx.model, ctx.defense, cfg.attacks["grid"])
    return "strongest" in surs and not grid_runs and pgd_surrogate == "phantom_final"


def stored_pgd(db, mkey, dkey, judged, eps, alpha, steps, idx):
    """The source's own ``pgd`` examples for ``idx`` where that unit ran the attack transfer
    would run -- PGD-``steps`` at ``eps`` / ``alpha`` from a random start, early stopping
    judged every step on the same reported forward, with the same gradient -- else None. The
    only difference is the seed of the random start (the PGD unit's instead of transfer's own):
    one PGD run serves both the source's PGD column and the examples it transfers."""
    want = {"attack": "pgd", "norm": "Linf", "eps": eps, "alpha": alpha, "steps": steps,
            "random_start": True, "early_stop": True, "check": "every_step",
            **json.loads(json.dumps(judged.config()))}
    for conf, xs in db.adversarial(mkey, dkey, "pgd", "pgd", idx):
        c = conf.get("attack") if isinstance(conf.get("attack"), dict) else conf
        if all(int(e) in xs for e in idx) and {k: c.get(k) for k in want} == want:
            return torch.stack([xs[int(e)] for e in idx])
    return None


def craft_transfer(db, cfg, ms, ds, resolve, opts, x, y, idx) -> list:
    """Adversarial examples crafted against source (model ms, defense ds) on these examples:
    PGD with each surrogate of ``opts['surrogates']`` ('strongest' = the source's strongest grid
    setting on these examples when its grid ran, else the phantom gradient at the final state),
    judged on the source's own reported forward. Where the source's ``pgd`` unit ran that very
    attack (:func:`stored_pgd`: e.g. the phantom gradient of a Sec. 3.2 source, or a non-DEQ
    source) its examples are reused instead of crafted again. Returns [(surrogate name,
    x_adv, reused from the source's pgd unit)]."""
    src_model, src_def = resolve(ms, ds)
    dkey = defense_text(ds)
    eps, alpha = cfg.eps, opts.get("alpha", cfg.eps / 4)
    steps = opts.get("steps", 10)
    out, seen = [], set()
    for spec in opts.get("surrogates", ["strongest"]):
        sur = surrogate_for(db, src_model, ms.key, dkey, idx, spec)
        name = setting_name(sur) if sur is not None else "model"
        if name in seen:
            continue
        seen.add(name)
        judged = JudgedModule(src_model, src_def, sur)
        xa = stored_pgd(db, ms.key, dkey, judged, eps, alpha, steps, idx) \
            if opts.get("reuse_pgd", True) else None
        reused = xa is not None
        if xa is None:
            xa = pgd_attack(judged, x, y, eps, alpha, steps,
                            seed=derive_seed(cfg.seed, "transfer", ms.key, dkey, name, idx[0]),
                            batch_size=cfg.batch_size).x_adv
        else:
            xa = xa.to(x.device, x.dtype)
            check_linf_ball(xa, x, eps)
        out.append((name, xa, reused))
    return out


@register_attack("transfer")
class Transfer(ProtocolAttack):
    options = {"sources": None, "targets": None, "steps": 10, "alpha": lambda ctx: ctx.eps / 4,
               "surrogates": ["strongest"], "reuse_pgd": True}
    order = 70
    reads_all_models = True  # the sources' strongest grid settings (runner: unit dependencies)
    pinned = True            # its cache of crafted examples serves every target: one worker
    # the sources' grids (strongest settings) and PGD units (their examples, stored_pgd): it
    # need not wait for their AutoAttack
    reads = ("grid", "pgd")

    def check(self, opts, cfg, attacks):
        if "reuse_pgd" in opts and not isinstance(opts["reuse_pgd"], bool):
            config_error("attacks.transfer.reuse_pgd",
                         f"must be true or false, got {opts['reuse_pgd']!r}")
        for k in ("sources", "targets"):
            v = opts.get(k)
            if v is not None and (not isinstance(v, list) or not v):
                config_error(f"attacks.transfer.{k}",
                             f"must be a non-empty list of 'MODEL@DEFENSE', got {v!r}")
            for spec in v or []:
                parse_source(spec, cfg)
        surs = opts.get("surrogates", ["strongest"])
        if not isinstance(surs, list) or not surs:
            config_error("attacks.transfer.surrogates", f"must be a non-empty list, got {surs!r}")
        from attacks.surrogates import make_surrogate
        for sp in surs:
            if sp != "strongest":
                try:
                    make_surrogate(sp)
                except ValueError as e:
                    config_error("attacks.transfer.surrogates", str(e))

    def planned(self, cfg, model_spec, defense_spec, opts):
        targets = opts.get("targets")
        if not targets:
            return True
        return (model_spec.key, defense_text(defense_spec)) in {
            (ms.key, defense_text(ds)) for ms, ds in (parse_source(t, cfg) for t in targets)}

    def run(self, ctx):
        cfg, x, y, idx, cache = ctx.cfg, ctx.x, ctx.y, ctx.idx, ctx.cache
        judged = JudgedModule(ctx.model, ctx.defense)
        with torch.no_grad():
            clean = score_logits(judged.reported_logits(x), y)[0]  # non-finite: wrong
        recs = []
        for spec in transfer_sources(cfg):
            ms, ds = parse_source(spec, cfg)
            key = (ms.key, defense_text(ds), idx[0])
            if key not in cache:
                cache[key] = craft_transfer(ctx.db, cfg, ms, ds, ctx.resolve, ctx.opts, x, y, idx)
            correct = clean.clone()
            margin = torch.full((len(x),), float("inf"), device=x.device)
            meter = FEvalMeter(ctx.model, len(x))  # the target's f-evaluations on these examples
            for _name, xa, _reused in cache[key]:
                c, m = rescore(judged, xa, x, y, cfg.eps, meter, batch_size=cfg.batch_size)
                correct &= c
                margin = torch.minimum(margin, m.to(margin.dtype))
            nf = meter.total  # crafting cost is the source's, not counted here
            for k in range(len(idx)):
                recs.append({"setting": f"{ms.key}@{defense_text(ds)}", "example": idx[k],
                             "label": int(y[k]), "correct": int(correct[k]),
                             "margin": float(margin[k]), "state": ctx.state,
                             "nfev_nograd": float(nf[k]), "nfev_grad": 0.0,
                             "extra": {"surrogates": [n for n, _, _ in cache[key]],
                                       "from_pgd": [n for n, _, r in cache[key] if r]}})
        return recs, {"attack": "transfer", "sources": transfer_sources(cfg),
                      "surrogates": ctx.opt("surrogates"), "steps": ctx.opt("steps"),
                      "alpha": ctx.opt("alpha"), "eps": ctx.eps, "seed": cfg.seed}
