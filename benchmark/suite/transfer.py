"""``transfer``: black-box transfer between the run's entries (the paper's Table 3). Per source
(model, defense) -- default: every entry of the run -- PGD with each of ``surrogates`` crafts
adversarial examples against the source's own reported forward; each target's reported forward
is judged on them. A point counts robust for a source only if the target classifies it
correctly clean and under every surrogate's example (the minimum over the attacks); the summary
takes the per-example worst case over sources. Planned last, after the sources' grids."""
from __future__ import annotations

import torch

from attacks.evaluation import FEvalMeter, derive_seed, pgd_attack, rescore, setting_name
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


def craft_transfer(db, cfg, ms, ds, resolve, opts, x, y, idx) -> list:
    """Adversarial examples crafted against source (model ms, defense ds) on these examples:
    PGD with each surrogate of ``opts['surrogates']`` ('strongest' = the source's strongest grid
    setting on these examples when its grid ran, else the phantom gradient at the final state),
    judged on the source's own reported forward. Returns [(surrogate name, x_adv)]."""
    src_model, src_def = resolve(ms, ds)
    dkey = defense_text(ds)
    eps, alpha = cfg.eps, opts.get("alpha", cfg.eps / 4)
    out, seen = [], set()
    for spec in opts.get("surrogates", ["strongest"]):
        sur = surrogate_for(db, src_model, ms.key, dkey, idx, spec)
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


@register_attack("transfer")
class Transfer(ProtocolAttack):
    options = {"sources": None, "targets": None, "steps": 10, "alpha": lambda ctx: ctx.eps / 4,
               "surrogates": ["strongest"]}
    order = 70
    reads_all_models = True  # the sources' strongest grid settings (runner: unit dependencies)
    pinned = True            # its cache of crafted examples serves every target: one worker
    reads = ("grid",)        # only the sources' grids: it need not wait for their AutoAttack

    def check(self, opts, cfg, attacks):
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
            for _name, xa in cache[key]:
                c, m = rescore(judged, xa, x, y, cfg.eps, meter, batch_size=cfg.batch_size)
                correct &= c
                margin = torch.minimum(margin, m.to(margin.dtype))
            nf = meter.total  # crafting cost is the source's, not counted here
            for k in range(len(idx)):
                recs.append({"setting": f"{ms.key}@{defense_text(ds)}", "example": idx[k],
                             "label": int(y[k]), "correct": int(correct[k]),
                             "margin": float(margin[k]), "state": ctx.state,
                             "nfev_nograd": float(nf[k]), "nfev_grad": 0.0,
                             "extra": {"surrogates": [n for n, _ in cache[key]]}})
        return recs, {"attack": "transfer", "sources": transfer_sources(cfg),
                      "surrogates": ctx.opt("surrogates"), "steps": ctx.opt("steps"),
                      "alpha": ctx.opt("alpha"), "eps": ctx.eps, "seed": cfg.seed}
