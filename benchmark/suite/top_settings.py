"""``top_settings``: the paper's Table 4 -- APGD-CE (and any other gradient attack of
``attacks``) with each of the ``k`` strongest grid settings of the run as its gradient, and
Square (black box: it only queries the reported forward, so once). Records
``'apgd-ce@ui(...)'`` and ``'square'``, every outcome judged on the reported forward; the
per-example worst case counts in ALL. Needs ``attacks.grid`` (planned after it)."""
from __future__ import annotations

from attacks.evaluation import autoattack_attack
from attacks.surrogates import JudgedModule
from benchmark.suite._common import outcome_records, parse_setting, plain
from benchmark.suite._registry import ProtocolAttack, check_int, config_error, register_attack
from benchmark.suite.autoattack import check_autoattack_options


def top_settings(db, mkey, dkey, k: int) -> list:
    """The ``k`` grid settings that broke the most examples of the run (ties by name). Every
    unit waits for its entry's grid units of every shard (``reads_all_shards``: the runner's
    unit dependencies and plan order), so all shards of a run get the same settings, whatever
    the unit order or number of workers (under torchrun: those of the rank's own shards)."""
    rows = db.conn.execute(
        "SELECT setting, SUM(1 - correct) AS broken FROM records WHERE model = ? AND defense = ? "
        "AND attack = 'grid' AND setting != 'worst' "
        "GROUP BY setting ORDER BY broken DESC, setting LIMIT ?", (mkey, dkey, k)).fetchall()
    return [r[0] for r in rows]


@register_attack("top_settings")
class TopSettings(ProtocolAttack):
    options = {"k": 3, "attacks": ["apgd-ce", "square"], "budget": None,
               "on_test_time_defenses": False}
    order = 30
    reads_all_shards = True
    reads = ("grid",)

    def check(self, opts, cfg, attacks):
        if "grid" not in attacks:
            config_error("attacks.top_settings", "needs attacks.grid (its top settings are the grid's)")
        if "k" in opts:
            check_int(opts, "k", 1, "attacks.top_settings.")
        check_autoattack_options("top_settings", opts)

    def applicable(self, model, defense, opts):
        return getattr(model, "is_deq", False) and (
            plain(defense) or opts.get("on_test_time_defenses", False))

    def run(self, ctx):
        names = ctx.opt("attacks")
        settings = top_settings(ctx.db, ctx.mkey, ctx.dkey, ctx.opt("k"))
        if not settings:
            raise ValueError(f"attacks.top_settings needs the grid's per-setting records of "
                             f"{ctx.mkey} [{ctx.dkey}]: add attacks.grid to the run")
        recs, confs = [], {}
        for name in names:
            for st in (settings[:1] if name == "square" else settings):
                judged = JudgedModule(ctx.model, ctx.defense, parse_setting(st))
                out = autoattack_attack(judged, ctx.x, ctx.y, ctx.eps, attacks=[name],
                                        budget=ctx.opt("budget"), seed=ctx.seed,
                                        batch_size=ctx.cfg.batch_size, progress=ctx.progress)
                label = name if name == "square" else f"{name}@{st}"
                recs += outcome_records(out, ctx.idx, ctx.y, label, ctx.state, ctx.model,
                                        ctx.defense, ctx.x)
                confs[label] = out.config
        first = next(iter(confs.values()))
        return recs, {"attack": "top_settings", "settings": settings, "attacks": names,
                      "budget": first.get("budget"), "budget_knobs": first.get("budget_knobs"),
                      "runs": confs}
