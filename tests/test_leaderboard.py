"""benchmark/leaderboard.py: RobustBench-format entries, sorting, rendering (Markdown, CSV, HTML).

The headless-browser test needs Chromium (Debian: ``apt-get install -y chromium``); it is skipped
with that hint when no ``chromium`` / ``chromium-browser`` binary is found (or set
``DEQBENCH_CHROMIUM`` to a binary).  The RobustBench test imports robustbench through
``model_zoo.compat`` (a few seconds).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from benchmark import leaderboard as lb

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _entry(name, clean, aa, worst, *, dataset="fashion_mnist", threat="Linf", eps=0.1,
           architecture="MDEQ-tiny", deq=None, **kwargs):
    return lb.make_entry(name, clean_acc=clean, autoattack_acc=aa, worst_case_acc=worst,
                         dataset=dataset, threat=threat, eps=eps, architecture=architecture,
                         number_forward_passes=1, deq=deq, **kwargs)


def _three_entries(dataset="fashion_mnist", eps=0.1):
    """Leaderboard order (by external-else-AutoAttack): deq_z10 (50), resnet18_pgd (46),
    deq_z7 (41, although its AutoAttack accuracy, 55, is the highest)."""
    return [
        _entry("deq_z7", 0.8912, 0.55, 0.41, dataset=dataset, eps=eps,
               architecture='MDEQ-tiny <&> "x"',
               deq={"defense": "early-state", "defense_params": {"state": 7},
                    "evaluated_state": "z[7]", "f_evals_per_forward": 8,
                    "min_over_means_acc": 0.45, "n_examples": 200, "commit": "abc123",
                    "data_source": "fashion-mnist test subset n=200 seed 0",
                    "flags": {"grad_masking": {"flag": True, "ratio": 3.1},
                              "bb_beats_wb": {"flag": False}},
                    "budget": {"level": "reduced", "knobs": {"steps": 20}}}),
        _entry("deq_z10", 0.87, 0.52, 0.50, dataset=dataset, eps=eps,
               deq={"defense": "entropy", "evaluated_state": "z[10]",
                    "f_evals_per_forward": 11.5, "budget": "standard",
                    "flags": {"grad_masking": {"flag": False}}}),
        _entry("resnet18_pgd", 0.90, 0.46, 0.46, dataset=dataset, eps=eps,
               architecture="ResNet-18", deq={"min_over_means_acc": 0.47}),
    ]


SORTED_NAMES = ["deq_z10", "resnet18_pgd", "deq_z7"]


class _RowParser(HTMLParser):
    """Rows of ``<table id="leaderboard">``'s tbody: [{"name", "rank", "cells": {col: (value,
    text)}}], plus the table's attributes, the caption text and every tag name seen."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows, self.table_attrs, self.caption, self.tags = [], {}, "", []
        self._in_tbody = self._in_caption = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "table" and attrs.get("id") == "leaderboard":
            self.table_attrs = attrs
        elif tag == "caption":
            self._in_caption = True
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self.rows.append({"name": attrs.get("data-name"), "rank": attrs.get("data-rank"),
                              "cells": {}})
        elif tag == "td" and self._in_tbody:
            self._cell = [attrs.get("data-col"), attrs.get("data-value"), ""]

    def handle_endtag(self, tag):
        if tag == "caption":
            self._in_caption = False
        elif tag == "tbody":
            self._in_tbody = False
        elif tag == "td" and self._cell is not None:
            col, value, text = self._cell
            self.rows[-1]["cells"][col] = (value, text)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data
        elif self._in_caption:
            self.caption += data


def _parse_html(text):
    parser = _RowParser()
    parser.feed(text)
    parser.close()
    return parser


def _render_three(tmp_path):
    for entry in _three_entries():
        lb.write_entry(entry, tmp_path / "leaderboards")
    folder = tmp_path / "leaderboards" / "fashion_mnist-Linf"
    return folder, lb.render(folder)


# --------------------------------------------------------------------------------------------
# 1. make_entry validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ({"clean_acc": 1.5}, r"clean_acc must be a fraction in \[0, 1\], got 1.5"),
    ({"autoattack_acc": -0.1}, r"autoattack_acc must be a fraction in \[0, 1\]"),
    ({"worst_case_acc": float("nan")}, r"worst_case_acc must be a fraction in \[0, 1\]"),
    ({"clean_acc": True}, r"clean_acc must be a fraction"),
    ({"threat": "Linf2"}, r"threat must be one of \['Linf', 'L2', 'corruptions'\], got 'Linf2'"),
    ({"name": ""}, r"entry name must be a non-empty string"),
    ({"name": "   "}, r"entry name must be a non-empty string"),
    ({"name": "../evil"}, r"entry name '\.\./evil' is not filesystem-safe"),
    ({"name": "a/b"}, r"not filesystem-safe"),
    ({"name": "x.json"}, r"not filesystem-safe"),
    ({"dataset": "cifar/10"}, r"dataset 'cifar/10' is not filesystem-safe"),
    ({"eps": -1.0}, r"eps must be a finite number >= 0"),
    ({"eps": None}, r"eps is required for threat 'Linf'"),
    ({"number_forward_passes": 0}, r"number_forward_passes must be an int >= 1"),
    ({"deq": {"defence": "typo"}}, r"deq has unknown key\(s\) \['defence'\]"),
    ({"deq": {"budget": "huge"}}, r"budget must be"),
    ({"deq": {"flags": {"grad_masking": {"flag": "yes"}}}}, r"flags\['grad_masking'\]"),
    ({"deq": {"worst_case_acc": 0.2}}, r"deq\['worst_case_acc'\]='20.00' disagrees"),
])
def test_make_entry_rejects_invalid_input(change, match):
    kwargs = dict(name="deq_a", clean_acc=0.9, autoattack_acc=0.5, worst_case_acc=0.4,
                  dataset="fashion_mnist", threat="Linf", eps=0.1, architecture="MDEQ",
                  number_forward_passes=1)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        lb.make_entry(kwargs.pop("name"), **kwargs)


# --------------------------------------------------------------------------------------------
# 2. write / read round trip, formatting
# --------------------------------------------------------------------------------------------

def test_write_read_round_trip_and_formatting(tmp_path):
    cifar = _entry("deq_cifar", 0.8912, 0.5321, 0.4, dataset="cifar10", eps=8 / 255,
                   deq={"evaluated_state": "final", "f_evals_per_forward": 12,
                        "min_over_means_acc": 0.45, "grid_worst_case_acc": "43.50"})
    fmnist = _entry("deq_fmnist", 0.75, 0.5, None)
    assert cifar["clean_acc"] == "89.12" and cifar["autoattack_acc"] == "53.21"
    assert cifar["eps"] == "8/255" and fmnist["eps"] == "0.1"
    assert lb.format_eps(0.5, "cifar10") == "0.5"            # L2 radius: not k/255
    assert lb.format_eps(8 / 255, "fashion_mnist") == f"{8 / 255:g}"
    assert cifar["external"] == "40.00"                        # worst case < AutoAttack
    assert "external" not in fmnist                            # no worst case run
    assert "external" not in _entry("eq", 0.9, 0.5, 0.5)       # equal: nothing stronger
    assert cifar["deq"] == {"evaluated_state": "final", "f_evals_per_forward": 12.0,
                            "min_over_means_acc": "45.00", "grid_worst_case_acc": "43.50",
                            "autoattack_acc": "53.21", "worst_case_acc": "40.00"}
    assert cifar["threat_model"] == "Linf" and cifar["additional_data"] is False

    p1 = lb.write_entry(cifar, tmp_path)
    p2 = lb.write_entry(fmnist, tmp_path)
    assert p1 == tmp_path / "cifar10-Linf" / "deq_cifar.json"
    assert p2 == tmp_path / "fashion_mnist-Linf" / "deq_fmnist.json"
    text = p1.read_text()
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert text == json.dumps(cifar, indent=2, sort_keys=True) + "\n"
    assert list(json.loads(text)) == sorted(cifar)
    assert lb.read_entries(tmp_path / "cifar10-Linf") == [cifar]
    assert lb.read_entries(tmp_path / "fashion_mnist-Linf") == [fmnist]
    assert sorted(p.name for p in (tmp_path / "cifar10-Linf").iterdir()) == ["deq_cifar.json"]


# --------------------------------------------------------------------------------------------
# 3. sorting
# --------------------------------------------------------------------------------------------

def test_sort_uses_external_before_autoattack():
    entries = _three_entries()
    by_aa = sorted(entries, key=lambda e: -float(e["autoattack_acc"]))
    assert [e["name"] for e in by_aa] == ["deq_z7", "deq_z10", "resnet18_pgd"]
    assert [e["name"] for e in lb.sort_entries(entries)] == SORTED_NAMES
    assert [e["name"] for e in lb.sort_entries(reversed(entries))] == SORTED_NAMES
    # ties on the robust key: clean accuracy, then name
    ties = [_entry("b", 0.8, 0.5, None), _entry("a", 0.8, 0.5, None), _entry("c", 0.9, 0.5, None)]
    assert [e["name"] for e in lb.sort_entries(ties)] == ["c", "a", "b"]


# --------------------------------------------------------------------------------------------
# 4. read_entries errors name the file
# --------------------------------------------------------------------------------------------

def test_read_entries_rejects_bad_files_naming_them(tmp_path):
    folder = tmp_path / "fashion_mnist-Linf"
    good = _entry("good", 0.9, 0.5, None)
    lb.write_entry(good, tmp_path)

    missing = dict(good, name="missing")
    del missing["clean_acc"]
    (folder / "missing.json").write_text(json.dumps(missing))
    with pytest.raises(ValueError, match=r"missing\.json: missing required field\(s\): clean_acc"):
        lb.read_entries(folder)
    (folder / "missing.json").unlink()

    (folder / "broken.json").write_text('{"name": "broken", ')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON"):
        lb.read_entries(folder)
    (folder / "broken.json").unlink()

    (folder / "wrongtype.json").write_text(json.dumps(dict(good, name="wrongtype",
                                                           clean_acc=89.1)))
    with pytest.raises(ValueError, match=r"wrongtype\.json: field 'clean_acc' must be str, got 89\.1"):
        lb.read_entries(folder)
    (folder / "wrongtype.json").unlink()

    (folder / "renamed.json").write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"renamed\.json: field 'name' is 'good'"):
        lb.read_entries(folder)
    (folder / "renamed.json").unlink()

    (folder / "other.json").write_text(json.dumps(dict(good, name="other", dataset="cifar10")))
    with pytest.raises(ValueError, match=r"other\.json: dataset 'cifar10' does not match"):
        lb.read_entries(folder)
    (folder / "other.json").unlink()

    assert lb.read_entries(folder) == [good]


# --------------------------------------------------------------------------------------------
# 5. render: Markdown, CSV, HTML (static checks), CLI
# --------------------------------------------------------------------------------------------

def test_render_writes_md_csv_html(tmp_path, capsys):
    import pandas as pd

    folder, paths = _render_three(tmp_path)
    assert paths == {"md": folder / "leaderboard.md", "csv": folder / "leaderboard.csv",
                     "html": folder / "leaderboard.html"}
    assert all(p.is_file() for p in paths.values())

    md = paths["md"].read_text().splitlines()
    header = ("| rank | model | architecture | clean | AutoAttack | worst case (ALL) | "
              "min-over-means | f-evals/forward | evaluated state | defense | budget | flags |")
    i = md.index(header)
    assert md[i + 1].startswith("|---:|---|")
    rows = [line for line in md[i + 2:] if line.startswith("|")]
    assert [r.split(" | ")[1] for r in rows] == SORTED_NAMES
    assert rows[0] == ("| 1 | deq_z10 | MDEQ-tiny | 87.00 | 52.00 | 50.00 | - | 11.5 | z[10] | "
                       "entropy | standard | - |")
    assert rows[2] == ('| 3 | deq_z7 | MDEQ-tiny &lt;&&gt; "x" | 89.12 | 55.00 | 41.00 | 45.00 | '
                       '8 | z[7] | early-state | reduced (steps=20) | grad_masking |')
    assert lb.FOOTNOTE in paths["md"].read_text()

    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == [header for _, header in lb.COLUMNS]
    assert csv["model"].tolist() == SORTED_NAMES
    assert csv["rank"].tolist() == [1, 2, 3]
    assert csv["clean"].tolist() == [87.0, 90.0, 89.12]
    assert csv["AutoAttack"].tolist() == [52.0, 46.0, 55.0]
    assert csv["worst case (ALL)"].tolist() == [50.0, 46.0, 41.0]
    assert math.isnan(csv["min-over-means"][0]) and csv["min-over-means"][1:].tolist() == [47.0, 45.0]
    assert csv["f-evals/forward"][0] == 11.5 and math.isnan(csv["f-evals/forward"][1])
    for col in ("clean", "AutoAttack", "worst case (ALL)", "min-over-means", "f-evals/forward"):
        assert csv[col].dtype == float
    assert csv["flags"].tolist() == ["-", "-", "grad_masking"]

    html_text = paths["html"].read_text()
    # one self-contained file: inline CSS/JS, nothing fetched
    for needle in ("<link", " src=", "@import", "url(", "cdn", "//fonts."):
        assert needle not in html_text.lower(), needle
    assert "<style>" in html_text and "<script>" in html_text
    assert 'MDEQ-tiny <&> "x"' not in html_text                    # escaped
    assert "MDEQ-tiny &lt;&amp;&gt; &quot;x&quot;" in html_text
    page = _parse_html(html_text)
    assert [r["name"] for r in page.rows] == SORTED_NAMES
    assert page.caption == "Dataset: fashion_mnist \u00b7 threat model: Linf \u00b7 eps: 0.1"
    assert lb.FOOTNOTE in html_text
    assert page.rows[2]["cells"]["architecture"] == ('MDEQ-tiny <&> "x"', 'MDEQ-tiny <&> "x"')
    assert page.rows[2]["cells"]["clean"] == ("89.12", "89.12")

    # CLI
    assert lb.main(["render", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "rendered 3 entries" in out and str(paths["html"]) in out
    proc = subprocess.run([sys.executable, "-m", "benchmark.leaderboard", "render", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert str(paths["md"]) in proc.stdout


def test_render_cli_reports_bad_entry(tmp_path, capsys):
    folder = tmp_path / "fashion_mnist-Linf"
    folder.mkdir()
    (folder / "bad.json").write_text("{")
    assert lb.main(["render", str(folder)]) == 1
    assert "bad.json: malformed JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 6. RobustBench's own readers accept the files
# --------------------------------------------------------------------------------------------

def test_robustbench_readers_accept_our_entries(tmp_path, monkeypatch, capsys):
    """Exercises robustbench 1.1.1's own code on our JSON files:

    * ``robustbench.leaderboard.template.generate_leaderboard`` (json.load of every file, its
      ``external``-else-``autoattack_acc`` float sort) with its missing Jinja template
      (``leaderboard.html.j2`` is not in the wheel) replaced by a one-line DictLoader template;
    * ``robustbench.utils.get_leaderboard_latex`` (reads ./model_info, falls back from
      ``external`` to ``autoattack_acc``);
    * ``robustbench.utils.update_json`` (robustbench's writer) updating our file in place,
      after which our own reader still accepts it.

    robustbench only knows cifar10/cifar100/imagenet and the layout
    ``model_info/<dataset>/<threat>/``, so cifar10 entries are copied there.
    """
    import jinja2
    from model_zoo import compat

    compat.import_robustbench()                       # installs the autoattack shim first
    from robustbench.leaderboard import template
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench import utils as rb_utils

    entries = _three_entries(dataset="cifar10", eps=8 / 255)
    for entry in entries:
        lb.write_entry(entry, tmp_path / "leaderboards")
    ours = tmp_path / "leaderboards" / "cifar10-Linf"
    rb_folder = tmp_path / "model_info" / "cifar10" / "Linf"
    rb_folder.mkdir(parents=True)
    for path in ours.glob("*.json"):
        shutil.copy(path, rb_folder)

    # robustbench's fashion-mnist refusal (why the copy above is cifar10)
    with pytest.raises(ValueError, match="fashion_mnist"):
        BenchmarkDataset("fashion_mnist")

    tpl = ("{% for m in models %}{{ m.name }};{{ m.clean_acc }};{{ m[acc_field] }};"
           "{{ m.get('external', '') }};{{ m.eps }}\n{% endfor %}")
    monkeypatch.setattr(template, "PackageLoader",
                        lambda *a, **k: jinja2.DictLoader({"leaderboard.html.j2": tpl}))
    out = template.generate_leaderboard("cifar10", "Linf", models_folder=str(tmp_path / "model_info"))
    lines = [line.split(";") for line in out.strip().splitlines()]
    assert [line[0] for line in lines] == SORTED_NAMES
    by_name = {e["name"]: e for e in entries}
    for name, clean, aa, external, eps in lines:
        assert (clean, aa, external, eps) == (by_name[name]["clean_acc"],
                                              by_name[name]["autoattack_acc"],
                                              by_name[name].get("external", ""), "8/255")

    monkeypatch.chdir(tmp_path)                       # get_leaderboard_latex reads ./model_info
    latex = rb_utils.get_leaderboard_latex("cifar10", "Linf").splitlines()
    # each line: "<rank> &\citet{<file stem up to the first '_'>} & clean & external-or-AA & ..."
    cols = [line.split(" & ") for line in latex]
    assert [c[0] for c in cols] == ["1 &\\citet{deq}", "2 &\\citet{resnet18}", "3 &\\citet{deq}"]
    assert [(c[1], c[2]) for c in cols] == [("87.00", "50.00"), ("90.00", "46.00"),
                                            ("89.12", "41.00")]
    capsys.readouterr()                               # it prints the zoo's model names

    # robustbench's writer: eps becomes a float, accuracies str(round(x, 2)) ("90.0")
    rb_utils.update_json(BenchmarkDataset.cifar_10, ThreatModel.Linf, "resnet18_pgd",
                         0.90, 0.46, 8 / 255)
    updated = json.loads((rb_folder / "resnet18_pgd.json").read_text())
    assert updated["eps"] == pytest.approx(8 / 255) and updated["clean_acc"] == "90.0"
    assert updated["deq"] == by_name["resnet18_pgd"]["deq"]        # our fields survive
    shutil.copy(rb_folder / "resnet18_pgd.json", ours / "resnet18_pgd.json")
    assert [e["name"] for e in lb.sort_entries(lb.read_entries(ours))] == SORTED_NAMES
    # ... but it leaves `external` and deq.autoattack_acc stale when the accuracy changes;
    # our reader catches the disagreement.
    rb_utils.update_json(BenchmarkDataset.cifar_10, ThreatModel.Linf, "resnet18_pgd",
                         0.90, 0.40, 8 / 255)
    shutil.copy(rb_folder / "resnet18_pgd.json", ours / "resnet18_pgd.json")
    with pytest.raises(ValueError, match=r"resnet18_pgd\.json: field 'deq'\.autoattack_acc="
                                         r"'46\.00' disagrees with the top-level value '40\.0'"):
        lb.read_entries(ours)


# --------------------------------------------------------------------------------------------
# 7. the HTML page in headless Chromium (JS sorting)
# --------------------------------------------------------------------------------------------

def _chromium():
    env = os.environ.get("DEQBENCH_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _dump_dom(binary, url, profile):
    proc = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--no-first-run",
                           "--no-default-browser-check", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _parse_html(proc.stdout)


def test_html_sorts_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("headless Chromium not found (no `chromium` or `chromium-browser` on PATH); "
                    "install it with `apt-get install -y chromium` (Debian/Ubuntu) or set "
                    "DEQBENCH_CHROMIUM=/path/to/chromium")
    folder, paths = _render_three(tmp_path)
    url = paths["html"].resolve().as_uri()
    profile = tmp_path / "chromium-profile"
    entries = {e["name"]: e for e in lb.read_entries(folder)}

    page = _dump_dom(binary, url, profile)
    assert page.table_attrs.get("data-js") == "ready", "the page's script did not run"
    assert [r["name"] for r in page.rows] == SORTED_NAMES
    assert [r["rank"] for r in page.rows] == ["1", "2", "3"]
    assert page.caption == "Dataset: fashion_mnist \u00b7 threat model: Linf \u00b7 eps: 0.1"
    for row in page.rows:
        entry = entries[row["name"]]
        deq = entry["deq"]
        cells = row["cells"]
        assert cells["model"][1] == entry["name"]
        assert cells["architecture"][1] == entry["architecture"]
        assert float(cells["clean"][0]) == float(entry["clean_acc"])
        assert cells["clean"][1] == entry["clean_acc"]
        assert cells["autoattack"][1] == entry["autoattack_acc"]
        assert cells["worst_case"][1] == deq["worst_case_acc"]
        assert cells["min_over_means"][1] == deq.get("min_over_means_acc", "-")

    cases = [
        ("#sort=clean&dir=asc", "clean", "asc", ["deq_z10", "deq_z7", "resnet18_pgd"]),
        ("#sort=clean&dir=desc", "clean", "desc", ["resnet18_pgd", "deq_z7", "deq_z10"]),
        # missing values (deq_z10 has no min-over-means) go last in both directions
        ("#sort=min_over_means&dir=asc", "min_over_means", "asc",
         ["deq_z7", "resnet18_pgd", "deq_z10"]),
        ("#sort=min_over_means&dir=desc", "min_over_means", "desc",
         ["resnet18_pgd", "deq_z7", "deq_z10"]),
        # the click handler: first click on a text column ascending (natural: z7 < z10),
        # a second click toggles
        ("#click=model", "model", "asc", ["deq_z7", "deq_z10", "resnet18_pgd"]),
        ("#click=model,model", "model", "desc", ["resnet18_pgd", "deq_z10", "deq_z7"]),
        # numeric column: first click descending; rank restores the leaderboard order
        ("#click=f_evals", "f_evals", "desc", ["deq_z10", "deq_z7", "resnet18_pgd"]),
        ("?sort=clean&dir=asc#click=rank", "rank", "asc", SORTED_NAMES),
    ]
    for suffix, key, direction, expected in cases:
        if suffix.startswith("?"):
            query, _, fragment = suffix.partition("#")
            target = url + query + ("#" + fragment if fragment else "")
        else:
            target = url + suffix
        page = _dump_dom(binary, target, profile)
        assert page.table_attrs.get("data-sort-key") == key, suffix
        assert page.table_attrs.get("data-sort-dir") == direction, suffix
        assert [r["name"] for r in page.rows] == expected, suffix
