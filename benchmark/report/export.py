"""Per-example export of a run: ``deqbench export RUN`` -> ``RUN/export.csv.gz``.

One row per (entry, example): every number of the run's leaderboard is a mean (or minimum of
means) of these columns, so anyone can recompute the leaderboard from this file alone
(``pandas.read_csv("export.csv.gz")``). Gzipped CSV rather than Parquet: pyarrow is not a
dependency of the project and the table is small (about 1 kB per example and entry).

Columns
-------
``entry``                the leaderboard entry name (model + defense)
``model``, ``defense``   the model key and the stored defense key
``checkpoint_sha256``    SHA-256 of the model's checkpoint file (zoo registry; empty if unknown)
``example``              index of the image in the dataset's test split
``image_sha256``         SHA-256 of the image's bytes: the (C, H, W) uint8 array, row-major
                         (empty when the dataset cannot be read here)
``label``                the true class
``clean_correct``        1 if the reported forward classifies the clean image correctly
``<family>_correct``     1 if robust under that attack family (pgd, grid [worst case over the
                         grid settings run], autoattack, adaptive, checks, top_settings,
                         transfer); 0 for clean-misclassified images; empty if not run
``<family>_margin``      the reported margin logit_y - max_{j != y} logit_j at the family's
                         adversarial example (minimum over its records; empty if not stored)
``grid:<setting>``       1/0 under one grid setting ui(i, Ka, lambda); empty where the setting
                         did not attack that image (efficient mode)
``ALL_correct``          the per-example worst case over every family (the leaderboard's ALL)
``broken_by``            the first family (in the order above) that broke the image,
                         ``clean`` if misclassified without attack, empty if robust
``nfev_nograd``, ``nfev_grad``  f_theta evaluations without / with a graph, summed over the
                         image's records (clean pass included)
``f_evals_clean``        f_theta evaluations of the clean forward (the leaderboard's f-evals)
``wall_s``               wall seconds spent on the image (its units' time split evenly)
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from benchmark.report.outcomes import FAMILIES, entry_outcomes, grid_setting_outcomes
from benchmark.tables import load_run

__all__ = ["export_frame", "write_export", "leaderboard_numbers", "main"]


def _image_hashes(dataset: str, examples) -> dict:
    """{example: sha256 of its uint8 bytes}; {} when the dataset cannot be loaded here."""
    try:
        from benchmark.data import load_dataset
        ds = load_dataset(dataset, "test")
    except Exception:  # no data on this machine: the column stays empty, said in the docs
        return {}
    out = {}
    imgs = ds.images
    for e in examples:
        if 0 <= int(e) < len(imgs):
            a = (imgs[int(e)].numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
            out[int(e)] = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
    return out


def _checkpoint_sha(cfg: dict, model_key: str) -> str:
    name = model_key
    for m in cfg.get("models", []):
        if (m.get("label") or m.get("name")) == model_key:
            name = m.get("name", model_key)
    try:
        import model_zoo
        return model_zoo.get_entry(name).sha256 or ""
    except Exception:  # a model outside the zoo (factory, test database)
        return ""


def export_frame(src, image_hashes: bool = True) -> pd.DataFrame:
    """The export table of a run (folder, database or RunData), rows ordered by entry (first
    seen) then example."""
    from benchmark.reports import entry_name
    data = load_run(src)
    df = data.records
    hashes = _image_hashes(data.dataset, sorted(df.example.unique())) if image_hashes and len(df) \
        else {}
    frames = []
    for (mk, dk), g in df.groupby(["model", "defense"], sort=False):
        o = entry_outcomes(g)
        if o.empty:
            continue
        idx = o.index
        clean = g[g.attack == "clean"].groupby("example")
        f = pd.DataFrame(index=idx)
        f["entry"] = entry_name(mk, dk)
        f["model"], f["defense"] = mk, dk
        f["checkpoint_sha256"] = _checkpoint_sha(data.config, mk)
        f["example"] = idx.to_numpy()
        f["image_sha256"] = [hashes.get(int(e), "") for e in idx]
        f["label"] = clean.label.first().reindex(idx).to_numpy()
        f["clean_correct"] = o["clean"].to_numpy()
        for fam in FAMILIES:
            if fam in o:
                f[f"{fam}_correct"] = o[fam].to_numpy()
                a = g[g.attack == fam]
                if FAMILIES[fam] is not None:
                    a = a[a.setting == FAMILIES[fam]]
                f[f"{fam}_margin"] = a.groupby("example").margin.min().reindex(idx).to_numpy()
        wide = grid_setting_outcomes(g, idx)
        for s in wide.columns:
            f[f"grid:{s}"] = wide[s].astype("Int64").to_numpy()
        f["ALL_correct"] = o["ALL"].to_numpy()
        fams = [c for c in FAMILIES if c in o]
        f["broken_by"] = ["clean" if r["clean"] == 0 else
                          next((c for c in fams if r[c] == 0), "") for _, r in o.iterrows()]
        per = g.groupby("example")
        f["nfev_nograd"] = per.nfev_nograd.sum(min_count=1).reindex(idx).to_numpy()
        f["nfev_grad"] = per.nfev_grad.sum(min_count=1).reindex(idx).to_numpy()
        cl = g[g.attack == "clean"].groupby("example")
        f["f_evals_clean"] = (cl.nfev_nograd.sum().fillna(0) + cl.nfev_grad.sum().fillna(0)) \
            .reindex(idx).to_numpy()
        f["wall_s"] = per.wall_s.sum(min_count=1).reindex(idx).to_numpy()
        frames.append(f.reset_index(drop=True))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def leaderboard_numbers(export: pd.DataFrame) -> dict:
    """Re-derive every leaderboard number from the export alone: {entry: {'n', 'clean',
    'autoattack' (ALL when AutoAttack did not run), 'ALL', 'grid', 'min_over_means',
    'f_evals_per_forward'}} (fractions, like the database summaries)."""
    out = {}
    for name, f in export.groupby("entry", sort=False):
        row = {"n": len(f), "clean": f.clean_correct.mean(), "ALL": f.ALL_correct.mean(),
               "f_evals_per_forward": f.f_evals_clean.mean()}
        aa = f["autoattack_correct"] if "autoattack_correct" in f else None
        row["autoattack"] = row["ALL"] if aa is None or aa.isna().all() else aa.mean()
        if "grid_correct" in f and f.grid_correct.notna().all():
            row["grid"] = f.grid_correct.mean()
        gcols = [c for c in f.columns if c.startswith("grid:")]
        if gcols and f[gcols].notna().all().all():
            row["min_over_means"] = min(f[c].astype(float).mean() for c in gcols)
        out[name] = row
    return out


def write_export(run, out: Optional[Path] = None) -> Path:
    """Write ``RUN/export.csv.gz`` (or ``out``); returns the path."""
    data = load_run(run)
    frame = export_frame(data)
    path = Path(out) if out is not None else data.run_dir / "export.csv.gz"
    tmp = path.with_name(path.name + ".tmp")
    # no timestamp in the gzip header: the same records always give the same bytes (the
    # committed leaderboard's export is re-rendered and compared in CI)
    frame.to_csv(tmp, index=False, compression={"method": "gzip", "mtime": 0})
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="deqbench export",
                                 description="per-example table of a run (gzipped CSV)")
    ap.add_argument("run", help="run folder holding results.sqlite, or the .sqlite file")
    ap.add_argument("--out", default=None, help="output file (default RUN/export.csv.gz)")
    args = ap.parse_args(argv)
    try:
        path = write_export(args.run, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = pd.read_csv(path)
    print(f"{path}: {len(f)} rows ({f.entry.nunique()} entries x examples), {len(f.columns)} "
          "columns; read with pandas.read_csv")
    return 0
