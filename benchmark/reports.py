"""From a run's results database to leaderboard entries (``deqbench leaderboard``).

Every number comes from the per-example records (:func:`benchmark.runner.summarize`); budget
labels come from the attack configurations stored with each work unit.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import model_zoo
from benchmark.leaderboard import make_entry, render, write_entry
from benchmark.results_db import ResultsDB
from benchmark.runner import flags_from_records, summarize
from benchmark.suite.strength import strength_flag

__all__ = ["leaderboard_from_db", "entry_name"]


def entry_name(model: str, defense: str) -> str:
    """'deq_tiny_fmnist_pgdat' + 'early:select' -> 'deq_tiny_fmnist_pgdat+early-select'."""
    if defense in ("final", None):
        return model
    if defense.startswith("{"):
        d = json.loads(defense)
        defense = d.get("name", "defense") + "-" + "-".join(f"{k}{v}" for k, v in sorted(d.items())
                                                           if k != "name" and not isinstance(v, dict))
    return model + "+" + re.sub(r"[^A-Za-z0-9._-]+", "-", defense).strip("-")


def _budget(db: ResultsDB, model: str, defense: str) -> dict:
    knobs, level = {}, "standard"
    for (conf,) in db.conn.execute("SELECT config FROM units WHERE model = ? AND defense = ?",
                                   (model, defense)):
        c = json.loads(conf or "{}").get("attack") or {}
        if c.get("budget") == "reduced":
            level = "reduced"
            from attacks.evaluation import AA_STANDARD_BUDGET
            if c.get("attack") == "adaptive":  # the adaptive protocol's own knobs (pgd_steps too)
                from attacks.adaptive import ADAPTIVE_STANDARD_BUDGET
                knobs.update({f"adaptive.{k}": v for k, v in (c.get("budget_knobs") or {}).items()
                              if ADAPTIVE_STANDARD_BUDGET.get(k) != v})
            else:
                knobs.update({f"autoattack.{k}": v
                              for k, v in (c.get("budget_knobs") or {}).items()
                              if AA_STANDARD_BUDGET.get(k) != v})
        if c.get("attack") == "grid":
            knobs["grid.settings"] = len(c.get("settings", []))
            knobs["grid.mode"] = c.get("mode")
    cfg = db.get_meta("config") or {}
    grid = (cfg.get("attacks") or {}).get("grid")
    if grid is not None and len(grid.get("kas", range(1, 10))) * len(grid.get("lams", (0.5, 1))) < 18:
        level = "reduced"
    return {"level": level, "knobs": knobs}


def leaderboard_from_db(db_path, root="leaderboards", render_files: bool = True) -> list:
    """Write one entry per (model, defense) of the run into ``root/<dataset>-Linf/`` and render
    the folder. Returns the written paths."""
    with ResultsDB(db_path) as db:
        summary = summarize(db)
        cfg = db.get_meta("config") or {}
        ds = db.get_meta("dataset") or {}
        prov = db.get_meta("provenance") or {}
        records = db.records_frame()
        from benchmark.reliability import reliability_flags, reliability_rows, thresholds
        rel_thresholds = thresholds(cfg)
        rel = reliability_rows(records, rel_thresholds[0])
        paths = []
        for _, r in summary.iterrows():
            entry = model_zoo.get_entry(_base_name(cfg, r["model"]))
            aa = r.get("autoattack")
            aa_missing = aa is None or aa != aa
            if aa_missing:  # no AutoAttack on this entry: RobustBench's field holds ALL, labelled
                aa = r["ALL"]
            state = r.get("state")
            mom = r.get("min_over_means")
            deq = {"defense": r["defense"], "evaluated_state": state,
                   "f_evals_per_forward": float(r.get("f_evals_per_forward") or 0.0),
                   "budget": _budget(db, r["model"], r["defense"]),
                   "data_source": f"{ds.get('name')} test subset n={ds.get('n')} seed {ds.get('seed')}",
                   "commit": prov.get("git_commit", "unknown"), "n_examples": int(r["n"])}
            if aa_missing:
                deq["budget"]["level"] = "reduced"
                deq["budget"]["knobs"]["autoattack"] = "not run (autoattack_acc = ALL)"
            params = _defense_params(db, r["model"], r["defense"])
            if params is not None:
                deq["defense_params"] = params
            grid = r.get("grid")
            if grid is not None and grid == grid:  # NaN: the grid did not run on this pair
                deq["grid_worst_case_acc"] = float(grid)
            if mom is not None and mom == mom:
                deq["min_over_means_acc"] = float(mom)
            g = records[(records.model == r["model"]) & (records.defense == r["defense"])]
            deq["outcomes"] = _outcomes_field(g)
            flags = {k: v for k, v in (flags_from_records(g) or {}).items() if isinstance(v, dict)}
            # non-finite outputs / unconverged solves (benchmark.reliability): always present,
            # raised when any example is non-finite or too many are unconverged
            flags.update(reliability_flags(rel[(r["model"], r["defense"])], *rel_thresholds))
            # the binarization attack-strength test (benchmark/suite/strength.py), where it ran
            strength = strength_flag(g)
            if strength is not None and strength["flag"] is not None:
                flags["attack_strength"] = strength
            if flags:
                deq["flags"] = flags
            ttd = _test_time_defense(db, r["model"], r["defense"])
            if ttd is not None:
                deq["test_time_defense"] = ttd
            ident = _identity(db, cfg, r["model"], entry)
            deq["checkpoint"], deq["weights_sha256"] = ident["checkpoint"], ident["sha256"]
            meta = ident["metadata"]
            e = make_entry(_entry_name(ident["name"], r["defense"], entry),
                           clean_acc=float(r["clean"]),
                           autoattack_acc=float(aa), worst_case_acc=float(r["ALL"]),
                           dataset=ds.get("name") or entry.dataset, threat="Linf",
                           eps=float(cfg["threat"]["eps"]), architecture=entry.architecture,
                           number_forward_passes=1, deq=deq, venue=entry.venue or "",
                           authors=meta.get("authors") or "", link=meta.get("link") or "",
                           reported=meta.get("reported"),
                           unreliable=ttd is not None and not ttd["reliable"],
                           footnote=f"deqbench run {cfg.get('name')}; {ident['footnote']}"
                                    + ("; AutoAttack not run on this entry: autoattack_acc is "
                                       "the worst case of the attacks run" if aa_missing else ""))
            _check_identity(Path(root), e, entry)
            paths.append(write_entry(e, root))
    if paths:
        prune_stale_entries(paths[0].parent, cfg.get("name"), keep=paths)
    if render_files and paths:
        render(paths[0].parent)
        # the paper's claims as verdicts, beside the run's database and in the leaderboard folder
        from benchmark.report.claims import write_claims
        write_claims(db_path, leaderboard=paths[0].parent)
    return paths


def _test_time_defense(db: ResultsDB, model: str, defense: str):
    """``deq.test_time_defense`` of a Sec. 3.2 (EntropyReduction) entry from its ``adaptive``
    units (attacks.adaptive): the variants run on every shard, each member's budget label,
    ``complete`` / ``reliable`` (every variant at the standard budget on every shard); None
    for entries that are not test-time defenses."""
    from attacks.adaptive import ADAPTIVE_VARIANTS
    ttd, seen = False, []
    for attack, conf in db.conn.execute(
            "SELECT attack, config FROM units WHERE model = ? AND defense = ?", (model, defense)):
        c = json.loads(conf or "{}")
        if (c.get("defense") or {}).get("name") == "entropy_reduction":
            ttd = True
        if attack == "adaptive" and not c.get("skipped"):
            seen.append(c.get("attack") or {})
    if not ttd:
        return None
    runs = [c for c in seen if c.get("protocol") == "croce2022"]
    if not runs:
        return {"protocol": "croce2022", "variants_run": [], "variants_missing":
                list(ADAPTIVE_VARIANTS), "members": {}, "budget": "not run", "complete": False,
                "reliable": False}
    variants = [v for v in ADAPTIVE_VARIANTS if all(v in c.get("variants", []) for c in runs)]
    members = {}
    for c in runs:
        for name, m in (c.get("members") or {}).items():
            if members.get(name) != "reduced":
                members[name] = m.get("budget", "reduced")
    complete = variants == list(ADAPTIVE_VARIANTS)
    standard = all(c.get("budget") == "standard" for c in runs)
    return {"protocol": "croce2022", "variants_run": variants,
            "variants_missing": [v for v in ADAPTIVE_VARIANTS if v not in variants],
            "members": members, "budget": "standard" if standard else "reduced",
            "budget_knobs": runs[0].get("budget_knobs"), "complete": complete,
            "reliable": complete and standard and all(c.get("reliable") for c in runs)}


def _outcomes_field(g) -> dict:
    """``deq.outcomes``: the entry's per-example 0/1 vectors (clean, each attack family, ALL) as
    strings over the dataset indices, so the leaderboard can draw paired tests between entries
    without the database (:func:`benchmark.leaderboard.paired_sections`)."""
    from benchmark.report.outcomes import entry_outcomes
    o = entry_outcomes(g)
    out = {"examples": [int(i) for i in o.index]}
    for col in o.columns:
        out[str(col)] = "".join(str(int(v)) for v in o[col])
    return out


def prune_stale_entries(folder, run_name, keep) -> list:
    """Remove the entries of ``folder`` that an earlier version of the run ``run_name`` wrote
    (their footnote names the run) and that this version no longer has (a model or defense was
    dropped from the config), so the rendered leaderboard never shows numbers no longer backed
    by the run's database. Entries of other runs are left alone. Returns the removed paths."""
    keep = {Path(p).resolve() for p in keep}
    prefix = f"deqbench run {run_name};"
    removed = []
    for p in sorted(Path(folder).glob("*.json")):
        if p.resolve() in keep:
            continue
        try:
            foot = json.loads(p.read_text()).get("footnote") or ""
        except (OSError, ValueError):
            continue
        if run_name and foot.startswith(prefix):
            p.unlink()
            removed.append(p)
    return removed


def _defense_params(db: ResultsDB, model: str, defense: str):
    """The reported forward's resolved parameters as stored with the attack units (e.g. the
    early state chosen on validation data, the entropy reduction's eps/beta/R/Tf), without its
    name; None for a non-DEQ (no defense object)."""
    for (conf,) in db.conn.execute("SELECT config FROM units WHERE model = ? AND defense = ? "
                                   "ORDER BY unit_id", (model, defense)):
        d = json.loads(conf or "{}").get("defense")
        if isinstance(d, dict):
            return {k: v for k, v in d.items() if k != "name"}
    return None


def _identity(db: ResultsDB, cfg: dict, key: str, entry) -> dict:
    """What was evaluated under model key ``key``: the weights' SHA-256 and file, the entry's
    base name, a truthful footnote and the RobustBench metadata.

    A checkpoint other than the zoo entry's (different SHA-256) evaluated under the zoo name
    gets its own name, ``<name>-<first 8 hex digits>``, so it never replaces the zoo model's
    entry; its training is "not stated" unless the config says (user models)."""
    spec = next((m for m in cfg.get("models", []) if (m.get("label") or m["name"]) == key), {})
    sha = (db.get_meta("weights") or {}).get(key)
    if spec.get("checkpoint"):
        ckpt = str(spec["checkpoint"])
    elif entry.checkpoint_path() is not None:
        p = entry.checkpoint_path()
        # relative to the repository (not the working directory: the committed leaderboard
        # must render the same from anywhere)
        try:
            ckpt = str(Path(p).resolve().relative_to(Path(model_zoo.__file__).resolve()
                                                     .parent.parent))
        except ValueError:
            ckpt = str(p)
    else:
        ckpt = "factory" if entry.extra.get("weights") == "factory" else "none (untrained)"
    user = bool(entry.extra.get("user_model"))
    zoo_weights = bool(entry.sha256) and sha == entry.sha256
    name = key
    if user or zoo_weights:
        training = entry.training
    elif entry.sha256 is None and not spec.get("checkpoint"):
        training = "untrained"
    else:
        training = "not stated (not the zoo's checkpoint)"
        if not spec.get("label") and entry.sha256:
            name = f"{key}-{(sha or 'unknown')[:8]}"
    short = (sha or "unknown")[:12]
    foot = f"weights {Path(ckpt).name if ckpt not in ('factory',) else 'built by the factory'}" \
           f" (sha256 {short}); training: {training}"
    if entry.paper:
        foot += f"; paper: {entry.paper}"
    meta = {k: entry.extra.get(k) for k in ("authors", "link", "reported")}
    return {"name": name, "sha256": sha if isinstance(sha, str) and len(sha) == 64 else None,
            "checkpoint": ckpt, "footnote": foot, "metadata": meta}


def _entry_name(name: str, defense: str, entry) -> str:
    """The model's own default forward (a user DEQ's, e.g. torchdeq's h(z*)) is its plain name."""
    from benchmark.run_config import defense_text
    from model_zoo.forward import make_defense
    if defense == defense_text(entry.defense):
        return name
    try:
        same = make_defense(json.loads(defense) if defense.startswith("{") else defense).config() \
            == make_defense(entry.defense).config()
    except (ValueError, TypeError):
        same = False
    return name if same else entry_name(name, defense)


def _check_identity(root: Path, new: dict, entry) -> None:
    """Refuse to replace an entry of other weights under the same name (a name is one model):
    allowed only when the new weights are the registered zoo weights of that name."""
    path = root / f"{new['dataset']}-{new.get('threat_model', 'Linf')}" / f"{new['name']}.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    old_sha = (old.get("deq") or {}).get("weights_sha256")
    new_sha = new["deq"].get("weights_sha256")
    if old_sha and new_sha and old_sha != new_sha and new_sha != entry.sha256:
        raise ValueError(
            f"{path} is the entry of {new['name']} with weights "
            f"{(old.get('deq') or {}).get('checkpoint')} (sha256 {old_sha[:12]}); this run "
            f"evaluated other weights, {new['deq'].get('checkpoint')} (sha256 {new_sha[:12]}), "
            "under the same name: give the model its own name (label:) or remove the old entry")


def _base_name(cfg: dict, key: str) -> str:
    for m in cfg.get("models", []):
        if (m.get("label") or m["name"]) == key:
            return m["name"]
    return key
