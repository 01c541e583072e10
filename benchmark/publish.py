"""The committed leaderboard, rendered from committed results alone, and its CI check.

``leaderboards/fashion_mnist-Linf/`` is derived, never edited: its results live in
``results/fmnist_zoo_1000/`` (the archive of ``configs/eval/fmnist_zoo_1000.yaml``, committed
unit by unit while the run goes, see :mod:`benchmark.archive`) and, for the reduced-vs-full gap,
``results/fmnist_zoo_1000_full/``. This module rebuilds the results databases from those archives
into a scratch folder and writes the leaderboard (entries, MD/CSV/HTML, claims), the per-example
export, the gap table and the figures into the leaderboard folder::

    python -m benchmark.publish            # write (refuses an incomplete run)
    python -m benchmark.publish --check    # re-render into a temporary folder, compare (CI)

Publishing the default folder also rewrites the README's block between :data:`README_BEGIN` and
:data:`README_END` (:func:`readme_block`: the table with intervals, what n resolves, the
neighbouring ranks' paired tests, the claims' verdicts and the reduced-vs-full gap), so the
README can never show other numbers than the folder; ``--check`` compares that block too.

``make leaderboard`` continues the runs (resumable, hours) and then publishes. The check
compares every text file and the export byte for byte (the figures' PNGs are only required to
exist: their bytes depend on the matplotlib build); it exits 1 naming the files that differ.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = "results/fmnist_zoo_1000"
FULL_ARCHIVE = "results/fmnist_zoo_1000_full"
FOLDER = "leaderboards/fashion_mnist-Linf"
FIGURES = ("fig3a_deq_tiny_fmnist_trades_sec33__final.png", "fig3c_deviation.png")
README = "README.md"
README_BEGIN = "<!-- committed-leaderboard:begin (written by python -m benchmark.publish) -->"
README_END = "<!-- committed-leaderboard:end -->"
#: files of the leaderboard folder compared byte for byte by --check
CHECKED_SUFFIXES = (".md", ".csv", ".html", ".json", ".gz")


class PublishError(RuntimeError):
    pass


def _abs(p) -> Path:
    return Path(p) if Path(p).is_absolute() else REPO / p


def archive_status(archive) -> dict:
    """``{'exists', 'complete', 'units', 'config_hash', 'n'}`` of an archive folder."""
    root = _abs(archive)
    meta_p = root / "run.json"
    if not meta_p.is_file():
        return {"exists": False, "complete": False, "units": 0}
    meta = json.loads(meta_p.read_text())
    units = len(list((root / "units").rglob("*.jsonl.gz")))
    return {"exists": True, "complete": bool(meta.get("complete")), "units": units,
            "config_hash": meta.get("config_hash"), "n": (meta.get("dataset") or {}).get("n")}


def render(out_folder: Path, work: Path, figures: bool = True, partial: bool = False,
           archive: str = ARCHIVE, full_archive: str = FULL_ARCHIVE) -> Path:
    """Rebuild the databases under ``work`` from the committed archives and write the whole
    leaderboard folder into ``out_folder`` (created, must be empty or missing)."""
    from benchmark.archive import rebuild
    from benchmark.report.export import write_export
    from benchmark.reports import leaderboard_from_db
    st = archive_status(archive)
    if not st["exists"]:
        raise PublishError(f"{archive}/run.json not found: run `make leaderboard` first")
    if not st["complete"] and not partial:
        raise PublishError(f"{archive} is incomplete ({st['units']} units archived): continue it "
                           "with `make leaderboard` (resumable)")
    db = work / "reduced" / "results.sqlite"
    rebuild(_abs(archive), db)
    root = work / "root"
    paths = leaderboard_from_db(db, root=root)
    built = paths[0].parent
    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(built.iterdir()):
        shutil.copy(p, out_folder / p.name)
    write_export(db, out_folder / "export.csv.gz")
    full = archive_status(full_archive)
    if full["exists"] and (full["complete"] or partial):
        from benchmark.report.gap import write_gap
        fdb = work / "full" / "results.sqlite"
        rebuild(_abs(full_archive), fdb)
        write_gap(db, fdb, out=out_folder)
    if figures:
        from benchmark.figures import main as figures_main
        figures_main([str(db.parent), "--out", str(work / "figures")])
        for name in FIGURES:
            f = work / "figures" / name
            if f.is_file():
                shutil.copy(f, out_folder / name)
    return out_folder


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _with_ci(v, ci) -> str:
    return "-" if v is None else (f"{v:.2f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""))


def readme_block(folder, label: Optional[str] = None) -> str:
    """The README's summary of a published leaderboard folder (Markdown, no markers): one table
    row per entry with exact 95% intervals, one sentence on what this n resolves, the
    neighbouring ranks that the paired test separates, each claim's verdict and, when the
    folder holds ``gap.json``, the points the reduced budgets miss (ALL rows)."""
    from benchmark.leaderboard import paired_sections, read_entries, table_rows
    from benchmark.report.stats import resolvable_difference
    folder = Path(folder)
    entries = read_entries(folder)
    rows = table_rows(entries)
    ns = sorted({r["n"] for r in rows if r["n"]})
    lines = ["| rank | model | defense | clean [95% CI] | AutoAttack [95% CI] | **ALL** [95% CI] "
             "| min over means [95% CI] | f-evals / forward | flags |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rank = str(r["rank"]) if r["section"] == "main" else f"T{r['rank']}"
        lines.append(
            f"| {rank} | {r['model']} | {r['defense_short']} | "
            f"{_with_ci(r['clean'], r['clean_ci'])} | "
            f"{_with_ci(r['autoattack'], r['autoattack_ci'])} | "
            f"**{_with_ci(r['worst_case'], r['worst_case_ci'])}** | "
            f"{_with_ci(r['min_over_means'], r['min_over_means_ci'])} | "
            f"{'-' if r['f_evals'] is None else format(r['f_evals'], 'g')} | {r['flags']} |")
    e0 = entries[0] if entries else {}
    sources = sorted({(e.get("deq") or {}).get("data_source") for e in entries} - {None})
    where = label or (FOLDER if folder.resolve() == _abs(FOLDER).resolve() else str(folder))
    intro = (f"The committed leaderboard (`{where}/`, rendered by `python -m benchmark.publish` "
             f"from `results/` alone and checked in CI): "
             f"{'; '.join(sources) or e0.get('dataset', '?')}, {e0.get('threat_model', '?')} eps = "
             f"{e0.get('eps', '?')}, preset `reference` for every surrogate and defense, "
             "reduced attack budgets (labelled in every entry); accuracies in %, with exact 95% "
             "Clopper-Pearson intervals. ALL is the per-example worst case over every attack run "
             "on the entry: an example counts only if it is correct clean and under every attack.")
    out = [intro, ""] + lines + [""]
    if len(ns) == 1:
        n = ns[0]
        rd = resolvable_difference(n)
        out.append(f"Ranks T1, T2, ... are the test-time defenses (Sec. 3.2), ranked separately. "
                   f"**What n = {n:,} resolves:** one example is {100 / n:.2f} points, a 50% "
                   f"accuracy carries a 95% interval of \u00b1{100 * rd['half_width']:.1f} "
                   f"points, and two entries measured on the same examples differ significantly "
                   f"(exact McNemar, two-sided 0.05) only when at least {rd['min_discordant']} "
                   f"discordant examples ({100 * rd['min_diff']:.1f} points) separate them all in "
                   f"one direction (more when some go the other way).")
        out.append("")
    neigh = [c for c in paired_sections(entries)["neighbours"] if c["comparison"]]
    if neigh:
        sep = [c for c in neigh if c["comparison"]["p"] < 0.05]
        tell = "; ".join(f"{c['a']} vs {c['b']}: "
                         f"{100 * c['comparison']['diff']:+.1f} points, McNemar p = "
                         f"{c['comparison']['p']:.2g}" for c in sep)
        out.append(f"Of the {len(neigh)} neighbouring pairs in the overall order by ALL (test-time "
                   "defenses included; paired), "
                   + (f"{len(sep)} {'is' if len(sep) == 1 else 'are'} separated at 0.05: {tell}; "
                      "every other neighbouring difference is inconclusive at this n."
                      if sep else "none is separated at 0.05: all inconclusive at this n."))
    cl = folder / "claims.json"
    if cl.is_file():
        claims = json.loads(cl.read_text()).get("claims") or []
        out += ["", "The paper's claims (`claims.md`: the tests, effects, intervals, raw and "
                "Holm-adjusted p):", ""]
        from benchmark.report.claims import tally
        out += [f"{c['id']}. {c['title']}: **{c['verdict']}** ({tally(c)} tests)"
                for c in claims]
    gp = folder / "gap.json"
    if gp.is_file():
        from benchmark.report.gap import table_lines
        g = json.loads(gp.read_text())
        out += ["", f"What the reduced budgets miss (`gap.md`; full run: {g['full_budget']['grid']}"
                f"; AutoAttack {g['full_budget']['autoattack']}), paired on the same examples:",
                ""] + table_lines(g["rows"])
    return "\n".join(out).rstrip() + "\n"


def readme_with_block(text: str, block: str) -> str:
    """``text`` (the README) with the part between the markers replaced by ``block``."""
    if README_BEGIN not in text or README_END not in text:
        raise PublishError(f"{README}: the markers {README_BEGIN!r} / {README_END!r} are missing")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return head + README_BEGIN + "\n" + block + README_END + tail


def publish(partial: bool = False, folder: str = FOLDER, archive: str = ARCHIVE,
            full_archive: str = FULL_ARCHIVE, figures: bool = True,
            readme: Optional[bool] = None) -> Path:
    """Render into a fresh folder, then replace the committed leaderboard folder with it (and,
    for the default folder of a complete run, the README's block: ``readme=None``)."""
    if readme is None:
        readme = folder == FOLDER and not partial
    dest = _abs(folder)
    if readme:
        readme_with_block((REPO / README).read_text(), "")   # the markers exist (else: raise)
    with tempfile.TemporaryDirectory(prefix="deqbench_publish_") as tmp:
        new = render(Path(tmp) / "out", Path(tmp) / "work", partial=partial, archive=archive,
                     full_archive=full_archive, figures=figures)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(new, dest)
    if readme:
        rp = REPO / README
        rp.write_text(readme_with_block(rp.read_text(), readme_block(dest, label=folder)))
    return dest


def check(folder: str = FOLDER, archive: str = ARCHIVE, full_archive: str = FULL_ARCHIVE,
          figures_required: bool = True, partial: bool = False,
          readme: Optional[bool] = None) -> list:
    """Re-render from the committed archives and compare with the committed folder: the list of
    differences (empty = identical)."""
    dest = _abs(folder)
    with tempfile.TemporaryDirectory(prefix="deqbench_check_") as tmp:
        new = render(Path(tmp) / "out", Path(tmp) / "work", figures=False, archive=archive,
                     full_archive=full_archive, partial=partial)
        diffs = []
        names = {p.name for p in new.iterdir()} | {p.name for p in dest.iterdir()}
        for name in sorted(names):
            a, b = new / name, dest / name
            if not name.endswith(CHECKED_SUFFIXES):   # figures (PNG): only required to exist
                continue
            if not b.is_file():
                diffs.append(f"{folder}/{name}: missing from the committed folder")
            elif not a.is_file():
                diffs.append(f"{folder}/{name}: committed but no longer rendered (stale)")
            elif a.read_bytes() != b.read_bytes():
                diffs.append(f"{folder}/{name}: differs from its re-rendering")
        for name in (FIGURES if figures_required else ()):
            if not (dest / name).is_file():
                diffs.append(f"{folder}/{name}: figure missing")
        if readme is None:
            readme = folder == FOLDER
        if readme:
            text = (REPO / README).read_text()
            try:
                if readme_with_block(text, readme_block(new, label=folder)) != text:
                    diffs.append(f"{README}: its committed-leaderboard block differs from the "
                                 "re-rendering")
            except PublishError as e:
                diffs.append(str(e))
    return diffs


def main(argv: Optional[list] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m benchmark.publish",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="re-render into a temporary folder and compare (exit 1 on a difference)")
    ap.add_argument("--partial", action="store_true",
                    help="publish an incomplete run's finished units (not for the committed "
                         "leaderboard)")
    ap.add_argument("--folder", default=FOLDER, help=f"leaderboard folder (default {FOLDER})")
    ap.add_argument("--archive", default=ARCHIVE, help=f"the run's archive (default {ARCHIVE})")
    ap.add_argument("--full-archive", default=FULL_ARCHIVE,
                    help=f"the full-budget run's archive (default {FULL_ARCHIVE})")
    args = ap.parse_args(argv)
    kw = dict(folder=args.folder, archive=args.archive, full_archive=args.full_archive)
    try:
        if args.check:
            diffs = check(**kw)
            for d in diffs:
                print(d, file=sys.stderr)
            if diffs:
                print("the committed leaderboard is not what its committed results render to: "
                      "run `python -m benchmark.publish` and commit", file=sys.stderr)
                return 1
            print(f"{args.folder}: identical to its re-rendering from {args.archive}")
            return 0
        dest = publish(partial=args.partial, **kw)
        print(f"published {dest}")
        return 0
    except PublishError as e:
        print(f"deqbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
