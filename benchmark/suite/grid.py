"""``grid``: PGD with every (i, Ka, lambda) unrolled-intermediate gradient (the paper's Sec. 4,
Eq. 10) judged on the reported forward; records the per-example worst case ('worst') and each
setting's outcome with the reported forward's entropy at its adversarial example and at the
clean input (Eqs. 12-13, Tables 6-7). DEQs with plain forwards; test-time defenses only with
``on_test_time_defenses``.

Mode ``pruned`` (issue 16 goal 2) runs the full grid only where it is needed to choose and to
check the settings: once per (model, defense) entry, a calibration subset of ``calibration``
points of the entry's first shard gets every setting (mode 'full'); a greedy set cover
(:func:`set_cover`) chooses the settings that together break every point any setting broke
there; the choice is stored in the results database's meta (``grid_pruned/<model>|<defense>``)
so later shards, other worker processes and resumed runs reuse it. The entry's other points get
only the chosen settings (mode 'efficient', most effective first), except an audit subset of
``audit`` points (seeded, disjoint from the calibration) that gets every setting, the chosen
ones first (mode 'efficient': a point stops once broken, so the audit knows exactly whether the
chosen settings alone break it -- as they would in the pruned run -- and whether any setting
does). The audited miss rate (broken by the grid but not by the chosen settings) with its 95%
Clopper-Pearson interval is in each audit point's record and in the summary
(``grid_pruned_miss_rate``). Every point's 'worst' record is the worst case over every setting
that ran on it (the calibration points' full grid included)."""
from __future__ import annotations

import json
import random

from attacks.evaluation import derive_seed, grid_attack, setting_name
from attacks.surrogates import grid_settings
from benchmark.suite._common import outcome_records, plain
from benchmark.suite._registry import ProtocolAttack, check_int, config_error, register_attack

MODES = ("efficient", "full", "naive", "pruned")


def set_cover(broke: dict) -> list:
    """Greedy set cover: ``broke`` {setting name: set of points it broke} -> the settings, most
    effective first, that together break every point any of them broke. Each step takes the
    setting that breaks the most points not yet covered; ties go to the smaller name (so the
    choice is deterministic). Greedy is within ln(k) + 1 of the smallest cover, and the sets
    here are small (one per setting, <= calibration points), so an exact solver buys little."""
    left = set().union(*broke.values()) if broke else set()
    chosen = []
    while left:
        best = min(broke, key=lambda s: (-len(broke[s] & left), s))
        chosen.append(best)
        left -= broke[best]
    return chosen


def _meta_key(mkey: str, dkey: str) -> str:
    return f"grid_pruned/{mkey}|{dkey}"


@register_attack("grid")
class Grid(ProtocolAttack):
    options = {"steps": 10, "alpha": lambda ctx: ctx.eps / 4, "kas": range(1, 10),
               "lams": (0.5, 1.0), "mode": "efficient", "preset": "reference",
               "on_test_time_defenses": False, "calibration": 32, "audit": 16,
               # skip the solver's f(z[i]) that the unroll recomputes: the same iterates and
               # records, one f evaluation less per row and step (grid_attack(skip_last_f))
               "skip_last_f": True}
    order = 20
    reads = ()  # the pruned mode's calibration: first_shard_first

    def first_shard_first(self, opts):
        return opts.get("mode") == "pruned"   # the calibration is made on the first shard

    def check(self, opts, cfg, attacks):
        if opts.get("mode", "efficient") not in MODES:
            config_error("attacks.grid.mode",
                         f"must be efficient, full, naive or pruned, got {opts['mode']!r}")
        for key in ("calibration", "audit"):
            if key in opts:
                check_int(opts, key, 1, "attacks.grid.")
        if "skip_last_f" in opts and not isinstance(opts["skip_last_f"], bool):
            config_error("attacks.grid.skip_last_f",
                         f"must be true or false, got {opts['skip_last_f']!r}")
        shard = getattr(cfg, "shard_size", None)
        ncal = opts.get("calibration", self.options["calibration"])
        if opts.get("mode") == "pruned" and isinstance(shard, int) and ncal > shard:
            config_error("attacks.grid.calibration",
                         f"must be <= shard_size ({shard}): the calibration runs on the entry's "
                         f"first shard, got {ncal!r}")
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

    def _settings(self, ctx):
        return grid_settings(ctx.model.solver.max_iter, kas=ctx.opt("kas"),
                             lams=tuple(ctx.opt("lams")), preset=ctx.opt("preset"))

    def _grid(self, ctx, x, y, settings, mode, seed):
        return grid_attack(ctx.model, ctx.defense, x, y, ctx.eps, ctx.opt("alpha"),
                           ctx.opt("steps"), settings=settings, mode=mode, seed=seed,
                           batch_size=ctx.cfg.batch_size, progress=ctx.progress,
                           skip_last_f=ctx.opt("skip_last_f"))

    @staticmethod
    def _records(ctx, g, x, y, idx, extra=None):
        """The 'worst' record of every example (``extra`` added to its extra) and one record per
        (setting, example) that setting attacked."""
        recs = outcome_records(g.worst, idx, y, "worst", ctx.state, ctx.model, ctx.defense, x)
        if extra is not None:
            for r, e in zip(recs, extra):
                r["extra"]["grid_pruned"] = e
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
        return recs

    def run(self, ctx):
        if ctx.opt("mode") == "pruned":
            return self._run_pruned(ctx)
        y, idx = ctx.y, ctx.idx
        g = self._grid(ctx, ctx.x, y, self._settings(ctx), ctx.opt("mode"), ctx.seed)
        return self._records(ctx, g, ctx.x, y, idx), g.worst.config

    # -- mode 'pruned' ------------------------------------------------------------------------

    @staticmethod
    def _subsets(ctx):
        """(calibration, audit): dataset indices of the entry's calibration points (a seeded
        choice of ``calibration`` points of its first shard) and audit points (a seeded choice
        of ``audit`` of the other points). They depend only on the run seed, the entry and the
        run's examples, so every shard, worker and rank draws the same ones."""
        ds = ctx.db.get_meta("dataset")
        if not ds or "indices" not in ds:
            raise RuntimeError("grid mode 'pruned' needs the run's example indices "
                               "(results meta 'dataset'); run it through deqbench evaluate")
        order = [int(i) for i in ds["indices"]]
        first = order[:ctx.cfg.shard_size]
        rng = random.Random(derive_seed(ctx.cfg.seed, ctx.mkey, ctx.dkey, "grid", "pruned"))
        cal = sorted(rng.sample(first, min(ctx.opt("calibration"), len(first))))
        calset = set(cal)
        rest = [i for i in order if i not in calset]
        aud = sorted(rng.sample(rest, min(ctx.opt("audit"), len(rest))))
        return cal, aud, first

    def _calibrate(self, ctx, x, y, cal, settings):
        """Full grid on the calibration points -> (GridOutcome, meta dict with the chosen
        settings, the per-setting breaks and the calibration's f-equivalents)."""
        seed = derive_seed(ctx.cfg.seed, ctx.mkey, ctx.dkey, "grid", "calibration")
        g = self._grid(ctx, x, y, settings, "full", seed)
        attacked = [not (b == ["clean"]) for b in g.worst.broken_by]
        broke = {name: {cal[k] for k in range(len(cal))
                        if attacked[k] and int(g.per_setting[si, k]) == 0}
                 for si, name in enumerate(g.settings)}
        chosen = set_cover(broke)
        fallback = not chosen
        if fallback:
            # nothing broke on the calibration points: keep one setting (the first name) so the
            # pruned run still attacks; the audit measures what this misses
            chosen = [min(g.settings)]
        meta = {"chosen": chosen, "fallback": fallback, "calibration": cal, "seed": seed,
                "broken": sum(1 for k in range(len(cal)) if attacked[k] and not g.worst.correct[k]),
                "clean_correct": sum(attacked), "n": len(cal),
                "per_setting_broken": {s: len(v) for s, v in broke.items() if v},
                "f_equivalents_per_example": float(g.worst.f_equivalents.mean())}
        return g, meta

    def _run_pruned(self, ctx):
        from benchmark.report.stats import clopper_pearson
        y, idx = ctx.y, ctx.idx
        settings = self._settings(ctx)
        by_name = {setting_name(s): s for s in settings}
        cal, aud, first = self._subsets(ctx)
        key = _meta_key(ctx.mkey, ctx.dkey)
        meta = ctx.db.get_meta(key)
        reused = meta is not None
        pos = {ex: k for k, ex in enumerate(idx)}
        kc = [pos[i] for i in cal if i in pos]
        recs, groups = [], {}
        calibrated_here = False
        if kc:   # the first shard: the calibration points' full grid is also their record
            gc, fresh = self._calibrate(ctx, ctx.x[kc], y[kc], cal, settings)
            recs += self._records(ctx, gc, ctx.x[kc], y[kc], [idx[k] for k in kc],
                                  [{"role": "calibration"}] * len(kc))
            groups["calibration"] = gc
            if meta is None:
                meta, calibrated_here = fresh, True
            else:
                meta["rerun_agrees"] = fresh["chosen"] == meta["chosen"]
        elif meta is None:
            # a later shard that runs before the first one (another worker or rank): calibrate on
            # the first shard's points without recording them (the first shard's unit records
            # them, with the same seed and the same result)
            from benchmark.data import load_dataset, subset
            ds = load_dataset(ctx.cfg.data["dataset"], "test", root=ctx.cfg.data.get("root"))
            ds = subset(ds, min(ctx.cfg.data["n"], len(ds)), seed=ctx.cfg.data["seed"],
                        first_n=bool(ctx.cfg.data.get("first_n", False)))
            where = {int(i): k for k, i in enumerate(ds.indices)}
            rows = [where[i] for i in cal]
            _, meta = self._calibrate(ctx, ds.images[rows].to(ctx.x.device),
                                      ds.labels[rows].to(y.device), cal, settings)
            calibrated_here = True
        if calibrated_here:
            meta["audit"] = aud
            ctx.db.set_meta(key, {k: v for k, v in meta.items() if k != "rerun_agrees"})
        chosen = [by_name[c] for c in meta["chosen"]]
        others = [s for s in settings if setting_name(s) not in set(meta["chosen"])]
        audset = set(meta.get("audit", aud))
        ka = [k for k in range(len(idx)) if idx[k] in audset and k not in set(kc)]
        kr = [k for k in range(len(idx)) if k not in set(kc) and k not in set(ka)]
        audit = {"n": len(ka), "missed": 0, "broken_full": 0}
        if ka:
            ga = self._grid(ctx, ctx.x[ka], y[ka], chosen + others, "efficient",
                            derive_seed(ctx.seed, "audit"))
            nc, extra = len(chosen), []
            for k in range(len(ka)):
                attacked = ga.worst.broken_by[k] != ["clean"]
                full = attacked and not bool(ga.worst.correct[k])
                by_chosen = attacked and bool((ga.per_setting[:nc, k] == 0).any())
                extra.append({"role": "audit", "full_broke": full, "chosen_broke": by_chosen})
                audit["broken_full"] += int(full)
                audit["missed"] += int(full and not by_chosen)
            recs += self._records(ctx, ga, ctx.x[ka], y[ka], [idx[k] for k in ka], extra)
            groups["audit"] = ga
        if kr:
            gr = self._grid(ctx, ctx.x[kr], y[kr], chosen, "efficient", ctx.seed)
            recs += self._records(ctx, gr, ctx.x[kr], y[kr], [idx[k] for k in kr],
                                  [{"role": "pruned"}] * len(kr))
            groups["pruned"] = gr
        if audit["n"]:
            audit["miss_rate"] = audit["missed"] / audit["n"]
            audit["miss_ci95"] = list(clopper_pearson(audit["missed"], audit["n"]))
        config = dict(next(iter(groups.values())).worst.config)
        config.update(mode="pruned", seed=ctx.seed, settings=[s.config() for s in settings])
        config["pruned"] = {
            "chosen": meta["chosen"], "calibration_indices": meta["calibration"],
            "audit_indices": sorted(audset), "calibration_reused": reused,
            "calibrated_in_this_unit": calibrated_here,
            "calibration": {k: meta[k] for k in ("n", "clean_correct", "broken", "seed", "fallback",
                                                 "per_setting_broken",
                                                 "f_equivalents_per_example") if k in meta},
            "rerun_agrees": meta.get("rerun_agrees"),
            "points": {"calibration": len(kc), "audit": len(ka), "pruned": len(kr)},
            "audit": audit}
        return recs, config

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
        if len(a):
            row.update(_pruned_fields(a))
        return s, row


def _pruned_fields(worst) -> dict:
    """Mode 'pruned': from the 'worst' records' ``extra.grid_pruned`` -- the audited miss rate
    (points the grid broke but the chosen settings did not / audited points, and / audited points
    the grid broke) with 95% Clopper-Pearson intervals, the points per role and the grid's
    f-equivalents (nfev_nograd + 3 nfev_grad, the reference's F) per example. {} otherwise."""
    from benchmark.report.stats import clopper_pearson

    def role(e):
        e = json.loads(e) if isinstance(e, str) else e
        return (e or {}).get("grid_pruned") if isinstance(e, dict) else None
    info = worst.extra.map(role)
    if not info.notna().any():
        return {}
    aud = [r for r in info if r and r.get("role") == "audit"]
    n, missed = len(aud), sum(1 for r in aud if r["full_broke"] and not r["chosen_broke"])
    broken = sum(1 for r in aud if r["full_broke"])
    lo, hi = clopper_pearson(missed, n)
    blo, bhi = clopper_pearson(missed, broken)
    roles = [r.get("role") for r in info if r]
    f = worst.nfev_nograd.fillna(0) + 3 * worst.nfev_grad.fillna(0)
    return {"grid_pruned_audited": n, "grid_pruned_missed": missed,
            "grid_pruned_miss_rate": missed / n if n else float("nan"),
            "grid_pruned_miss_lo": lo, "grid_pruned_miss_hi": hi,
            "grid_pruned_audit_broken": broken,
            "grid_pruned_miss_rate_broken": missed / broken if broken else float("nan"),
            "grid_pruned_miss_broken_lo": blo, "grid_pruned_miss_broken_hi": bhi,
            "grid_pruned_calibration": roles.count("calibration"),
            "grid_pruned_points": roles.count("pruned"),
            "grid_f_equivalents": float(f.mean())}
