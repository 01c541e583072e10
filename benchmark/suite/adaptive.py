"""``adaptive``: the adaptive protocol for the Sec. 3.2 test-time defense (``EntropyReduction``)
after Croce et al. (ICML 2022), :func:`attacks.adaptive.adaptive_protocol`: the per-example
worst case over (1) ``transfer`` -- the undefended entry's protocol attacks (PGD with its
strongest grid setting, APGD-CE, APGD-T with that gradient) judged -- early stopping and best
iterate included -- on the DEFENDED forward; (2) ``through`` -- APGD-CE / APGD-T with the full
gradient through the defense (inner input updates differentiated, the (i, Ka, lambda) unrolled
surrogate on the segment solves, a straight-through estimator for the reference preset's
``sign``); (3) ``cheap`` -- the same with a cheaper defense (fewer R) as gradient model, judged
on the full one; (4) ``objectives`` -- APGD-DLR and a targeted low-entropy APGD-T (targeted
cross-entropy); (5) ``square`` on the defended forward.

Options: ``steps`` / ``alpha`` (the transfer PGD), ``budget`` (apgd_n_iter, apgd_n_restarts,
apgd_t_n_target_classes, square_n_queries; default AutoAttack's standard ones -- any change is
labelled 'reduced'), ``variants`` (default all five), ``ka`` / ``lam`` (the unrolled surrogate
on the solves; default the strongest grid setting's), ``cheap`` ({r, tf}), ``checkpoint``,
``ensemble`` (each member only on the points still robust: cheaper, no per-member accuracy),
``surrogate`` (the transfer gradient; 'strongest' = the undefended entry's strongest grid
setting on these examples, else the phantom gradient).

Records: setting 'worst' (counts in ALL; with the defended dynamics' entropies) and one setting
per member ('transfer:apgd-ce', 'through:apgd-t', ..., extra.budget = its budget label). The
unit config records the variants run, the budgets, ``complete`` and ``reliable`` (every variant
at the standard budget). Runs only on EntropyReduction forwards of DEQs."""
from __future__ import annotations

from attacks.adaptive import ADAPTIVE_STANDARD_BUDGET, ADAPTIVE_VARIANTS, adaptive_protocol
from attacks.surrogates import PhantomFinal, UnrolledIntermediate, make_surrogate
from benchmark.suite._common import outcome_records, parse_setting, plain, strongest_setting
from benchmark.suite._registry import ProtocolAttack, check_int, config_error, register_attack

BUDGET_KEYS = tuple(k for k in ADAPTIVE_STANDARD_BUDGET if k != "pgd_steps")


def _undefended_key(ctx):
    """The run's defense key of the same model WITHOUT the test-time defense (its readout
    forward), or None when the run does not evaluate it."""
    from model_zoo.forward import make_defense
    from benchmark.run_config import defense_text
    want = ctx.defense.inner.config()
    for m in ctx.cfg.models:
        if m.key != ctx.mkey:
            continue
        for d in m.defenses:
            try:
                if make_defense(d).config() == want:
                    return defense_text(d)
            except ValueError:
                continue
    return None


def transfer_surrogate(ctx):
    """The undefended model's gradient for the transfer members: its strongest grid setting on
    these examples (then this defense's own grid, if it ran), else the phantom gradient."""
    spec = ctx.opt("surrogate")
    if spec != "strongest":
        return make_surrogate(spec)
    for dkey in (_undefended_key(ctx), ctx.dkey):
        if dkey is None:
            continue
        best = strongest_setting(ctx.db, ctx.mkey, dkey, ctx.idx)
        if best:
            return parse_setting(best)
    return PhantomFinal()


@register_attack("adaptive")
class Adaptive(ProtocolAttack):
    options = {"steps": 10, "alpha": lambda ctx: ctx.eps / 4, "ka": None, "lam": None,
               "budget": None, "variants": list(ADAPTIVE_VARIANTS), "cheap": None,
               "checkpoint": False, "ensemble": False, "surrogate": "strongest"}
    order = 50
    reads = ("grid",)  # transfer_surrogate: the undefended entry's strongest setting

    def check(self, opts, cfg, attacks):
        p = "attacks.adaptive."
        b = opts.get("budget")
        if b is not None:
            if not isinstance(b, dict):
                config_error(f"{p}budget", f"must be a mapping of {list(BUDGET_KEYS)}, got {b!r}")
            for k in b:
                if k not in BUDGET_KEYS:
                    config_error(f"{p}budget.{k}", f"unknown budget key (known: {list(BUDGET_KEYS)})")
                check_int(b, k, 1, f"{p}budget.")
        v = opts.get("variants", list(ADAPTIVE_VARIANTS))
        if not isinstance(v, list) or not v or any(x not in ADAPTIVE_VARIANTS for x in v):
            config_error(f"{p}variants", f"must be a non-empty list of {list(ADAPTIVE_VARIANTS)}, "
                                         f"got {v!r}")
        c = opts.get("cheap")
        if c is not None:
            if not isinstance(c, dict) or set(c) - {"r", "tf"}:
                config_error(f"{p}cheap", f"must be a mapping with keys r and/or tf, got {c!r}")
            for k in c:
                check_int(c, k, 0 if k == "r" else 1, f"{p}cheap.")
        for k in ("checkpoint", "ensemble"):
            if k in opts and not isinstance(opts[k], bool):
                config_error(f"{p}{k}", f"must be true or false, got {opts[k]!r}")

    def applicable(self, model, defense, opts):
        return getattr(model, "is_deq", False) and not plain(defense)

    def run(self, ctx):
        sur = transfer_surrogate(ctx)
        ka, lam = ctx.opt("ka"), ctx.opt("lam")
        if isinstance(sur, UnrolledIntermediate):  # the strongest setting's unroll on the solves
            ka = sur.ka if ka is None else ka
            lam = sur.lam if lam is None else lam
        budget = {**(ctx.opt("budget") or {}), "pgd_steps": ctx.opt("steps")}
        out = adaptive_protocol(ctx.model, ctx.defense, ctx.x, ctx.y, ctx.eps,
                                transfer_surrogate=sur, alpha=ctx.opt("alpha"), budget=budget,
                                variants=ctx.opt("variants"), ka=3 if ka is None else ka,
                                lam=0.5 if lam is None else lam, cheap=ctx.opt("cheap"),
                                checkpoint=ctx.opt("checkpoint"), seed=ctx.seed,
                                batch_size=ctx.cfg.batch_size, ensemble=ctx.opt("ensemble"),
                                progress=ctx.progress)
        recs = outcome_records(out, ctx.idx, ctx.y, "worst", ctx.state, ctx.model, ctx.defense,
                               ctx.x)
        for m in out.extra["members"]:
            attacked = m.extra.get("attacked")
            for k, r in enumerate(outcome_records(m, ctx.idx, ctx.y, m.name, ctx.state)):
                if attacked is not None and not bool(attacked[k]):
                    continue  # ensemble: already broken by an earlier member, not attacked
                r["extra"] = {**r["extra"], "budget": m.config["budget"],
                              "variant": m.config["variant"]}
                recs.append(r)
        return recs, out.config

    def summary(self, g, clean):
        a = g[(g.attack == "adaptive") & (g.setting == "worst")]
        if not len(a):
            return None, {}
        s = a.set_index("example").correct
        return s, {"adaptive": s.reindex(clean.index).fillna(0).mean()}
