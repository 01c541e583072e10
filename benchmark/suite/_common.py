"""Helpers several protocol attacks share: records of an attack outcome (with the per-state
entropies, residuals and deviations of the DEQ's dynamics), the (i, Ka, lambda) setting names
and the strongest grid setting of a shard."""
from __future__ import annotations

from typing import Optional

import torch

from attacks.surrogates import PhantomFinal, UnrolledIntermediate, make_surrogate
from model_zoo.forward import EntropyReduction

__all__ = ["plain", "outcome_records", "state_deviation", "undefended_entropies",
           "parse_setting", "strongest_setting", "surrogate_for"]


def plain(defense) -> bool:
    """True unless ``defense`` is the Sec. 3.2 test-time defense (it optimizes its input)."""
    return not isinstance(defense, EntropyReduction)


def undefended_entropies(model, defense, x):
    """For the Sec. 3.2 test-time defense: H(z[t]) (N, B) of the same model WITHOUT it (its
    readout forward) on the same inputs -- the paper's Fig. 3 (b) compares the two. None for
    every other forward."""
    if not isinstance(defense, EntropyReduction):
        return None
    with torch.no_grad():
        return model.run(x, defense=defense.inner, per_state=True).entropies


def state_deviation(clean, perturbed) -> torch.Tensor:
    """(B, T) relative deviation ||z~[t] - z[t]||_2 / ||z[t]||_2 per example and state t = 1..T
    of two trajectories of the same batch (T = the shorter one's number of states)."""
    T = min(clean.num_states, perturbed.num_states)
    if T == 0:
        return torch.zeros(clean.best.shape[0], 0)
    z = torch.stack(clean.states[:T], 1).flatten(2).float()      # (B, T, D)
    zt = torch.stack(perturbed.states[:T], 1).flatten(2).float()
    return ((zt - z).norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-12)).cpu()


def outcome_records(out, idx, y, setting, state, model=None, defense=None, x=None):
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
        und = undefended_entropies(model, defense, out.x_adv.to(y.device))
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


def parse_setting(name: str) -> UnrolledIntermediate:
    """A grid setting's record name 'ui(i=3,ka=5,lam=0.5[,paper])' -> its surrogate."""
    body = name[name.index("(") + 1:-1].split(",")
    kv = dict(p.split("=") for p in body if "=" in p)
    return UnrolledIntermediate(int(kv["i"]), int(kv["ka"]), float(kv["lam"]),
                                "paper" if "paper" in body else "reference")


def strongest_setting(db, mkey, dkey, idx) -> Optional[str]:
    """The grid setting that broke the most of these examples (None without grid records)."""
    rows = db.conn.execute(
        "SELECT setting, SUM(1 - correct) AS broken FROM records WHERE model = ? AND defense = ? "
        f"AND attack = 'grid' AND setting != 'worst' AND example IN ({','.join('?' * len(idx))}) "
        "GROUP BY setting ORDER BY broken DESC, setting LIMIT 1", (mkey, dkey, *idx)).fetchone()
    return None if rows is None or not rows[1] else rows[0]


def surrogate_for(db, model, mkey, dkey, idx, spec):
    """The gradient source of ``spec`` for a DEQ ('strongest' = the grid setting that broke the
    most of these examples, else the phantom gradient at the final state); None for non-DEQs."""
    if not getattr(model, "is_deq", False):
        return None
    if spec == "strongest":
        best = strongest_setting(db, mkey, dkey, idx)
        return parse_setting(best) if best else PhantomFinal()
    return make_surrogate(spec)
