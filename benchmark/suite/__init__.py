"""The protocol attacks of ``deqbench evaluate``: one module per attack key, one interface, one
registry (timm-style). Today: clean, pgd, grid, top_settings, autoattack, adaptive, checks,
transfer. ``benchmark.runner`` plans and runs units by iterating :func:`list_attacks` and holds
no per-attack code; ``benchmark.run_config`` asks the registry which keys and options a config
may name (:func:`config_attacks`, :func:`attack_options`) and calls each attack's ``check``.

Adding an attack is one new file ``benchmark/suite/<key>.py`` (every module here whose name does
not start with ``_`` is imported on ``import benchmark.suite``)::

    from benchmark.suite._registry import ProtocolAttack, register_attack, config_error
    from benchmark.suite._common import outcome_records, plain

    @register_attack("strength")
    class Strength(ProtocolAttack):
        options = {"n": 20, "steps": 10, "alpha": lambda ctx: ctx.eps / 4}  # name -> default
        order = 65            # plan position: after the attacks whose records it reads
                              # (clean 0, pgd 10, grid 20, top_settings 30, autoattack 40,
                              #  adaptive 50, checks 60, transfer 70)
        reads = ("pgd", "autoattack")  # the keys whose records it reads: a parallel run
                              # waits only for those units (and clean); omitted = all earlier

        def check(self, opts, cfg, attacks):        # config validation beyond the generic
            if opts.get("n", 20) < 20:                # (names, steps, alpha, surrogate, flags)
                config_error("attacks.strength.n", f"must be >= 20, got {opts['n']!r}")

        def applicable(self, model, defense, opts):  # False: unit committed as skipped
            return getattr(model, "is_deq", False)

        def run(self, ctx):                          # ctx: UnitContext (below)
            ...
            return records, config                   # [dict per (setting, example)], JSON dict

        def summary(self, g, clean):                 # g: records of one (model, defense)
            return None, {"strength": rate}          # (per-example Series counted in ALL or
                                                     #  None, summary-row fields)

``UnitContext`` carries db (ResultsDB: read other attacks' records), cfg (RunConfig), model,
defense (the resolved forward; None for non-DEQs), mkey, dkey, attack, opts (the config's
options; ``ctx.opt(name)`` applies the defaults), x (B, C, H, W) in [0, 1], y (B,), idx
(dataset indices, the record keys), state ('final', 'z[i]', None), seed (derived from the unit:
results do not depend on which units ran before), progress, resolve(model_spec, defense_spec)
-> (model, defense) for other entries of the run, cache (a dict private to the key, alive for
the whole invocation). Records are judged on the reported forward (``JudgedModule``); the
generic keys per record are in ``benchmark.results_db.RECORD_FIELDS``.

Each attack's extra keys (``options``) must be ones the run config's generic validation
understands or that its own ``check`` validates; an unknown option is a config error naming
the key.
"""
from __future__ import annotations

import importlib
import pkgutil

from benchmark.suite._registry import (ProtocolAttack, UnitContext, attack_options,
                                       config_attacks, config_error, get_attack, list_attacks,
                                       register_attack)

__all__ = ["ProtocolAttack", "UnitContext", "register_attack", "get_attack", "list_attacks",
           "config_attacks", "attack_options", "config_error"]

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
