"""The committed leaderboard, rendered from committed results alone, and its CI check.

``leaderboards/fashion_mnist-Linf/`` is derived, never edited: its results live in
``results/fmnist_zoo_1000/`` (the archive of ``configs/eval/fmnist_zoo_1000.yaml``, committed
unit by unit while the run goes, see :mod:`benchmark.archive`) and, for the reduced-vs-full gap,
``results/fmnist_zoo_1000_full/``. This module rebuilds the results databases from those archives
into a scratch folder and writes the leaderboard (entries, MD/CSV/HTML, claims), the per-example
export, the gap table and the figures into the leaderboard folder::

    python -m benchmark.publish            # write (refuses an incomplete run)
    python -m benchmark.publish --check    # re-render into a temporary folder, compare (CI)

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


def publish(partial: bool = False, folder: str = FOLDER, archive: str = ARCHIVE,
            full_archive: str = FULL_ARCHIVE, figures: bool = True) -> Path:
    """Render into a fresh folder, then replace the committed leaderboard folder with it."""
    dest = _abs(folder)
    with tempfile.TemporaryDirectory(prefix="deqbench_publish_") as tmp:
        new = render(Path(tmp) / "out", Path(tmp) / "work", partial=partial, archive=archive,
                     full_archive=full_archive, figures=figures)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(new, dest)
    return dest


def check(folder: str = FOLDER, archive: str = ARCHIVE, full_archive: str = FULL_ARCHIVE,
          figures_required: bool = True, partial: bool = False) -> list:
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
