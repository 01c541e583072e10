"""``clean``: the reported forward on the unperturbed inputs (always runs; every accuracy of the
summary is relative to it). DEQs record the per-state entropies H(z[t]) (the paper's Eq. 12),
relative residuals and f-evaluations; the Sec. 3.2 defense also the undefended entropies."""
from __future__ import annotations

import torch

from attacks.evaluation import reported_margin
from model_zoo.scoring import score_logits
from benchmark.suite._common import undefended_entropies
from benchmark.suite._registry import ProtocolAttack, register_attack


@register_attack("clean")
class Clean(ProtocolAttack):
    order = 0
    always = True

    def run(self, ctx):
        model, defense, x, y, idx = ctx.model, ctx.defense, ctx.x, ctx.y, ctx.idx
        recs = []
        with torch.no_grad():
            if ctx.is_deq:
                rec = model.run(x, defense=defense, per_state=True)
                logits = rec.logits
                correct = score_logits(logits, y)[0]  # a non-finite logit is wrong
                ent = rec.entropies
                und = undefended_entropies(model, defense, x)
                for k in range(len(y)):
                    recs.append({"setting": "-", "example": idx[k], "label": int(y[k]),
                                 "correct": int(correct[k]),
                                 "margin": float(reported_margin(logits[k:k + 1].float(),
                                                                 y[k:k + 1])[0]),
                                 "state": rec.readout, "entropies": ent[:, k].tolist(),
                                 "residuals": rec.trajectory.rel_trace[k].tolist(),
                                 "nfev_nograd": float(rec.nfev_nograd[k]),
                                 "nfev_grad": float(rec.nfev_grad[k]),
                                 "extra": None if und is None else
                                 {"entropies_undefended": und[:, k].tolist()}})
            else:
                logits = model(x)
                m = reported_margin(logits.float(), y)
                correct = score_logits(logits, y)[0]  # a non-finite logit is wrong
                for k in range(len(y)):
                    recs.append({"setting": "-", "example": idx[k], "label": int(y[k]),
                                 "correct": int(correct[k]), "margin": float(m[k]),
                                 "state": "output", "nfev_nograd": 0.0, "nfev_grad": 0.0})
        return recs, {}

    def summary(self, g, clean):
        # the base of every accuracy: summarize() reads n, clean, state and f-evals itself
        return clean, {}
