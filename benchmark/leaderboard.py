"""Leaderboards: RobustBench-format JSON entries -> Markdown, CSV and a self-contained HTML page.

A leaderboard is a folder ``leaderboards/<dataset>-<threat>/`` (e.g.
``leaderboards/fashion_mnist-Linf/``) holding one ``<entry name>.json`` per model, in
RobustBench's ``model_info`` format (``robustbench/leaderboard/template.py``; fields ``link``,
``name``, ``authors``, ``additional_data``, ``number_forward_passes``, ``dataset``, ``venue``,
``architecture``, ``eps``, ``clean_acc``, ``reported``, ``autoattack_acc`` and the optional
``external`` / ``footnote`` / ``unreliable``; accuracies are percent *strings* such as ``"89.12"``,
``eps`` a string such as ``"8/255"``), plus:

* ``threat_model``: ``"Linf"``, ``"L2"`` or ``"corruptions"`` (RobustBench keeps it only in the
  folder path; its readers ignore extra keys).
* ``deq``: the DEQ-specific record, see :data:`DEQ_FIELDS`.

The leaderboard sort key is RobustBench's: ``external`` when present, else ``autoattack_acc``
(``corruptions_acc`` for the corruptions threat model), descending.  :func:`make_entry` sets
``external`` to the per-example worst case over every attack run ("ALL") whenever that is lower
than AutoAttack, which is how RobustBench records a stronger external evaluation, so an entry
ranks by its most honest number.

``render(folder)`` writes ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.html`` next to
the entries; those three files are generated and must not be edited by hand::

    python -m benchmark.leaderboard render leaderboards/fashion_mnist-Linf

This module never imports robustbench (the project's single robustbench import point is
``model_zoo/compat.py``); the tests check that robustbench's own readers accept the files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

__all__ = [
    "THREATS", "REQUIRED_FIELDS", "DEQ_FIELDS", "COLUMNS", "FOOTNOTE",
    "CI_KEYS", "format_eps", "make_entry", "defense_words", "paired_sections", "validate_entry", "write_entry", "read_entries", "sort_key", "sort_entries",
    "table_rows", "render", "main",
]

THREATS = ("Linf", "L2", "corruptions")
#: Datasets whose Linf/L2 radii RobustBench writes as ``k/255``.
_X255_DATASETS = ("cifar10", "cifar100", "imagenet")

#: Fields every entry must have (RobustBench's model_info format), with the accepted JSON types.
#: The robust accuracy field is ``autoattack_acc``, or ``corruptions_acc`` for "corruptions".
REQUIRED_FIELDS = {
    "link": (str,),
    "name": (str,),
    "authors": (str,),
    "additional_data": (bool,),
    "number_forward_passes": (int,),
    "dataset": (str,),
    "venue": (str,),
    "architecture": (str,),
    "eps": (str, int, float, type(None)),   # RobustBench's own update_json writes a float
    "clean_acc": (str,),
}
#: Optional RobustBench fields and their JSON types. ``reported`` is the accuracy the source
#: (paper) reported, a percent string such as "73.27"; absent when the source reported none.
OPTIONAL_FIELDS = {"reported": (str, int, float)}

#: The keys allowed in ``entry["deq"]`` and what they hold (all optional).
DEQ_FIELDS = {
    "defense": "name of the defense (str)",
    "defense_params": "the defense's parameters (dict)",
    "evaluated_state": "the state the reported logits come from, e.g. 'final', 'z[7]' (str)",
    "f_evals_per_forward": "f_theta evaluations per forward pass (float >= 0)",
    "worst_case_acc": "per-example worst case over every attack run, 'ALL' (percent string)",
    "min_over_means_acc": "minimum over attacks of the mean accuracy (percent string)",
    "grid_worst_case_acc": "worst case over the attack-hyper-parameter grid (percent string)",
    "autoattack_acc": "duplicate of the top-level autoattack_acc (percent string)",
    "flags": "obfuscation indicators: name -> {'flag': bool, ...} (dict)",
    "budget": "{'level': 'standard' | 'reduced', 'knobs': {...}} (dict)",
    "data_source": "where the evaluated examples come from (str)",
    "commit": "git commit of the evaluation code (str)",
    "n_examples": "number of evaluated examples (int >= 1)",
    "checkpoint": "the weights file that was evaluated (str; 'factory' when user code built the "
                  "weights)",
    "weights_sha256": "SHA-256 of the evaluated weights: of the checkpoint file, else of the "
                      "state_dict (64 hex digits); with the name and defense, the entry's identity",
    "counts": "robust (correct) examples out of n_examples per accuracy: {'clean': k, 'ALL': k, "
              "'autoattack': k, ...} (filled by make_entry when n_examples is given)",
    "ci95": "exact 95% Clopper-Pearson interval per accuracy, percent: {'clean': [lo, hi], "
            "'ALL': [lo, hi], ...} (filled by make_entry when n_examples is given)",
    "outcomes": "per-example 0/1 outcomes for paired tests: {'examples': [dataset index, ...], "
                "'clean': '0110...', 'ALL': '...', '<attack family>': '...'} (str)",
    "test_time_defense": "a test-time defense's adaptive evaluation (attacks.adaptive, Croce et "
                         "al. 2022): {'protocol', 'variants_run': [...], 'variants_missing': [...], "
                         "'members': {name: 'standard'|'reduced'}, 'budget', 'complete', "
                         "'reliable'} (dict); such entries have their own section, 'external' = "
                         "the worst case, and 'unreliable': true unless 'reliable'",
}
#: flags that are not obfuscation checks (always computed, or a separate test): an entry whose
#: flags hold only these was not checked for gradient obfuscation
NOT_OBFUSCATION_FLAGS = ("nonfinite", "unconverged", "attack_strength")
#: ``deq.counts`` / ``deq.ci95`` key -> the accuracy it belongs to (top-level field or deq field)
CI_KEYS = {"clean": "clean_acc", "autoattack": "autoattack_acc", "ALL": "worst_case_acc",
           "min_over_means": "min_over_means_acc", "grid": "grid_worst_case_acc"}
_DEQ_PERCENT_FIELDS = ("worst_case_acc", "min_over_means_acc", "grid_worst_case_acc",
                       "autoattack_acc")
_BUDGET_LEVELS = ("standard", "reduced")

#: (key, header) of the rendered table, in order.  ``key`` is the HTML ``data-col`` value and the
#: sort key accepted in the page's ``#sort=<key>&dir=asc|desc``; ``header`` is the Markdown/CSV
#: column name.
COLUMNS = (
    ("rank", "rank"),
    ("model", "model"),
    ("architecture", "architecture"),
    ("clean", "clean"),
    ("autoattack", "AutoAttack"),
    ("worst_case", "worst case (ALL)"),
    ("min_over_means", "min-over-means"),
    ("f_evals", "f-evals/forward"),
    ("evaluated_state", "evaluated state"),
    ("defense", "defense"),
    ("budget", "budget"),
    ("flags", "flags"),
    ("n", "n"),
)
_NUMERIC_COLUMNS = ("rank", "clean", "autoattack", "worst_case", "min_over_means", "f_evals", "n")
#: accuracy column -> its ``deq.ci95`` key; the Markdown/HTML cell shows "value [lo, hi]", the CSV
#: gets "<header> 95% CI low" / "... high" columns beside it
_CI_COLUMNS = {"clean": "clean", "autoattack": "autoattack", "worst_case": "ALL",
               "min_over_means": "min_over_means"}
FOOTNOTE = "rendered from the JSON entries in this folder; do not edit by hand"
TTD_INTRO = ("Defenses that optimize their input at inference (Sec. 3.2), ranked separately as "
             "RobustBench does. Their robust accuracy is the worst case over the protocol AND "
             "the adaptive attacks of Croce et al. (ICML 2022): transfer from the undefended "
             "model judged on the defended forward, the full gradient through the defense, a "
             "cheaper defense as gradient model, adapted objectives, Square. An entry is "
             "'unreliable' (greyed) unless the whole adaptive protocol ran at the standard budget.")
OUTPUT_NAMES = {"md": "leaderboard.md", "csv": "leaderboard.csv", "html": "leaderboard.html"}
#: JSON files of a leaderboard folder that are not entries (the claims' verdicts, a copy)
NON_ENTRY_FILES = ("claims.json", "gap.json")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MAX_NAME = 200


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _check_safe_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_NAME or not _SAFE_NAME.match(value) or value.endswith(".json"):
        raise ValueError(
            f"{what} {value!r} is not filesystem-safe: use letters, digits and . _ + - only "
            f"(starting with a letter or digit, at most {_MAX_NAME} characters, no '.json')")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(value: Any, what: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _percent(fraction: float) -> str:
    """0.8912 -> "89.12" (RobustBench's percent string, two decimals)."""
    return f"{100.0 * fraction:.2f}"


def _parse_percent(value: Any, what: str) -> float:
    """A RobustBench percent string ("89.12") -> 89.12; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a percent string like \"89.12\", got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} must be a percent string like \"89.12\", got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number <= 100.0:
        raise ValueError(f"{what} must lie in [0, 100], got {value!r}")
    return number


def format_eps(eps: float, dataset: str) -> str:
    """``"8/255"`` for RobustBench datasets (cifar10, cifar100, imagenet) when ``eps * 255`` is
    (within 1e-6 of) a non-zero integer, else ``f"{eps:g}"`` (``0.1`` -> ``"0.1"``)."""
    scaled = eps * 255.0
    k = round(scaled)
    if dataset in _X255_DATASETS and k != 0 and abs(scaled - k) < 1e-6:
        return f"{k}/255"
    return f"{eps:g}"


def _robust_field(threat: Optional[str]) -> str:
    return "corruptions_acc" if threat == "corruptions" else "autoattack_acc"


def _folder_dataset_threat(folder: Path) -> tuple[Optional[str], Optional[str]]:
    """``.../fashion_mnist-Linf`` -> ("fashion_mnist", "Linf"); (None, None) if it does not parse."""
    dataset, sep, threat = folder.name.rpartition("-")
    if sep and dataset and threat in THREATS:
        return dataset, threat
    return None, None


# --------------------------------------------------------------------------------------------
# entries
# --------------------------------------------------------------------------------------------

def _normalize_deq(deq: Optional[dict], autoattack_pct: Optional[str],
                   worst_pct: Optional[str]) -> dict:
    """Validate the caller's ``deq`` dict and fill the duplicated accuracy fields."""
    if deq is None:
        deq = {}
    if not isinstance(deq, dict):
        raise ValueError(f"deq must be a dict, got {type(deq).__name__}")
    unknown = sorted(set(deq) - set(DEQ_FIELDS))
    if unknown:
        raise ValueError(f"deq has unknown key(s) {unknown}; allowed: {sorted(DEQ_FIELDS)}")
    out = dict(deq)
    for key in ("min_over_means_acc", "grid_worst_case_acc"):
        if key in out and out[key] is not None and not isinstance(out[key], str):
            out[key] = _percent(_check_fraction(out[key], f"deq[{key!r}]"))
    for key, value in (("autoattack_acc", autoattack_pct), ("worst_case_acc", worst_pct)):
        given = out.get(key)
        if given is not None and not isinstance(given, str):
            given = _percent(_check_fraction(given, f"deq[{key!r}]"))
        if given is not None and value is not None and float(given) != float(value):
            raise ValueError(f"deq[{key!r}]={given!r} disagrees with {key}={value!r}")
        if value is not None:
            out[key] = value
        elif given is not None:
            raise ValueError(f"deq[{key!r}] is given but the {key} argument is None")
    budget = out.get("budget")
    if isinstance(budget, str):
        out["budget"] = {"level": budget, "knobs": {}}
    elif isinstance(budget, dict):
        out["budget"] = {"level": budget.get("level"), "knobs": dict(budget.get("knobs") or {}),
                         **{k: v for k, v in budget.items() if k not in ("level", "knobs")}}
    if "f_evals_per_forward" in out and _is_number(out["f_evals_per_forward"]):
        out["f_evals_per_forward"] = float(out["f_evals_per_forward"])
    out = {k: v for k, v in out.items() if v is not None}
    _validate_deq(out, autoattack_pct, "deq")
    return out


def make_entry(name: str, *, clean_acc: float, autoattack_acc: float,
               worst_case_acc: Optional[float], dataset: str, threat: str, eps: Optional[float],
               architecture: str, number_forward_passes: int, deq: Optional[dict] = None,
               venue: str = "", authors: str = "", link: str = "",
               reported: Optional[str] = None,
               additional_data: bool = False, footnote: Optional[str] = None,
               unreliable: bool = False) -> dict:
    """One leaderboard entry (a JSON-ready dict in RobustBench's model_info format + ``deq``).

    Accuracies are fractions in [0, 1] and are stored as percent strings with two decimals
    (0.8912 -> ``"89.12"``).  ``eps`` is stored as a string (:func:`format_eps`; ``None`` only
    for ``threat="corruptions"``).  For ``threat="corruptions"`` the robust accuracy is stored as
    ``corruptions_acc`` (RobustBench's field) instead of ``autoattack_acc``.

    ``external`` is set to the worst case over everything run (``worst_case_acc``, "ALL") when
    that is lower than ``autoattack_acc``.  ``deq`` holds the keys of :data:`DEQ_FIELDS`;
    ``min_over_means_acc`` / ``grid_worst_case_acc`` may be given as fractions (converted) or
    percent strings, ``budget`` as ``"standard"``/``"reduced"`` or
    ``{"level": ..., "knobs": {...}}``; ``worst_case_acc`` and ``autoattack_acc`` are filled in.

    Raises ``ValueError`` for an invalid input.
    """
    _check_safe_name(name, "entry name")
    _check_safe_name(dataset, "dataset")
    if threat not in THREATS:
        raise ValueError(f"threat must be one of {list(THREATS)}, got {threat!r}")
    clean = _check_fraction(clean_acc, "clean_acc")
    robust = _check_fraction(autoattack_acc, "autoattack_acc")
    worst = None if worst_case_acc is None else _check_fraction(worst_case_acc, "worst_case_acc")
    if eps is None:
        if threat != "corruptions":
            raise ValueError(f"eps is required for threat {threat!r}")
        eps_str = None
    else:
        if not _is_number(eps) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        eps_str = format_eps(float(eps), dataset)
    if not isinstance(architecture, str) or not architecture.strip():
        raise ValueError(f"architecture must be a non-empty string, got {architecture!r}")
    if (not isinstance(number_forward_passes, int) or isinstance(number_forward_passes, bool)
            or number_forward_passes < 1):
        raise ValueError(f"number_forward_passes must be an int >= 1, got {number_forward_passes!r}")
    for what, value in (("venue", venue), ("authors", authors), ("link", link),
                        ("reported", "" if reported is None else reported)):
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string, got {value!r}")
    if not isinstance(additional_data, bool):
        raise ValueError(f"additional_data must be a bool, got {additional_data!r}")
    if not isinstance(unreliable, bool):
        raise ValueError(f"unreliable must be a bool, got {unreliable!r}")
    if footnote is not None and not isinstance(footnote, str):
        raise ValueError(f"footnote must be a string or None, got {footnote!r}")

    robust_pct = _percent(robust)
    worst_pct = None if worst is None else _percent(worst)
    entry: dict[str, Any] = {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": additional_data,
        "number_forward_passes": number_forward_passes,
        "dataset": dataset,
        "venue": venue,
        "architecture": architecture,
        "eps": eps_str,
        "clean_acc": _percent(clean),
        _robust_field(threat): robust_pct,
        "threat_model": threat,
    }
    if reported is not None:
        entry["reported"] = reported
    if worst_pct is not None and (float(worst_pct) < float(robust_pct)
                                  or is_test_time_defense({"deq": deq or {}})):
        # a test-time defense is scored by our worst case (its adaptive protocol included),
        # never by AutoAttack alone (Croce et al. 2022; RobustBench's 'external')
        entry["external"] = worst_pct
    if footnote is not None:
        entry["footnote"] = footnote
    if unreliable:
        entry["unreliable"] = True
    entry["deq"] = _normalize_deq(deq, robust_pct if threat != "corruptions" else None,
                                  worst_pct)
    n = entry["deq"].get("n_examples")
    if n is not None:
        exact = {"clean": clean, "autoattack": robust, "ALL": worst}
        counts, cis = _counts_and_intervals(entry, n, exact, strict=True)
        entry["deq"]["counts"], entry["deq"]["ci95"] = counts, cis
    validate_entry(entry)
    return entry


def _counts_and_intervals(entry: dict, n: int, exact: Optional[dict] = None,
                          strict: bool = False) -> tuple:
    """({key: k}, {key: [lo %, hi %]}) for every accuracy of ``entry`` (see :data:`CI_KEYS`),
    with k = round(acc * n): exact when the accuracy is k/n (a percent string with two decimals
    identifies k uniquely for n <= 10,000). An accuracy that is no multiple of 1/n raises
    ValueError (``strict``) or gets no interval."""
    from benchmark.report.stats import clopper_pearson
    deq = _deq(entry)
    counts, cis = {}, {}
    for key, field in CI_KEYS.items():
        frac = (exact or {}).get(key)
        if frac is None:
            value = entry.get(field) if field in ("clean_acc", "autoattack_acc") else deq.get(field)
            if value is None:
                continue
            frac = float(value) / 100.0
            tol = 0.00005 * n + 1e-9     # a percent string is rounded to 1e-4 (two decimals)
        else:
            tol = 1e-6
        k = int(round(frac * n))
        if abs(frac * n - k) > tol:
            if strict:
                raise ValueError(f"{CI_KEYS[key]} = {frac!r} is not a count out of n_examples = "
                                 f"{n} (k/n for an integer k)")
            continue
        lo, hi = clopper_pearson(k, n)
        counts[key] = k
        cis[key] = [round(100 * lo, 2), round(100 * hi, 2)]
    return counts, cis


def _validate_deq(deq: Any, robust_pct: Optional[str], where: str) -> None:
    if not isinstance(deq, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(deq).__name__}")
    unknown = sorted(set(deq) - set(DEQ_FIELDS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(DEQ_FIELDS)}")
    for key in _DEQ_PERCENT_FIELDS:
        if key in deq:
            _parse_percent(deq[key], f"{where}.{key}")
    if "autoattack_acc" in deq and robust_pct is not None \
            and float(deq["autoattack_acc"]) != float(robust_pct):
        raise ValueError(f"{where}.autoattack_acc={deq['autoattack_acc']!r} disagrees with the "
                         f"top-level value {robust_pct!r}")
    if "weights_sha256" in deq and not (isinstance(deq["weights_sha256"], str)
                                        and re.fullmatch(r"[0-9a-f]{64}", deq["weights_sha256"])):
        raise ValueError(f"{where}.weights_sha256 must be 64 lowercase hex digits, got "
                         f"{deq['weights_sha256']!r}")
    for key in ("defense", "evaluated_state", "data_source", "commit", "checkpoint"):
        if key in deq and not isinstance(deq[key], str):
            raise ValueError(f"{where}.{key} must be a string, got {deq[key]!r}")
    if "defense_params" in deq and not isinstance(deq["defense_params"], dict):
        raise ValueError(f"{where}.defense_params must be an object, got {deq['defense_params']!r}")
    if "f_evals_per_forward" in deq:
        value = deq["f_evals_per_forward"]
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}.f_evals_per_forward must be a number >= 0, got {value!r}")
    if "n_examples" in deq:
        value = deq["n_examples"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}.n_examples must be an int >= 1, got {value!r}")
    if "flags" in deq:
        flags = deq["flags"]
        if not isinstance(flags, dict):
            raise ValueError(f"{where}.flags must be an object name -> {{'flag': bool, ...}}")
        for flag_name, record in flags.items():
            if not isinstance(record, dict) or not isinstance(record.get("flag"), bool):
                raise ValueError(f"{where}.flags[{flag_name!r}] must be an object with a bool "
                                 f"'flag', got {record!r}")
    n = deq.get("n_examples")
    for key in ("counts", "ci95"):
        if key in deq:
            if not isinstance(deq[key], dict) or not set(deq[key]) <= set(CI_KEYS):
                raise ValueError(f"{where}.{key} must be an object with keys among "
                                 f"{sorted(CI_KEYS)}, got {deq[key]!r}")
    for name, k in (deq.get("counts") or {}).items():
        if not isinstance(k, int) or isinstance(k, bool) or k < 0 or (n is not None and k > n):
            raise ValueError(f"{where}.counts[{name!r}] must be an int in [0, n_examples], got {k!r}")
    for name, ci in (deq.get("ci95") or {}).items():
        if (not isinstance(ci, list) or len(ci) != 2 or not all(_is_number(v) for v in ci)
                or not 0 <= ci[0] <= ci[1] <= 100):
            raise ValueError(f"{where}.ci95[{name!r}] must be [lo, hi] with 0 <= lo <= hi <= 100 "
                             f"(percent), got {ci!r}")
    if "outcomes" in deq:
        out = deq["outcomes"]
        ex = out.get("examples") if isinstance(out, dict) else None
        if not isinstance(ex, list) or not all(isinstance(i, int) for i in ex):
            raise ValueError(f"{where}.outcomes must hold 'examples': a list of ints")
        for name, bits in out.items():
            if name != "examples" and (not isinstance(bits, str) or len(bits) != len(ex)
                                       or set(bits) - {"0", "1"}):
                raise ValueError(f"{where}.outcomes[{name!r}] must be a string of 0/1, one per "
                                 f"example ({len(ex)})")
    if "budget" in deq:
        budget = deq["budget"]
        if (not isinstance(budget, dict) or budget.get("level") not in _BUDGET_LEVELS
                or not isinstance(budget.get("knobs", {}), dict)):
            raise ValueError(f"{where}.budget must be {{'level': 'standard' | 'reduced', "
                             f"'knobs': {{...}}}}, got {budget!r}")


def validate_entry(entry: Any, source: Any = None, *, folder: Optional[Path] = None) -> dict:
    """Check one entry dict; raise ``ValueError`` (prefixed with ``source``) when it is invalid.

    ``folder`` (the leaderboard folder ``<dataset>-<threat>``) additionally checks that the
    entry's dataset / threat model match the folder name.
    """
    prefix = f"{source}: " if source is not None else ""
    try:
        if not isinstance(entry, dict):
            raise ValueError(f"an entry must be a JSON object, got {type(entry).__name__}")
        missing = [k for k in REQUIRED_FIELDS if k not in entry]
        threat = entry.get("threat_model")
        if folder is not None and threat is None:
            threat = _folder_dataset_threat(folder)[1]
        if threat is not None and threat not in THREATS:
            raise ValueError(f"threat_model must be one of {list(THREATS)}, got {threat!r}")
        robust_field = _robust_field(threat)
        if threat is None and "autoattack_acc" not in entry and "corruptions_acc" in entry:
            robust_field = "corruptions_acc"
        if robust_field not in entry:
            missing.append(robust_field)
        if missing:
            raise ValueError(f"missing required field(s): {', '.join(missing)}")
        for key, types in REQUIRED_FIELDS.items():
            value = entry[key]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"field {key!r} must be {names}, got {value!r}")
        _check_safe_name(entry["name"], "field 'name'")
        if entry["number_forward_passes"] < 1:
            raise ValueError("field 'number_forward_passes' must be >= 1")
        _parse_percent(entry["clean_acc"], "field 'clean_acc'")
        _parse_percent(entry[robust_field], f"field {robust_field!r}")
        if "external" in entry:
            _parse_percent(entry["external"], "field 'external'")
        for key, types in OPTIONAL_FIELDS.items():
            if key in entry and (not isinstance(entry[key], types) or isinstance(entry[key], bool)):
                raise ValueError(f"field {key!r} must be a percent string, got {entry[key]!r}")
        if "footnote" in entry and entry["footnote"] is not None \
                and not isinstance(entry["footnote"], str):
            raise ValueError(f"field 'footnote' must be a string, got {entry['footnote']!r}")
        if "unreliable" in entry and not isinstance(entry["unreliable"], bool):
            raise ValueError(f"field 'unreliable' must be a bool, got {entry['unreliable']!r}")
        if "deq" in entry:
            _validate_deq(entry["deq"], entry.get("autoattack_acc"), "field 'deq'")
        if folder is not None:
            f_dataset, f_threat = _folder_dataset_threat(folder)
            if f_dataset is not None and entry["dataset"] != f_dataset:
                raise ValueError(f"dataset {entry['dataset']!r} does not match the folder "
                                 f"{folder.name!r}")
            if f_threat is not None and entry.get("threat_model", f_threat) != f_threat:
                raise ValueError(f"threat_model {entry['threat_model']!r} does not match the "
                                 f"folder {folder.name!r}")
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None
    return entry


def write_entry(entry: dict, root: os.PathLike | str = "leaderboards") -> Path:
    """Write ``root/<dataset>-<threat>/<name>.json`` (indent 2, sorted keys, trailing newline).

    The entry is validated first; the file is replaced atomically.  Returns its path.
    """
    validate_entry(entry, "entry")
    threat = entry.get("threat_model")
    if threat is None:
        raise ValueError("entry: missing field 'threat_model' (needed for the folder name)")
    _check_safe_name(entry["dataset"], "entry: field 'dataset'")
    folder = Path(root) / f"{entry['dataset']}-{threat}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry['name']}.json"
    text = json.dumps(entry, indent=2, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{entry['name']}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_entries(folder: os.PathLike | str) -> list[dict]:
    """Read and validate every ``*.json`` in ``folder`` (in file-name order).

    Raises ``ValueError`` naming the file for malformed JSON, a missing required field, a value
    of the wrong type, a file name that differs from the entry's ``name``, or a dataset/threat
    model that does not match the folder name ``<dataset>-<threat>``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"leaderboard folder {folder} does not exist")
    entries = []
    for path in sorted(folder.glob("*.json")):
        if path.name in NON_ENTRY_FILES:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: malformed JSON: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text: {exc}") from None
        validate_entry(data, path, folder=folder)
        if data["name"] != path.stem:
            raise ValueError(f"{path}: field 'name' is {data['name']!r} but the file is named "
                             f"{path.name!r} (expected {data['name']}.json)")
        entries.append(data)
    return entries


# --------------------------------------------------------------------------------------------
# sorting and rendering
# --------------------------------------------------------------------------------------------

def _robust_value(entry: dict) -> float:
    """RobustBench's sort key: ``external`` if present, else ``autoattack_acc``
    (else ``corruptions_acc``), as a float percent."""
    for key in ("external", "autoattack_acc", "corruptions_acc"):
        if entry.get(key) is not None:
            return float(entry[key])
    raise ValueError(f"entry {entry.get('name')!r} has no external/autoattack_acc/corruptions_acc")


def sort_key(entry: dict) -> tuple:
    """(-robust, -clean, name): RobustBench's key, ties by clean accuracy, then name."""
    return (-_robust_value(entry), -float(entry["clean_acc"]), str(entry["name"]))


def sort_entries(entries: Iterable[dict]) -> list[dict]:
    """Entries in leaderboard order (a new list): :func:`sort_key` ascending."""
    return sorted(entries, key=sort_key)


def _deq(entry: dict) -> dict:
    deq = entry.get("deq")
    return deq if isinstance(deq, dict) else {}


def _opt_float(value: Any) -> Optional[float]:
    if value is None or value == "":
        return None
    return float(value)


def _budget_text(budget: Any) -> Optional[str]:
    if not isinstance(budget, dict) or not budget.get("level"):
        return None
    knobs = budget.get("knobs") or {}
    if not knobs:
        return str(budget["level"])
    inner = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                      for k, v in sorted(knobs.items()))
    return f"{budget['level']} ({inner})"


def is_test_time_defense(entry: dict) -> bool:
    """An entry of a test-time defense (the Sec. 3.2 input entropy reduction): it carries
    ``deq.test_time_defense`` or its defense is ``entropy_reduction``."""
    deq = _deq(entry)
    d = deq.get("defense")
    return bool(deq.get("test_time_defense")) or (
        isinstance(d, str) and (d.startswith("entropy_reduction")
                                or '"name": "entropy_reduction"' in d))


def _adaptive_text(ttd: Any) -> Optional[str]:
    """What of the adaptive protocol ran on a test-time defense, e.g. 'complete, reduced
    (through:apgd-ce reduced, ...)'; None for other entries."""
    if not isinstance(ttd, dict):
        return None
    if not ttd.get("variants_run"):
        return "adaptive protocol not run"
    head = ("complete" if ttd.get("complete") else
            "partial (missing: " + ", ".join(ttd.get("variants_missing") or []) + ")")
    members = ttd.get("members") or {}
    reduced = [k for k, v in members.items() if v != "standard"]
    return (f"{head}, {ttd.get('budget', 'reduced')}"
            + (f" ({', '.join(reduced)} reduced)" if reduced else ""))


def _flags_text(flags: Any) -> str:
    """Raised flags by name; '-' when the obfuscation checks ran and raised none; 'not checked'
    when they did not run (flags absent, or only the non-obfuscation ones)."""
    checked = isinstance(flags, dict) and any(k not in NOT_OBFUSCATION_FLAGS for k in flags)
    if not isinstance(flags, dict):
        return "not checked"
    raised = [name for name, rec in flags.items() if isinstance(rec, dict) and rec.get("flag")]
    # the binarization attack-strength test (benchmark/suite/strength.py): its pass rate is shown
    # whether or not it is raised, so "passed" differs from "not run"
    st = flags.get("attack_strength")
    if isinstance(st, dict) and isinstance(st.get("n"), int) and "passes" in st:
        raised = [n for n in raised if n != "attack_strength"]
        raised.append(f"attack strength {st['passes']}/{st['n']}"
                      + (" (FLAG)" if st.get("flag") else ""))
    if not checked:
        raised.append("not checked")
    return ", ".join(raised) if raised else "-"


def table_rows(entries: Iterable[dict]) -> list[dict]:
    """One dict per entry in leaderboard order, keyed by the :data:`COLUMNS` keys.

    Accuracies are float percents (``89.12``), ``f_evals`` a float; missing values are ``None``.
    """
    rows = []
    ordered = sort_entries(entries)
    # test-time defenses get their own section and ranking (RobustBench keeps defenses that
    # optimize at inference off its main table), after the main table
    ordered = ([e for e in ordered if not is_test_time_defense(e)]
               + [e for e in ordered if is_test_time_defense(e)])
    ranks = {"main": 0, "test-time defense": 0}
    for entry in ordered:
        section = "test-time defense" if is_test_time_defense(entry) else "main"
        ranks[section] += 1
        rank = ranks[section]
        deq = _deq(entry)
        robust_field = _robust_field(entry.get("threat_model"))
        if robust_field not in entry:
            robust_field = "autoattack_acc" if "autoattack_acc" in entry else "corruptions_acc"
        rows.append({
            "rank": rank,
            "model": entry["name"],
            "architecture": entry.get("architecture"),
            "clean": _opt_float(entry.get("clean_acc")),
            "autoattack": _opt_float(entry.get(robust_field)),
            "worst_case": _opt_float(deq.get("worst_case_acc")),
            "min_over_means": _opt_float(deq.get("min_over_means_acc")),
            "f_evals": _opt_float(deq.get("f_evals_per_forward")),
            "evaluated_state": deq.get("evaluated_state"),
            "defense": deq.get("defense"),
            "budget": _budget_text(deq.get("budget")),
            "flags": _flags_text(deq.get("flags")),
            "n": deq.get("n_examples"),
            "section": section,
            "adaptive": _adaptive_text(deq.get("test_time_defense")),
        })
        cis = deq.get("ci95")
        if cis is None and deq.get("n_examples"):
            cis = _counts_and_intervals(entry, int(deq["n_examples"]))[1]
        for key, ci_key in _CI_COLUMNS.items():
            ci = (cis or {}).get(ci_key)
            rows[-1][key + "_ci"] = tuple(ci) if ci and rows[-1][key] is not None else None
        rows[-1]["defense_short"], rows[-1]["defense_long"] = defense_words(
            deq.get("defense"), deq.get("defense_params"), deq.get("evaluated_state"))
    return rows


_ER_DEFAULTS = {"tf": 2, "r": 10}  # EntropyReduction's constructor defaults (model_zoo.forward)


def defense_words(defense: Any, params: Any = None, state: Any = None) -> tuple:
    """A defense as stored (``'final'``, ``'early:select'``, ``'entropy_reduction'``, a JSON dict
    string or a dict) -> (short words, one sentence), e.g. ``("Sec. 3.2 (Tf=4, R=5)", "Sec. 3.2
    entropy reduction (Tf=4, R=5) at the final state")``; never raw JSON."""
    params = params if isinstance(params, dict) else {}
    d: dict = {}
    if isinstance(defense, dict):
        d = dict(defense)
    elif isinstance(defense, str) and defense.startswith("{"):
        try:
            d = json.loads(defense)
        except ValueError:
            d = {"name": defense}
    elif isinstance(defense, str):
        name, _, arg = defense.partition(":")
        d = {"name": name, **({"arg": arg} if arg else {})}
    name = str(d.get("name") or "")
    if not name or name in ("final", "none"):
        if state == "output":
            return "none", "no defense (plain forward)"
        return "none", "no defense: the final state z* of the fixed-point solve"
    if name.startswith("early"):
        idx = params.get("index", d.get("index"))
        where = f"z[{idx}]" if idx is not None else (state if state not in (None, "final")
                                                       else None)
        chosen = " chosen on validation data" if d.get("arg") == "select" or "selection" in params \
            else ""
        if where is None:
            return "early exit", f"early-state exit{chosen}"
        return f"early exit {where}", f"early-state exit: logits of {where}{chosen}"
    if name == "entropy_reduction":
        tf = params.get("tf", d.get("tf", _ER_DEFAULTS["tf"]))
        r = params.get("r", d.get("r", _ER_DEFAULTS["r"]))
        readout = params.get("readout") if isinstance(params.get("readout"), dict) else {}
        at = " at the final state" if readout.get("name", "final") == "final" else ""
        return (f"Sec. 3.2 (Tf={tf}, R={r})",
                f"Sec. 3.2 entropy reduction (Tf={tf}, R={r}){at}")
    words = name.replace("_", " ")
    return words, words


def _ci_text(ci: Optional[tuple]) -> str:
    return "" if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def _cell_text(key: str, value: Any, ci: Optional[tuple] = None) -> str:
    """A cell's text; accuracies with their 95% interval when ``ci`` is given."""
    if value is None:
        return "-"
    if key in _CI_COLUMNS and ci is not None:
        return f"{value:.2f} {_ci_text(ci)}"
    if key in ("clean", "autoattack", "worst_case", "min_over_means"):
        return f"{value:.2f}"
    if key == "f_evals":
        return f"{value:g}"
    return str(value)


# --------------------------------------------------------------------------------------------
# paired comparisons (from the entries' per-example outcomes)
# --------------------------------------------------------------------------------------------

_FAMILY_WORDS = {"pgd": "PGD (final state)", "grid": "intermediate grid (worst case)",
                 "autoattack": "AutoAttack", "adaptive": "adaptive attacks",
                 "checks": "obfuscation checks", "top_settings": "APGD at top settings",
                 "transfer": "transfer", "ALL": "ALL", "clean": "clean"}


def _outcome_vector(entry: dict, key: str) -> Optional[dict]:
    out = _deq(entry).get("outcomes")
    if not isinstance(out, dict) or key not in out:
        return None
    return dict(zip(out["examples"], (int(b) for b in out[key])))


def _paired(entry_a: dict, entry_b: dict, key_a: str = "ALL", key_b: Optional[str] = None) -> Optional[dict]:
    """Paired comparison of two outcome vectors over their COMMON examples; None when either
    entry has no per-example outcomes (then the two numbers cannot be compared paired)."""
    from benchmark.report.stats import paired_comparison
    va, vb = _outcome_vector(entry_a, key_a), _outcome_vector(entry_b, key_b or key_a)
    if va is None or vb is None:
        return None
    common = sorted(set(va) & set(vb))
    if not common:
        return None
    pc = paired_comparison([va[i] for i in common], [vb[i] for i in common])
    d = pc.to_dict()
    d["conclusion"] = ("inconclusive at this n" if pc.verdict == "inconclusive"
                       else "first higher" if pc.diff > 0 else "second higher")
    return d


def paired_sections(entries: Iterable[dict]) -> dict:
    """The leaderboard's paired comparisons (exact McNemar, Newcombe 95% interval of the
    difference), each over the examples the two sides share:

    * ``neighbours``: ALL of rank r vs rank r + 1;
    * ``defense``: ALL (and clean) of a defended entry vs the same model undefended;
    * ``sec33``: ALL of a Sec. 3.3 model (``X_sec33``) vs its baseline ``X``, same defense;
    * ``attacks``: within an entry, every pair of the attack families it holds;
    * ``matrix``: ALL of every entry vs every other (``names``, ``diff``, ``p``).
    Rows whose entries carry no ``deq.outcomes`` have ``comparison: None``."""
    ordered = sort_entries(entries)
    rank = {e["name"]: i + 1 for i, e in enumerate(ordered)}
    out: dict = {"neighbours": [], "defense": [], "sec33": [], "attacks": [], "matrix": None}
    for a, b in zip(ordered, ordered[1:]):
        out["neighbours"].append({"a": a["name"], "b": b["name"], "rank_a": rank[a["name"]],
                                  "rank_b": rank[b["name"]], "what": "ALL",
                                  "comparison": _paired(a, b)})
    by_name = {e["name"]: e for e in ordered}
    for e in ordered:
        base, sep, _ = e["name"].partition("+")
        if not sep or base not in by_name:
            continue
        for what in ("ALL", "clean"):
            out["defense"].append({"a": e["name"], "b": base, "what": what,
                                   "defense": defense_words(_deq(e).get("defense"),
                                                            _deq(e).get("defense_params"))[1],
                                   "comparison": _paired(e, by_name[base], what)})
    for e in ordered:   # Sec. 3.3 training vs its baseline (X_sec33 vs X, same defense)
        base, sep, rest = e["name"].partition("+")
        if "_sec33" in base:
            other = base.replace("_sec33", "", 1) + sep + rest
            if other in by_name:
                out["sec33"].append({"a": e["name"], "b": other, "what": "ALL",
                                     "comparison": _paired(e, by_name[other])})
    for e in ordered:
        fams = [k for k in (_deq(e).get("outcomes") or {}) if k not in ("examples", "clean", "ALL")]
        for i, fa in enumerate(fams):
            for fb in fams[i + 1:]:
                out["attacks"].append({"entry": e["name"], "a": fa, "b": fb,
                                       "comparison": _paired(e, e, fa, fb)})
    if all(_deq(e).get("outcomes") for e in ordered) and len(ordered) > 1:
        names = [e["name"] for e in ordered]
        diff = [[None] * len(names) for _ in names]
        pv = [[None] * len(names) for _ in names]
        for i, a in enumerate(ordered):
            for j, b in enumerate(ordered):
                if i != j:
                    c = _paired(a, b)
                    if c is not None:
                        diff[i][j], pv[i][j] = c["diff"], c["p"]
        out["matrix"] = {"names": names, "diff": diff, "p": pv}
    return out


def _comparison_cells(c: Optional[dict]) -> list:
    """[difference (points), 95% CI, McNemar p, discordant, conclusion] as text."""
    if c is None:
        return ["-", "-", "-", "-", "not paired (no per-example outcomes on common examples)"]
    lo, hi = c["ci95"]
    return [f"{100 * c['diff']:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]", f"{c['p']:.3g}",
            f"{c['b']} vs {c['c']} (n={c['n']})", c["conclusion"]]


def _description(entries: list[dict], dataset: str, threat: str, eps: str) -> list:
    """The two lines under the title: what was evaluated, and how to read the numbers."""
    ns = sorted({_deq(e).get("n_examples") for e in entries if _deq(e).get("n_examples")})
    levels = sorted({(_deq(e).get("budget") or {}).get("level") for e in entries
                     if (_deq(e).get("budget") or {}).get("level")})
    sources = sorted({_deq(e).get("data_source") for e in entries if _deq(e).get("data_source")})
    n_text = ", ".join(str(n) for n in ns) if ns else "?"
    line1 = (f"{dataset} test images ({'; '.join(sources) if sources else 'n = ' + n_text}), "
             f"{threat} threat model, eps = {eps}, n = {n_text} per entry, attack budget: "
             f"{', '.join(levels) if levels else 'unknown'} (details per row).")
    resolve = ""
    if len(ns) == 1:
        from benchmark.report.stats import resolvable_difference
        r = resolvable_difference(ns[0])
        resolve = (f" At n = {ns[0]} one example is {100 / ns[0]:.2f} points, a 50 % accuracy has "
                   f"a \u00b1{100 * r['half_width']:.1f}-point interval, and two entries differ "
                   f"significantly only with \u2265 {r['min_discordant']} discordant examples "
                   f"({100 * r['min_diff']:.1f} points) all one way.")
    line2 = ("ALL = per-example worst case over every attack run (an example counts only if it "
             "is correct clean and under every attack); ranks by ALL when lower than AutoAttack "
             "(RobustBench's external), else AutoAttack. Accuracies in %, with exact 95% "
             "Clopper-Pearson intervals [lo, hi]." + resolve)
    return [line1, line2]


def _caption(entries: list[dict], folder: Path) -> tuple[str, str, str]:
    f_dataset, f_threat = _folder_dataset_threat(folder)
    datasets = sorted({e["dataset"] for e in entries}) or [f_dataset or "?"]
    threats = sorted({e.get("threat_model") or f_threat or "?" for e in entries}) \
        or [f_threat or "?"]
    eps = sorted({"-" if e.get("eps") is None else str(e["eps"]) for e in entries}) or ["-"]
    return ", ".join(datasets), ", ".join(threats), ", ".join(eps)


def _md_escape(text: str) -> str:
    """Keep a value inside its Markdown table cell and out of GitHub's HTML."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _md_header(key: str, header: str) -> str:
    return f"{header} [95% CI]" if key in _CI_COLUMNS else header


def _md_cell(key: str, row: dict) -> str:
    if key == "defense":
        return row["defense_short"]
    return _cell_text(key, row[key], row.get(key + "_ci"))


def _render_md(rows: list[dict], dataset: str, threat: str, eps: str,
               entries: Optional[list] = None) -> str:
    entries = entries or []
    lines = [f"# Leaderboard: {_md_escape(dataset)}, {_md_escape(threat)}, eps = {_md_escape(eps)}",
             "", *[_md_escape(t) + "  " for t in _description(entries, dataset, threat, eps)], "",
             "| " + " | ".join(_md_header(key, header) for key, header in COLUMNS) + " |",
             "|" + "|".join("---:" if key in _NUMERIC_COLUMNS else "---" for key, _ in COLUMNS)
             + "|"]
    for row in rows:
        if row.get("section", "main") == "main":
            lines.append("| " + " | ".join(_md_escape(_md_cell(key, row)) for key, _ in COLUMNS)
                         + " |")
    ttd = [row for row in rows if row.get("section") == "test-time defense"]
    if ttd:
        lines += ["", "## Test-time defenses (adaptive evaluation)", "",
                  _md_escape(TTD_INTRO), "",
                  "| " + " | ".join(_md_header(key, header) for key, header in COLUMNS)
                  + " | adaptive protocol |",
                  "|" + "|".join("---:" if key in _NUMERIC_COLUMNS else "---" for key, _ in COLUMNS)
                  + "|---|"]
        for row in ttd:
            lines.append("| " + " | ".join(_md_escape(_md_cell(key, row)) for key, _ in COLUMNS)
                         + " | " + _md_escape(row.get("adaptive") or "not recorded") + " |")
    sec = paired_sections(entries)
    head = ("| difference (points) | 95% CI | McNemar p | discordant | conclusion |",
            "|---:|---|---:|---|---|")

    def table(title, intro, items, label):
        if not items:
            return []
        out = ["", f"## {title}", "", intro, "", "| comparison " + head[0], "|---" + head[1]]
        for it in items:
            out.append("| " + _md_escape(label(it)) + " | "
                       + " | ".join(_md_escape(t) for t in _comparison_cells(it["comparison"])) + " |")
        return out
    lines += table("Neighbouring ranks (paired, ALL)",
                   "Each rank vs the next on the examples both were evaluated on: the difference "
                   "of ALL, its 95% interval (Newcombe) and the exact McNemar p; "
                   "\"inconclusive\" = the two cannot be told apart at this n.",
                   sec["neighbours"], lambda it: f"{it['rank_a']}. {it['a']} vs {it['rank_b']}. {it['b']}")
    lines += table("Defense vs the same model undefended (paired)",
                   "A defended forward vs its model's plain final-state entry, same examples.",
                   sec["defense"], lambda it: f"{it['a']} vs {it['b']} ({it['what']})")
    lines += table("Sec. 3.3 vs its baseline (paired, ALL)",
                   "A model trained with Sec. 3.3 vs the same recipe without it, same defense and "
                   "examples.", sec["sec33"], lambda it: f"{it['a']} vs {it['b']}")
    lines += table("Attack vs attack within an entry (paired)",
                   "Robust accuracy under one attack family minus another, same entry and examples "
                   "(negative: the first attack is stronger).",
                   sec["attacks"], lambda it: f"{it['entry']}: {_FAMILY_WORDS.get(it['a'], it['a'])} "
                                              f"vs {_FAMILY_WORDS.get(it['b'], it['b'])}")
    lines += ["", f"_{FOOTNOTE}_", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.2em;
       color: #1b1b1b; }
table { border-collapse: collapse; font-size: 13px; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0 0 .6em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .45em; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f3f3f3; cursor: pointer; user-select: none; white-space: nowrap; }
thead th:hover { background: #e6e6e6; }
thead th[aria-sort="ascending"]::after { content: " \\25B2"; }
thead th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: #fafafa; }
tr.unreliable td { color: #999; }
p.footnote { font-size: 12px; color: #666; margin-top: 1em; }
h1 { font-size: 20px; margin: 0 0 .3em 0; }
h2 { font-size: 16px; margin: 1.2em 0 .3em 0; }
p.description { margin: .2em 0; font-size: 13px; color: #333; max-width: 1300px; }
td, th { white-space: nowrap; }
span.ci { color: #666; font-size: 11px; }
td[data-col="flags"] { max-width: 9em; overflow: hidden; text-overflow: ellipsis; }
td[data-col="adaptive"] { max-width: 6em; overflow: hidden; text-overflow: ellipsis;
                          white-space: nowrap; }
table.paired, table.matrix { font-size: 12px; margin-top: .4em; }
table.paired th, table.matrix th { cursor: default; }
tr.inconclusive td { color: #555; }
td.sig { font-weight: 600; }
details.paired { margin-top: 1em; font-size: 13px; }
details.paired summary { cursor: pointer; font-weight: 600; }
"""

# Sorting: click a header (first click: descending for numbers, ascending for text; a second
# click on the same header toggles).  Missing values ("-", empty data-value) always sort last.
# On load, "#sort=<col>&dir=asc|desc" (or "?sort=...&dir=..."; the hash wins) is applied, then
# "click=<col>,<col>,..." clicks those headers in turn (so a headless test can drive the click
# handler); the table's
# data-sort-key / data-sort-dir attributes say what is shown, data-js="ready" that the script ran.
_JS = """
(function () {
  "use strict";
  var table = document.getElementById("leaderboard");
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function colIndex(key) {
    for (var i = 0; i < headers.length; i++) {
      if (headers[i].getAttribute("data-col") === key) { return i; }
    }
    return -1;
  }
  function sortBy(key, dir) {
    var idx = colIndex(key);
    if (idx < 0) { return false; }
    if (dir !== "asc" && dir !== "desc") { dir = headers[idx].getAttribute("data-default-dir"); }
    var numeric = headers[idx].getAttribute("data-type") === "num";
    var sign = dir === "asc" ? 1 : -1;
    var rows = Array.prototype.slice.call(tbody.rows);
    var keyed = rows.map(function (row, pos) {
      var raw = row.cells[idx].getAttribute("data-value");
      var missing = raw === null || raw === "";
      var value = missing ? null : (numeric ? parseFloat(raw) : raw);
      if (numeric && !missing && isNaN(value)) { missing = true; value = null; }
      return { row: row, pos: pos, value: value, missing: missing };
    });
    keyed.sort(function (a, b) {
      if (a.missing !== b.missing) { return a.missing ? 1 : -1; }
      var c = 0;
      if (!a.missing) {
        c = numeric ? (a.value - b.value)
                    : String(a.value).localeCompare(String(b.value), undefined,
                                                    { numeric: true, sensitivity: "base" });
      }
      return c !== 0 ? sign * c : a.pos - b.pos;
    });
    keyed.forEach(function (k) { tbody.appendChild(k.row); });
    headers.forEach(function (h, i) {
      if (i === idx) { h.setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending"); }
      else { h.removeAttribute("aria-sort"); }
    });
    table.setAttribute("data-sort-key", key);
    table.setAttribute("data-sort-dir", dir);
    return true;
  }
  headers.forEach(function (h) {
    h.addEventListener("click", function () {
      var key = h.getAttribute("data-col");
      var dir = null;
      if (table.getAttribute("data-sort-key") === key) {
        dir = table.getAttribute("data-sort-dir") === "asc" ? "desc" : "asc";
      }
      sortBy(key, dir);
    });
    h.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); h.click(); }
    });
  });
  function applyLocation() {
    // query first, then the hash (the hash wins)
    var text = (window.location.search || "").replace(/^\\?/, "") + "&" +
               (window.location.hash || "").replace(/^#/, "");
    var params = {};
    text.split("&").forEach(function (part) {
      var eq = part.indexOf("=");
      if (eq > 0) {
        try {
          params[decodeURIComponent(part.slice(0, eq))] = decodeURIComponent(part.slice(eq + 1));
        } catch (err) { /* malformed escape: ignore that parameter */ }
      }
    });
    if (params.sort) { sortBy(params.sort, params.dir || null); }
    if (params.click) {
      params.click.split(",").forEach(function (key) {
        var idx = colIndex(key);
        if (idx >= 0) { headers[idx].click(); }
      });
    }
  }
  window.addEventListener("hashchange", applyLocation);
  applyLocation();
  // the rendered width, for the headless test of "no horizontal scroll at 1400 px"
  document.body.setAttribute("data-scroll-width", String(document.documentElement.scrollWidth));
  var tallest = 0;
  Array.prototype.forEach.call(tbody.rows, function (row) {
    tallest = Math.max(tallest, row.getBoundingClientRect().height);
  });
  document.body.setAttribute("data-max-row-height", String(Math.round(tallest)));
  table.setAttribute("data-js", "ready");
})();
"""


TEMPLATE_DIR = Path(__file__).resolve().parent / "report" / "templates"
_SHORT_HEADERS = {"worst_case": "ALL", "min_over_means": "min-over-means", "f_evals": "f-evals",
                  "evaluated_state": "state", "architecture": "arch."}
_HEADER_TITLES = {"worst_case": "worst case over every attack run, per example",
                  "f_evals": "f_theta evaluations per forward pass",
                  "n": "number of test examples"}


def _render_html(rows: list[dict], entries_by_name: dict, dataset: str, threat: str,
                 eps: str) -> str:
    """The page, from ``report/templates/leaderboard.html.j2`` (Jinja2, autoescaped): every value
    is escaped by the template engine; only the page's own CSS and JS are marked safe."""
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    headers = []
    for key, header in COLUMNS:
        numeric = key in _NUMERIC_COLUMNS
        headers.append({"key": key, "kind": "num" if numeric else "text", "numeric": numeric,
                        "default_dir": "desc" if numeric and key not in ("rank", "n") else "asc",
                        "text": _SHORT_HEADERS.get(key, header),
                        "title": _HEADER_TITLES.get(key, header if key in _SHORT_HEADERS else "")})
    page_rows = []
    for row in rows:
        entry = entries_by_name.get(row["model"], {})
        deq = _deq(entry)
        cells = []
        for key, _ in COLUMNS:
            value = row[key]
            data_value = "" if value is None else (repr(float(value)) if key in _NUMERIC_COLUMNS
                                                   else str(value))
            if key == "flags" and value == "-":
                data_value = ""
            cell = {"key": key, "value": data_value, "numeric": key in _NUMERIC_COLUMNS,
                    "text": _cell_text(key, value), "title": "", "link": None, "ci": ""}
            if key in _CI_COLUMNS and value is not None:
                cell["ci"] = _ci_text(row.get(key + "_ci"))
            if key == "model":
                base = str(value).partition("+")[0]
                cell["text"] = base
                cell["title"] = f"{value}" + (f" ({entry['architecture']})"
                                              if entry.get("architecture") else "")
                link = entry.get("link")
                if isinstance(link, str) and re.match(r"^https?://", link):
                    cell["link"] = link
            elif key == "defense":
                cell["text"] = row["defense_short"]
                params = deq.get("defense_params")
                cell["title"] = row["defense_long"] + (
                    "; parameters: " + json.dumps(params, sort_keys=True) if params else "")
            elif key == "budget" and value:
                cell["text"] = str(value).split(" ", 1)[0]
                cell["title"] = str(value)
            elif key == "flags":
                flags = deq.get("flags") or {}
                cell["title"] = "; ".join(f"{k}: {'RAISED' if v.get('flag') else 'ok'}"
                                          for k, v in flags.items() if isinstance(v, dict))
            cells.append(cell)
        page_rows.append({"name": row["model"], "rank": row["rank"], "cells": cells,
                          "unreliable": bool(entry.get("unreliable")),
                          "footnote": entry.get("footnote") or "",
                          "section": row.get("section", "main"),
                          "adaptive": row.get("adaptive") or ""})
    entries = list(entries_by_name.values())
    sec = paired_sections(entries)

    def items(rows_, label):
        out = []
        for it in rows_:
            cells = _comparison_cells(it["comparison"])
            out.append({"label": label(it), "cells": cells[:4], "conclusion": cells[4]})
        return out
    sections = [
        {"id": "neighbours", "open": True, "title": "Neighbouring ranks (paired, ALL)",
         "intro": "Each rank vs the next on the examples both were evaluated on: difference of "
                  "ALL, its 95% interval (Newcombe) and the exact McNemar p; \u201cinconclusive\u201d "
                  "= the two cannot be told apart at this n.",
         "rows": items(sec["neighbours"], lambda it: f"{it['rank_a']}. {it['a']} vs "
                                                      f"{it['rank_b']}. {it['b']}")},
        {"id": "defense", "open": True, "title": "Defense vs the same model undefended (paired)",
         "intro": "A defended forward vs its model's plain final-state entry, same examples.",
         "rows": items(sec["defense"], lambda it: f"{it['a']} vs {it['b']} ({it['what']})")},
        {"id": "sec33", "open": True, "title": "Sec. 3.3 vs its baseline (paired, ALL)",
         "intro": "A model trained with Sec. 3.3 vs the same recipe without it, same defense "
                  "and examples.",
         "rows": items(sec["sec33"], lambda it: f"{it['a']} vs {it['b']}")},
        {"id": "attacks", "open": False, "title": "Attack vs attack within an entry (paired)",
         "intro": "Robust accuracy under one attack family minus another, same entry and "
                  "examples (negative: the first attack is stronger).",
         "rows": items(sec["attacks"], lambda it: f"{it['entry']}: "
                                                   f"{_FAMILY_WORDS.get(it['a'], it['a'])} vs "
                                                   f"{_FAMILY_WORDS.get(it['b'], it['b'])}")},
    ]
    matrix = None
    if sec["matrix"]:
        m = sec["matrix"]
        matrix = {"names": m["names"], "rows": [
            {"name": name, "cells": [
                {"text": "" if d is None else f"{100 * d:+.1f} (p={p:.2g})",
                 "sig": p is not None and p < 0.05}
                for d, p in zip(m["diff"][i], m["p"][i])]}
            for i, name in enumerate(m["names"])]}
    return env.get_template("leaderboard.html.j2").render(
        dataset=dataset, threat=threat, eps=eps, css=Markup(_CSS), js=Markup(_JS),
        description=_description(entries, dataset, threat, eps), headers=headers,
        rows=[r for r in page_rows if r["section"] == "main"],
        ttd_rows=[r for r in page_rows if r["section"] != "main"], ttd_intro=TTD_INTRO,
        footnote=FOOTNOTE, sections=sections, matrix=matrix)


def render(folder: os.PathLike | str) -> dict[str, Path]:
    """Read the entries of ``folder`` and write ``leaderboard.md``, ``leaderboard.csv`` (pandas,
    accuracies as float percents, each with ``<column> 95% CI low/high`` beside it) and
    ``leaderboard.html`` (one self-contained page from the Jinja2 template
    ``report/templates/leaderboard.html.j2``: inline CSS and JS, sortable columns, the paired
    comparisons below the table) into it.  Returns ``{"md": path, "csv": path, "html": path}``."""
    import pandas as pd

    folder = Path(folder)
    entries = read_entries(folder)
    rows = table_rows(entries)
    dataset, threat, eps = _caption(entries, folder)
    paths = {kind: folder / name for kind, name in OUTPUT_NAMES.items()}

    _write_text(paths["md"], _render_md(rows, dataset, threat, eps, entries))
    columns = []
    for key, header in COLUMNS:
        columns.append((header, [row[key] for row in rows]))
        if key in _CI_COLUMNS:
            for j, side in enumerate(("low", "high")):
                columns.append((f"{header} 95% CI {side}",
                                [None if row[key + "_ci"] is None else row[key + "_ci"][j]
                                 for row in rows]))
    frame = pd.DataFrame(dict(columns))
    for header, _ in columns:
        if header not in ("rank", "n") and (header in {h for k, h in COLUMNS if k in _NUMERIC_COLUMNS}
                                            or "95% CI" in header):
            frame[header] = frame[header].astype(float)
    frame["n"] = frame["n"].astype("Int64")
    frame["defense"] = [row["defense_long"] for row in rows]   # words; the stored key beside it
    frame["defense key"] = [row["defense"] for row in rows]
    frame["section"] = [row["section"] for row in rows]
    frame["adaptive protocol"] = [row["adaptive"] for row in rows]
    _write_text(paths["csv"], frame.to_csv(index=False))
    _write_text(paths["html"], _render_html(rows, {e["name"]: e for e in entries},
                                            dataset, threat, eps))
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.leaderboard",
        description="Render a leaderboard folder of RobustBench-format JSON entries.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_render = sub.add_parser("render", help="write leaderboard.md/.csv/.html into FOLDER")
    p_render.add_argument("folder", help="e.g. leaderboards/fashion_mnist-Linf")
    args = parser.parse_args(argv)
    if args.command == "render":
        try:
            paths = render(args.folder)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        n = len([p for p in Path(args.folder).glob("*.json") if p.name not in NON_ENTRY_FILES])
        print(f"rendered {n} entr{'y' if n == 1 else 'ies'} from {args.folder}:")
        for kind in ("md", "csv", "html"):
            print(f"  {paths[kind]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
