"""``grid``: PGD with every (i, Ka, lambda) unrolled-intermediate gradient (the paper's Sec. 4,
Eq. 10) judged on the reported forward; records the per-example worst case ('worst') and each
setting's outcome with the reported forward's entropy at its adversarial example and at the
clean input (Eqs. 12-13, Tables 6-7). DEQs with plain forwards; test-time defenses only with
``on_test_time_defenses``."""
from __future__ import annotations

from attacks.evaluation import grid_attack
from attacks.surrogates import grid_settings
from benchmark.suite._common import outcome_records, plain
from benchmark.suite._registry import ProtocolAttack, config_error, register_attack

MODES = ("efficient", "full", "naive")


@register_attack("grid")
class Grid(ProtocolAttack):
    options = {"steps": 10, "alpha": lambda ctx: ctx.eps / 4, "kas": range(1, 10),
               "lams": (0.5, 1.0), "mode": "efficient", "preset": "reference",
               "on_test_time_defenses": False}
    order = 20

    def check(self, opts, cfg, attacks):
        if opts.get("mode", "efficient") not in MODES:
            config_error("attacks.grid.mode", f"must be efficient, full or naive, got {opts['mode']!r}")
        for key in ("kas", "lams"):
            if key in opts and (not isinstance(opts[key], list) or not opts[key]):
                config_error(f"attacks.grid.{key}", f"must be a non-empty list, got {opts[key]!r}")
        for ka in opts.get("kas", []):
            if isinstance(ka, bool) or not isinstance(ka, int) or ka < 1:
                config_error("attacks.grid.kas", f"every Ka must be an integer >= 1, got {ka!r}")
        for lam in opts.get("lams", []):
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
                config_error("attacks.grid.lams", f"every lambda must be in (0, 1], got {lam!r}")

    def applicable(self, model, defense, opts):
        return getattr(model, "is_deq", False) and (
            plain(defense) or opts.get("on_test_time_defenses", False))

    def run(self, ctx):
        y, idx = ctx.y, ctx.idx
        settings = grid_settings(ctx.model.solver.max_iter, kas=ctx.opt("kas"),
                                 lams=tuple(ctx.opt("lams")), preset=ctx.opt("preset"))
        g = grid_attack(ctx.model, ctx.defense, ctx.x, y, ctx.eps, ctx.opt("alpha"),
                        ctx.opt("steps"), settings=settings, mode=ctx.opt("mode"), seed=ctx.seed,
                        batch_size=ctx.cfg.batch_size, progress=ctx.progress)
        recs = outcome_records(g.worst, idx, y, "worst", ctx.state, ctx.model, ctx.defense, ctx.x)
        for si, name in enumerate(g.settings):
            for k in range(len(idx)):
                v = int(g.per_setting[si, k])
                if v >= 0:
                    # H of the reported forward at this setting's adversarial example and at the
                    # clean input: Eqs. (12)-(13) per grid attack (Tables 6-7)
                    h = float(g.entropy[si, k])
                    recs.append({"setting": name, "example": idx[k], "label": int(y[k]),
                                 "correct": v, "state": ctx.state,
                                 "extra": None if h != h else
                                 {"H": round(h, 6), "H_clean": round(float(g.clean_entropy[k]), 6)}})
        return recs, g.worst.config

    def summary(self, g, clean):
        """'grid': the per-example worst case over the settings run (the 'worst' records);
        'min_over_means' / 'strongest_setting': the lowest per-setting accuracy and its
        setting, when every setting covered every example (mode full)."""
        a = g[(g.attack == "grid") & (g.setting == "worst")]
        s = a.set_index("example").correct if len(a) else None
        row = {} if s is None else {"grid": s.reindex(clean.index).fillna(0).mean()}
        per = g[(g.attack == "grid") & (g.setting != "worst")]
        if len(per):
            counts = per.groupby("setting").example.nunique()
            if (counts == clean.index.nunique()).all():
                means = per.groupby("setting").correct.mean()
                row["min_over_means"] = means.min()
                row["strongest_setting"] = means.idxmin()
        return s, row
