"""``top_settings``: the paper's Table 4 -- APGD-CE (and any other gradient attack of
``attacks``) with each of the ``k`` strongest grid settings of the run as its gradient, and
Square (black box: it only queries the reported forward, so once). Records
``'apgd-ce@ui(...)'`` and ``'square'``, every outcome judged on the reported forward; the
per-example worst case counts in ALL. Needs ``attacks.grid`` (planned after it)."""
from __future__ import annotations

import json
import time

import torch

from attacks.evaluation import (AA_STANDARD_BUDGET, FEvalMeter, _outcome, autoattack_attack,
                                rescore)
from attacks.surrogates import JudgedModule, UnrolledIntermediate
from benchmark.suite._common import outcome_records, parse_setting, plain
from benchmark.suite._registry import ProtocolAttack, check_int, config_error, register_attack
from benchmark.suite.autoattack import FIRST_MEMBER, MEMBER_KNOBS, check_autoattack_options


def _budget(opts) -> dict:
    full = dict(AA_STANDARD_BUDGET)
    full.update({k: int(v) for k, v in (opts.get("budget") or {}).items()})
    return full


def reuses_first_member(ctx, sur, aa_attacks) -> bool:
    """Whether Table 4 may reuse the AutoAttack unit's first member (``ctx`` = that unit): the
    run has top_settings on this entry with ``share_autoattack``, the member is one of its
    attacks, and the ensemble's gradient is a grid setting (Table 4 attacks only with those)."""
    t4 = ctx.cfg.attacks.get("top_settings")
    if t4 is None or not t4.get("share_autoattack", True) or not isinstance(
            sur, UnrolledIntermediate) or not aa_attacks:
        return False
    spec = TopSettings()
    names = t4.get("attacks", spec.options["attacks"])
    return aa_attacks[0] in names and aa_attacks[0] != "square" and spec.applicable(
        ctx.model, ctx.defense, t4)


def shared_first(ctx, name: str, setting: str, budget: dict):
    """(x_adv, AutoAttack unit config) where this entry's AutoAttack unit ran ``name`` as its
    first member -- alone, on every clean-correct point -- with ``setting`` as its gradient,
    the same eps and the budget knobs ``name`` reads; else None. The same attack as Table 4's
    ``name@setting`` up to the seed (the AutoAttack unit's)."""
    want = parse_setting(setting).config()
    for conf, xs in ctx.db.adversarial(ctx.mkey, ctx.dkey, "autoattack", FIRST_MEMBER, ctx.idx):
        c = conf.get("attack") if isinstance(conf.get("attack"), dict) else conf
        knobs = c.get("budget_knobs") or {}
        if (all(int(e) in xs for e in ctx.idx) and (c.get("attacks") or [None])[0] == name
                and c.get("surrogate") == want and c.get("eps") == ctx.eps
                and c.get("norm") == "Linf"
                and c.get("reported") == json.loads(json.dumps(
                    None if ctx.defense is None else ctx.defense.config()))
                and all(knobs.get(k) == budget[k] for k in MEMBER_KNOBS.get(name, ()))):
            return torch.stack([xs[int(e)] for e in ctx.idx]), c
    return None


def _shared_outcome(ctx, judged, name, xa, conf):
    """The outcome of the AutoAttack member's examples ``xa``, judged here on the reported
    forward (which also checks the eps-ball); clean-misclassified points (the ensemble's
    'clean' records) stay wrong."""
    t0 = time.perf_counter()
    x, y = ctx.x, ctx.y
    xa = xa.to(x.device, x.dtype)
    rows = ctx.db.conn.execute(
        "SELECT example, extra FROM records WHERE model = ? AND defense = ? AND attack = "
        f"'autoattack' AND setting = 'ensemble' AND example IN ({','.join('?' * len(ctx.idx))})",
        (ctx.mkey, ctx.dkey, *ctx.idx)).fetchall()
    clean_wrong = {int(e) for e, ex in rows
                   if "clean" in (json.loads(ex or "{}").get("broken_by") or [])}
    meter = FEvalMeter(judged.model, len(x))
    correct, margin = rescore(judged, xa, x, y, ctx.eps, meter, batch_size=ctx.cfg.batch_size)
    cc = torch.tensor([int(e) not in clean_wrong for e in ctx.idx], device=correct.device)
    correct = correct & cc
    broken_by = [[] if c else (["clean"] if not k else [name])
                 for c, k in zip(correct.tolist(), cc.tolist())]
    return _outcome(name, xa, correct, margin, broken_by, meter,
                    {**conf, "attacks": [name], "from": "autoattack"}, t0)


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
               "on_test_time_defenses": False, "share_autoattack": True}
    order = 45  # after autoattack (40): its first member's examples (share_autoattack)
    reads_all_shards = True
    reads = ("grid", "autoattack")

    def check(self, opts, cfg, attacks):
        if "share_autoattack" in opts and not isinstance(opts["share_autoattack"], bool):
            config_error("attacks.top_settings.share_autoattack",
                         f"must be true or false, got {opts['share_autoattack']!r}")
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
        budget = _budget(ctx.opts)
        for name in names:
            for st in (settings[:1] if name == "square" else settings):
                judged = JudgedModule(ctx.model, ctx.defense, parse_setting(st))
                shared = shared_first(ctx, name, st, budget) \
                    if name != "square" and ctx.opt("share_autoattack") else None
                if shared is not None:
                    out = _shared_outcome(ctx, judged, name, *shared)
                else:
                    out = autoattack_attack(judged, ctx.x, ctx.y, ctx.eps, attacks=[name],
                                            budget=ctx.opt("budget"), seed=ctx.seed,
                                            batch_size=ctx.cfg.batch_size,
                                            progress=ctx.progress)
                label = name if name == "square" else f"{name}@{st}"
                new = outcome_records(out, ctx.idx, ctx.y, label, ctx.state, ctx.model,
                                      ctx.defense, ctx.x)
                if shared is not None:
                    for r in new:
                        r["extra"]["from"] = "autoattack"
                recs += new
                confs[label] = out.config
        first = next(iter(confs.values()))
        return recs, {"attack": "top_settings", "settings": settings, "attacks": names,
                      "budget": first.get("budget"), "budget_knobs": first.get("budget_knobs"),
                      "runs": confs}
