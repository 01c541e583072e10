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
                    "min_over_means_acc": 0.45, "n_examples": 10000, "commit": "abc123",
                    "data_source": "fashion-mnist test subset n=10000 seed 0",
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
        self.body_attrs = {}
        self._in_tbody = self._in_caption = self._in_table = False
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "table" and attrs.get("id") in ("leaderboard", "leaderboard-ttd"):
            if attrs.get("id") == "leaderboard":   # the test-time defenses' table follows it
                self.table_attrs = attrs
            self._in_table = True
        elif tag == "body":
            self.body_attrs = attrs
        elif not self._in_table:
            return
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
        if tag == "table":
            self._in_table = False
        elif tag == "caption":
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
    mask = os.umask(0)
    os.umask(mask)
    assert p1.stat().st_mode & 0o777 == 0o666 & ~mask          # not mkstemp's 0600
    for other in ("claims.json", "gap.json"):                  # published beside the entries
        (tmp_path / "fashion_mnist-Linf" / other).write_text('{"claims": []}')
    assert lb.read_entries(tmp_path / "fashion_mnist-Linf") == [fmnist]


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

    from benchmark.report.stats import clopper_pearson

    md = paths["md"].read_text().splitlines()
    header = ("| rank | model | architecture | clean [95% CI] | AutoAttack [95% CI] | "
              "worst case (ALL) [95% CI] | min-over-means [95% CI] | f-evals/forward | "
              "evaluated state | defense | budget | flags | n |")
    i = md.index(header)
    assert md[i + 1].startswith("|---:|---|")
    rows = [line for line in md[i + 2:] if line.startswith("| ") and " vs " not in line]
    rows = rows[:3]
    assert [r.split(" | ")[1] for r in rows] == SORTED_NAMES
    # no n: no interval; deq_z7 (n = 10000): every accuracy with its Clopper-Pearson interval
    assert rows[0] == ("| 1 | deq_z10 | MDEQ-tiny | 87.00 | 52.00 | 50.00 | - | 11.5 | z[10] | "
                       "entropy | standard | - | - |")

    def ci(k, n=10000):
        lo, hi = clopper_pearson(k, n)
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    assert rows[2] == (f'| 3 | deq_z7 | MDEQ-tiny &lt;&&gt; "x" | 89.12 {ci(8912)} | '
                       f'55.00 {ci(5500)} | 41.00 {ci(4100)} | 45.00 {ci(4500)} | '
                       '8 | z[7] | early exit z[7] | reduced (steps=20) | grad_masking | 10000 |')
    text = paths["md"].read_text()
    assert lb.FOOTNOTE in text
    # the two-line description: dataset, threat model, n, budget level, how ALL is defined
    assert "Linf threat model, eps = 0.1, n = 10000 per entry, attack budget: reduced, standard" in text
    assert "ALL = per-example worst case over every attack run" in text

    csv = pd.read_csv(paths["csv"])
    expected_cols = []
    for key, head in lb.COLUMNS:
        expected_cols.append(head)
        if key in ("clean", "autoattack", "worst_case", "min_over_means"):
            expected_cols += [f"{head} 95% CI low", f"{head} 95% CI high"]
    assert list(csv.columns) == expected_cols + ["defense key", "section", "adaptive protocol"]
    assert csv["section"].tolist() == ["main"] * 3    # no test-time defense among them
    lo, hi = clopper_pearson(8912, 10000)
    assert csv["clean 95% CI low"][2] == pytest.approx(round(100 * lo, 2))
    assert csv["clean 95% CI high"][2] == pytest.approx(round(100 * hi, 2))
    assert math.isnan(csv["clean 95% CI low"][0])
    assert csv["defense"].tolist() == ["entropy", "no defense: the final state z* of the "
                                       "fixed-point solve", "early-state exit: logits of z[7]"]
    assert csv["defense key"].tolist()[2] == "early-state"
    assert csv["model"].tolist() == SORTED_NAMES
    assert csv["rank"].tolist() == [1, 2, 3]
    assert csv["clean"].tolist() == [87.0, 90.0, 89.12]
    assert csv["AutoAttack"].tolist() == [52.0, 46.0, 55.0]
    assert csv["worst case (ALL)"].tolist() == [50.0, 46.0, 41.0]
    assert math.isnan(csv["min-over-means"][0]) and csv["min-over-means"][1:].tolist() == [47.0, 45.0]
    assert csv["f-evals/forward"][0] == 11.5 and math.isnan(csv["f-evals/forward"][1])
    for col in ("clean", "AutoAttack", "worst case (ALL)", "min-over-means", "f-evals/forward"):
        assert csv[col].dtype == float
    # '-': checked, nothing raised; 'not checked': no obfuscation check ran (resnet18_pgd)
    assert csv["flags"].tolist() == ["-", "not checked", "grad_masking"]

    html_text = paths["html"].read_text()
    # one self-contained file: inline CSS/JS, nothing fetched
    for needle in ("<link", " src=", "@import", "url(", "cdn", "//fonts."):
        assert needle not in html_text.lower(), needle
    assert "<style>" in html_text and "<script>" in html_text
    assert 'MDEQ-tiny <&> "x"' not in html_text                    # escaped
    assert "MDEQ-tiny &lt;&amp;&gt; &#34;x&#34;" in html_text         # Jinja2 autoescape
    page = _parse_html(html_text)
    assert [r["name"] for r in page.rows] == SORTED_NAMES
    assert page.caption == "Dataset: fashion_mnist \u00b7 threat model: Linf \u00b7 eps: 0.1"
    assert lb.FOOTNOTE in html_text
    assert page.rows[2]["cells"]["architecture"] == ('MDEQ-tiny <&> "x"', 'MDEQ-tiny <&> "x"')
    assert page.rows[2]["cells"]["clean"] == ("89.12", f"89.12 {ci(8912)}")
    assert page.rows[0]["cells"]["clean"] == ("87.0", "87.00")
    assert "<h1>deqbench leaderboard: fashion_mnist, Linf, eps = 0.1</h1>" in html_text
    assert html_text.count('<p class="description">') >= 2

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
        assert cells["model"][1] == entry["name"].partition("+")[0]
        assert cells["architecture"][1] == entry["architecture"]
        assert float(cells["clean"][0]) == float(entry["clean_acc"])
        cis = deq.get("ci95", {})

        def shown(value, key):
            ci = cis.get(key)
            return value if ci is None else f"{value} [{ci[0]:.1f}, {ci[1]:.1f}]"
        assert cells["clean"][1] == shown(entry["clean_acc"], "clean")
        assert cells["autoattack"][1] == shown(entry["autoattack_acc"], "autoattack")
        assert cells["worst_case"][1] == shown(deq["worst_case_acc"], "ALL")
        assert cells["min_over_means"][1] == shown(deq.get("min_over_means_acc", "-"),
                                                   "min_over_means")

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


# --------------------------------------------------------------------------------------------
# intervals, paired comparisons, page width
# --------------------------------------------------------------------------------------------

def test_claims_json_beside_the_entries_is_not_an_entry(tmp_path):
    folder, _ = _render_three(tmp_path)
    (folder / "claims.json").write_text(json.dumps({"claims": []}))
    assert [e["name"] for e in lb.read_entries(folder)] == ["deq_z10", "deq_z7", "resnet18_pgd"]
    assert lb.main(["render", str(folder)]) == 0


def test_make_entry_fills_counts_and_clopper_pearson_intervals():
    from benchmark.report.stats import clopper_pearson
    e = _entry("deq_n48", 29 / 48, 21 / 48, 20 / 48,
               deq={"n_examples": 48, "min_over_means_acc": 22 / 48})
    deq = e["deq"]
    assert deq["counts"] == {"clean": 29, "autoattack": 21, "ALL": 20, "min_over_means": 22}
    lo, hi = clopper_pearson(21, 48)
    assert deq["ci95"]["autoattack"] == [round(100 * lo, 2), round(100 * hi, 2)] == [29.48, 58.82]
    assert deq["ci95"]["ALL"][0] < 100 * 20 / 48 < deq["ci95"]["ALL"][1]
    # an accuracy that is no count out of n is refused, naming the field
    with pytest.raises(ValueError, match=r"clean_acc = 0.5 is not a count out of n_examples = 7"):
        _entry("bad", 0.5, 3 / 7, None, deq={"n_examples": 7})
    bad = json.loads(json.dumps(e))
    bad["deq"]["ci95"]["ALL"] = [60.0, 50.0]
    with pytest.raises(ValueError, match=r"ci95\['ALL'\] must be \[lo, hi\]"):
        lb.validate_entry(bad)
    bad = json.loads(json.dumps(e))
    bad["deq"]["outcomes"] = {"examples": [1, 2], "ALL": "101"}
    with pytest.raises(ValueError, match=r"outcomes\['ALL'\] must be a string of 0/1"):
        lb.validate_entry(bad)


def _outcome_entry(name, clean_bits, all_bits, examples=None, defense="final", **fams):
    n = len(all_bits)
    examples = examples or list(range(100, 100 + n))
    k_all, k_clean = all_bits.count("1"), clean_bits.count("1")
    return _entry(name, k_clean / n, k_all / n, k_all / n,
                  deq={"n_examples": n, "defense": defense,
                       "outcomes": {"examples": examples, "clean": clean_bits, "ALL": all_bits,
                                    **fams}})


def test_paired_sections_by_value():
    # top: 20/24 robust; second: the same except 7 examples only top gets and 2 only second
    top_all = "1" * 20 + "0" * 4
    sec_all = "1" * 13 + "0" * 7 + "11" + "00"
    third = "1" * 13 + "0" * 11            # = second minus its 2: discordant 2 vs 0
    es = [_outcome_entry("m_a", "1" * 24, top_all, pgd=top_all, grid="1" * 20 + "0" * 4),
          _outcome_entry("m_b", "1" * 24, sec_all),
          _outcome_entry("m_b+entropy_reduction", "1" * 24, third, defense="entropy_reduction")]
    sec = lb.paired_sections(es)
    n1, n2 = sec["neighbours"]
    assert (n1["a"], n1["b"], n1["rank_a"], n1["rank_b"]) == ("m_a", "m_b", 1, 2)
    c = n1["comparison"]
    assert (c["b"], c["c"], c["n"]) == (7, 2, 24)
    assert c["diff"] == pytest.approx(5 / 24) and c["p"] == pytest.approx(92 / 512)
    assert c["conclusion"] == "inconclusive at this n"
    assert c["ci95"][0] < 0 < c["ci95"][1]
    assert (n2["comparison"]["b"], n2["comparison"]["c"]) == (2, 0)
    # defense vs the same model undefended, in words
    d_all, d_clean = sec["defense"]
    assert (d_all["a"], d_all["b"], d_all["what"]) == ("m_b+entropy_reduction", "m_b", "ALL")
    assert d_all["comparison"]["diff"] == pytest.approx(-2 / 24)
    assert d_all["defense"].startswith("Sec. 3.2 entropy reduction (Tf=2, R=10)")
    assert d_clean["comparison"]["diff"] == 0 and d_clean["comparison"]["p"] == 1.0
    # Sec. 3.3 vs its baseline: only when both X_sec33 and X are on the board
    assert sec["sec33"] == []
    s33 = lb.paired_sections(es + [_outcome_entry("m_b_sec33", "1" * 24, top_all)])["sec33"]
    assert [(it["a"], it["b"]) for it in s33] == [("m_b_sec33", "m_b")]
    assert (s33[0]["comparison"]["b"], s33[0]["comparison"]["c"]) == (7, 2)
    # attack vs attack within an entry: pgd vs grid on m_a (4 zeros at the same places)
    (att,) = sec["attacks"]
    assert (att["entry"], att["a"], att["b"]) == ("m_a", "pgd", "grid")
    assert att["comparison"]["diff"] == 0
    # the matrix is antisymmetric in the difference, symmetric in p
    m = sec["matrix"]
    assert m["names"] == ["m_a", "m_b", "m_b+entropy_reduction"]
    assert m["diff"][0][1] == pytest.approx(-m["diff"][1][0]) and m["p"][0][1] == m["p"][1][0]
    # a clear gap is called by its direction; only common examples are paired
    strong = [_outcome_entry("s_a", "1" * 24, "1" * 20 + "0" * 4),
              _outcome_entry("s_b", "1" * 24, "0" * 24)]
    assert lb.paired_sections(strong)["neighbours"][0]["comparison"]["conclusion"] == "first higher"
    shifted = [_outcome_entry("s_a", "1" * 24, "1" * 24),
               _outcome_entry("s_c", "1" * 24, "0" * 24, examples=list(range(112, 136)))]
    assert lb.paired_sections(shifted)["neighbours"][0]["comparison"]["n"] == 12
    # no outcomes: said so, not invented
    assert lb.paired_sections(_three_entries())["neighbours"][0]["comparison"] is None


@pytest.mark.parametrize("defense, params, short", [
    ("final", None, "none"),
    ("early:select", {"index": 4, "selection": {}}, "early exit z[4]"),
    ('{"name": "entropy_reduction", "r": 5, "tf": 4}', None, "Sec. 3.2 (Tf=4, R=5)"),
    ("entropy_reduction", {"tf": 2, "r": 10, "readout": {"name": "final"}}, "Sec. 3.2 (Tf=2, R=10)"),
])
def test_defense_words_never_raw_json(defense, params, short):
    s, long = lb.defense_words(defense, params)
    assert s == short
    assert "{" not in s + long and '"' not in s + long


def _committed_like_folder(tmp_path):
    """The committed leaderboard's entries (ten rows, the longest names) with outcomes."""
    src = REPO / "leaderboards" / "fashion_mnist-Linf"
    folder = tmp_path / "fashion_mnist-Linf"
    folder.mkdir()
    import random
    rng = random.Random(0)
    for p in sorted(src.glob("*.json")):
        if p.name in lb.NON_ENTRY_FILES:
            continue
        e = json.loads(p.read_text())
        deq = e["deq"]
        n = deq["n_examples"]
        k = round(float(deq["worst_case_acc"]) * n / 100)
        bits = ["1"] * k + ["0"] * (n - k)
        rng.shuffle(bits)
        kc = round(float(e["clean_acc"]) * n / 100)
        deq["outcomes"] = {"examples": list(range(n)), "ALL": "".join(bits),
                           "clean": "1" * kc + "0" * (n - kc)}
        (folder / p.name).write_text(json.dumps(e))
    return folder


def test_html_one_line_per_row_at_1400px_in_headless_chromium(tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("headless Chromium not found; install it with `apt-get install -y chromium`")
    folder = _committed_like_folder(tmp_path)
    paths = lb.render(folder)
    html_text = paths["html"].read_text()
    assert '{"name"' not in html_text.split("<script>")[0].split('title="')[0]
    url = paths["html"].resolve().as_uri()
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--no-first-run", "--window-size=1400,900",
                           "--hide-scrollbars", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = _parse_html(proc.stdout)
    assert page.table_attrs.get("data-js") == "ready"
    assert len(page.rows) == len(list(folder.glob("*.json"))) >= 10
    width = int(page.body_attrs["data-scroll-width"])
    tallest = int(page.body_attrs["data-max-row-height"])
    assert width <= 1400, f"the page scrolls horizontally at 1400 px: scrollWidth {width}"
    assert tallest <= 36, f"a row wraps onto several lines: {tallest} px tall"
    for row in page.rows:   # defenses in words; intervals visible
        assert "{" not in row["cells"]["defense"][1]
        assert "[" in row["cells"]["worst_case"][1]
    shot = tmp_path / "leaderboard.png"
    proc = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--no-first-run", "--window-size=1400,900",
                           "--hide-scrollbars", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(head[16:20], "big") == 1400      # IHDR width
    if os.environ.get("DEQBENCH_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["DEQBENCH_KEEP_SCREENSHOT"])


def test_committed_leaderboard_rerenders_identically(tmp_path):
    """The CI check: the committed leaderboard.md/.csv/.html are exactly what the committed
    entries render to (nobody edited them by hand, nothing is stale)."""
    src = REPO / "leaderboards" / "fashion_mnist-Linf"
    folder = tmp_path / src.name
    folder.mkdir()
    for p in src.glob("*.json"):
        shutil.copy(p, folder / p.name)
    paths = lb.render(folder)
    assert {e["name"] + ".json" for e in lb.read_entries(folder)} == \
        {p.name for p in src.glob("*.json")} - set(lb.NON_ENTRY_FILES)
    for kind, path in paths.items():
        assert path.read_text() == (src / path.name).read_text(), \
            f"{src / path.name} is stale: run python -m benchmark.leaderboard render {src}"
    for p in (q for q in src.glob("*.json") if q.name not in lb.NON_ENTRY_FILES):
        # every committed accuracy carries n and its interval
        deq = json.loads(p.read_text())["deq"]
        assert deq["n_examples"] >= 1 and set(deq["ci95"]) >= {"clean", "autoattack", "ALL"}
