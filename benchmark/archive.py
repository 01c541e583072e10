"""A run's finished work units as committed files: the state a long evaluation resumes from.

A 1,000-image evaluation takes many CPU hours, longer than a working session, and a session may
end at any moment taking its scratch folders with it. With ``archive:`` in the run config the
runner keeps, beside its SQLite database (a cache), one gzipped JSON-lines file per finished
unit in a folder meant to be committed to git::

    archive: {dir: results/fmnist_zoo_1000, git: true, every_s: 600}

``ARCHIVE/run.json``       the run's metadata (config, config hash, weights' SHA-256, dataset
                           indices, provenance of the first invocation; every later invocation
                           is appended to ``invocations``);
``ARCHIVE/units/<attack>/<shard>/<entry>-<hash>.jsonl.gz``
                           line 1: the unit's ``units`` row; every further line one record
                           (the fields of :data:`benchmark.results_db.RECORD_FIELDS`).

On every start :func:`sync` imports the archived units the database lacks (a fresh clone, or a
lost ``runs/`` folder, rebuilds the database from the repository) and archives the units the
database holds but the archive lacks; after each finished unit the runner archives it, and with
``git: true`` commits the archive folder (only that path) at most every ``every_s`` seconds and
at the end. Killed at any moment, the run loses at most the units finished since the last
commit. Files are written to a temporary name and renamed (never half-written); gzip without a
timestamp, JSON floats in their shortest round-trip form, so a re-import gives the same numbers
bit for bit and an unchanged unit always has the same bytes.

Why our own format rather than committing the SQLite file: a database rewritten after every
unit would put a new multi-megabyte binary into git history each commit; one immutable small
file per unit is committed once.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from benchmark.results_db import RECORD_FIELDS, ResultsDB

UNIT_FIELDS = ("unit_id", "model", "defense", "attack", "shard", "n_examples", "wall_s",
               "finished", "rank", "config")
ARCHIVE_KEYS = {"dir", "git", "every_s"}


class ArchiveError(ValueError):
    """An archive that does not belong to this run (another config) or cannot be read."""


def check_archive(raw, source: Optional[str] = None) -> dict:
    """Validate the run config's ``archive:`` value (a folder path, or a mapping with ``dir``,
    ``git``, ``every_s``); returns ``{'dir', 'git', 'every_s'}`` or ``{}`` when absent."""
    from benchmark.run_config import _err
    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = {"dir": raw}
    if not isinstance(raw, dict):
        _err("archive", f"must be a folder path or a mapping with dir/git/every_s, got {raw!r}")
    bad = set(raw) - ARCHIVE_KEYS
    if bad:
        _err(f"archive.{sorted(bad, key=str)[0]}", f"unknown key (known: {sorted(ARCHIVE_KEYS)})")
    if not isinstance(raw.get("dir"), str) or not raw["dir"]:
        _err("archive.dir", f"must be a folder path (a string), got {raw.get('dir')!r}")
    git = raw.get("git", False)
    if not isinstance(git, bool):
        _err("archive.git", f"must be true or false, got {git!r}")
    every = raw.get("every_s", 600)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0:
        _err("archive.every_s", f"must be a number of seconds >= 0, got {every!r}")
    return {"dir": raw["dir"], "git": git, "every_s": float(every)}


def unit_file(root: Path, unit_id: str) -> Path:
    """Where unit ``unit_id`` ('model|defense|attack|lo-hi') is archived: readable folders by
    attack and shard; the entry's name made filename-safe plus a hash of the exact id (a
    defense may be JSON, e.g. '{"name": "entropy_reduction", "r": 5, "tf": 4}')."""
    entry, attack, shard = unit_id.rsplit("|", 2)
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "-", entry).strip("-")[:80]
    h = hashlib.sha256(unit_id.encode()).hexdigest()[:10]
    return root / "units" / attack / shard / f"{slug}-{h}.jsonl.gz"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())   # on disk before the rename makes it visible
    tmp.replace(path)


def _json(v) -> str:
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)


class Archive:
    """The archive folder of a run (see the module docstring)."""

    def __init__(self, opts: dict, cfg):
        self.root = Path(opts["dir"])
        self.git = bool(opts.get("git", False))
        self.every_s = float(opts.get("every_s", 600))
        self.cfg = cfg
        self._last_commit = time.monotonic()
        self._dirty = False

    # -- metadata --------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "run.json"

    def read_meta(self) -> Optional[dict]:
        if not self.meta_path.is_file():
            return None
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArchiveError(f"{self.meta_path}: not a readable archive file ({e})") from None

    def check(self) -> Optional[dict]:
        """The archive's metadata, after checking it belongs to this config (same hash)."""
        meta = self.read_meta()
        if meta is not None and meta.get("config_hash") != self.cfg.hash():
            raise ArchiveError(
                f"{self.root} holds the results of a different configuration (hash "
                f"{meta.get('config_hash')} vs {self.cfg.hash()}): a changed config or changed "
                "weights cannot continue a committed run; give the run a new name and a new "
                "archive.dir")
        return meta

    #: DB meta keys that are provenance of one invocation, not state of the run
    _TRANSIENT_META = ("last_invocation/",)
    _TOP_META = ("config", "config_hash", "weights", "config_source", "seed", "provenance",
                 "start_time", "dataset", "end_time")

    def _db_state(self, db: ResultsDB) -> dict:
        """The DB's meta that later units depend on and that the run computed once (e.g. the
        early state chosen on validation data, the pruned grid's calibration): archived so a
        rebuilt database reuses it instead of recomputing it."""
        return {k: v for k, v in db.meta().items()
                if k not in self._TOP_META and not k.startswith(self._TRANSIENT_META)}

    def write_meta(self, db: ResultsDB, invocation: Optional[dict] = None,
                   complete: Optional[bool] = None) -> None:
        """Write ``run.json``: the run's metadata (first invocation), ``invocations`` (one entry
        per call with ``invocation``), ``db_state`` (see :meth:`_db_state`) and, once every
        unit of the full plan is archived (``complete=True``), ``complete`` and ``end_time``."""
        meta = self.read_meta()
        if meta is None:
            meta = {k: db.get_meta(k) for k in self._TOP_META if k != "end_time"}
            meta["invocations"] = []
        if invocation is not None:
            meta["invocations"].append(invocation)
        meta["db_state"] = self._db_state(db)
        if complete and not meta.get("complete"):
            meta["complete"] = True
            meta["end_time"] = db.get_meta("end_time") or time.time()
        text = json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n"
        if not self.meta_path.is_file() or self.meta_path.read_text() != text:
            _write_atomic(self.meta_path, text.encode())
            self._dirty = True

    def restore_state(self, db: ResultsDB, meta: Optional[dict]) -> None:
        """Copy the archived run metadata and ``db_state`` into ``db`` where it lacks them."""
        if not meta:
            return
        have = db.meta()
        for k in self._TOP_META:
            if k != "end_time" and meta.get(k) is not None and k not in have:
                db.set_meta(k, meta[k])
        for k, v in (meta.get("db_state") or {}).items():
            if k not in have:
                db.set_meta(k, v)

    # -- units -----------------------------------------------------------------------------------
    def archived(self) -> dict:
        """unit id -> file, for every archived unit. Every file is read in full (gzip's CRC
        checks it), so a truncated or damaged file is an error naming it, never imported.
        Leftover ``*.tmp`` files (a write killed before its rename) are removed."""
        for t in (self.root / "units").rglob("*.tmp"):
            t.unlink()
        out = {}
        for p in sorted((self.root / "units").rglob("*.jsonl.gz")):
            unit, _ = self.read_unit(p)
            out[unit["unit_id"]] = p
        return out

    def export_unit(self, db: ResultsDB, unit_id: str) -> Path:
        urow = db.conn.execute(f"SELECT {', '.join(UNIT_FIELDS)} FROM units WHERE unit_id = ?",
                               (unit_id,)).fetchone()
        if urow is None:
            raise ArchiveError(f"unit {unit_id!r} is not in {db.path}")
        recs = db.conn.execute(f"SELECT {', '.join(RECORD_FIELDS)} FROM records WHERE unit_id = ?"
                               " ORDER BY setting, example", (unit_id,)).fetchall()
        head = dict(zip(UNIT_FIELDS, urow))
        if self.cfg is not None:
            head["config_hash"] = self.cfg.hash()
        lines = [_json(head)]
        lines += [_json(dict(zip(RECORD_FIELDS, r))) for r in recs]
        data = gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=9, mtime=0)
        path = unit_file(self.root, unit_id)
        _write_atomic(path, data)
        self._dirty = True
        return path

    @staticmethod
    def read_unit(path: Path, config_hash: Optional[str] = None):
        """(unit row, records) of an archived file; an ArchiveError naming the file when it is
        unreadable, truncated, or archived under another config hash than ``config_hash``."""
        try:
            with gzip.open(path, "rt") as f:
                lines = f.read().splitlines()
            unit = json.loads(lines[0])
            recs = [json.loads(s) for s in lines[1:] if s]
            unit["unit_id"]
        except (OSError, EOFError, ValueError, KeyError, IndexError) as e:
            raise ArchiveError(f"{path}: not a readable archived unit ({type(e).__name__}: {e}); "
                               "delete it and run again (the unit is recomputed)") from None
        h = unit.get("config_hash")
        if config_hash is not None and h is not None and h != config_hash:
            raise ArchiveError(f"{path}: archived under config hash {h}, not {config_hash}")
        return unit, recs

    def import_units(self, db: ResultsDB, files, config_hash: Optional[str] = None) -> int:
        """Insert the archived units ``files`` into ``db`` (one transaction); each must have
        been archived under ``config_hash`` (default: this run's)."""
        cur = db.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        n = 0
        try:
            have = {r[0] for r in cur.execute("SELECT unit_id FROM units")}
            want = config_hash or (self.cfg.hash() if self.cfg is not None else None)
            for p in files:
                unit, recs = self.read_unit(p, want)
                if unit["unit_id"] in have:
                    continue
                cur.executemany(
                    f"INSERT INTO records ({', '.join(RECORD_FIELDS)}) VALUES "
                    f"({', '.join('?' * len(RECORD_FIELDS))})",
                    [tuple(r.get(k) for k in RECORD_FIELDS) for r in recs])
                cur.execute(f"INSERT INTO units ({', '.join(UNIT_FIELDS)}) VALUES "
                            f"({', '.join('?' * len(UNIT_FIELDS))})",
                            tuple(unit.get(k) for k in UNIT_FIELDS))
                have.add(unit["unit_id"])
                n += 1
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return n

    def sync(self, db: ResultsDB) -> tuple:
        """Import what the database lacks, archive what the archive lacks: (imported, exported).
        ``run.json`` is written before any unit is exported."""
        meta = self.check()
        self.restore_state(db, meta)
        if meta is None:
            self.write_meta(db)
        arch = self.archived()
        done = db.done_units()
        imported = self.import_units(db, [p for u, p in arch.items() if u not in done])
        exported = 0
        for u in sorted(done - set(arch)):
            self.export_unit(db, u)
            exported += 1
        return imported, exported

    # -- git -------------------------------------------------------------------------------------
    def maybe_commit(self, message: str, force: bool = False) -> bool:
        """``git add`` + ``git commit`` of the archive folder only (other staged or modified
        files are left alone) when ``git: true``, something changed, and ``every_s`` passed
        since the last commit (or ``force``). A failure (e.g. another git command holding the
        index lock) is a warning; the next call tries again."""
        if not (self.git and self._dirty):
            return False
        if not force and time.monotonic() - self._last_commit < self.every_s:
            return False
        root = self.root.resolve()
        try:
            inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root,
                                    capture_output=True, text=True)
            ok = inside.returncode == 0 and inside.stdout.strip() == "true"
        except OSError:           # no git binary
            ok = False
        if not ok:
            # not a git checkout (e.g. an unpacked tarball), or no git: say so once, keep
            # archiving
            print(f"deqbench: archive: {root} is not inside a git work tree (or git is "
                  "missing); the archive is written but not committed (archive.git ignored)",
                  file=sys.stderr)
            self.git = False
            return False
        try:
            # the archive folder only; a *.tmp of a write in progress is never committed
            spec = ["--", ".", ":(exclude)*.tmp"]
            subprocess.run(["git", "add", *spec], cwd=root, check=True, capture_output=True,
                           text=True)
            st = subprocess.run(["git", "diff", "--cached", "--quiet", *spec], cwd=root,
                                capture_output=True)
            if st.returncode == 0:
                self._dirty = False
                return False
            subprocess.run(["git", "commit", "-q", "--no-verify", "-m", message, *spec],
                           cwd=root, check=True, capture_output=True, text=True)
        except (subprocess.CalledProcessError, OSError) as e:
            err = getattr(e, "stderr", "") or str(e)
            # retried at the next commit time (every_s), not after every unit
            self._last_commit = time.monotonic()
            print(f"deqbench: archive: git commit of {root} failed ({err.strip()[:200]}); "
                  f"the files are kept and the commit is retried in {self.every_s:.0f} s",
                  file=sys.stderr)
            return False
        self._last_commit = time.monotonic()
        self._dirty = False
        return True


def rebuild(archive_dir, db_path) -> int:
    """Build (or complete) the results database ``db_path`` from an archive folder alone,
    without the run config (e.g. CI re-rendering the committed leaderboard). Returns the units
    imported."""
    root = Path(archive_dir)
    a = Archive({"dir": str(root)}, None)
    meta = a.read_meta()
    if meta is None:
        raise ArchiveError(f"{root / 'run.json'} not found: not an archive folder")
    with ResultsDB(db_path) as db:
        old = db.get_meta("config_hash")
        if old is not None and old != meta["config_hash"]:
            raise ArchiveError(f"{db_path} holds another configuration ({old} vs "
                               f"{meta['config_hash']})")
        a.restore_state(db, meta)
        if meta.get("complete") and meta.get("end_time") is not None:
            db.set_meta("end_time", meta["end_time"])
        arch = a.archived()
        done = db.done_units()
        return a.import_units(db, [p for u, p in arch.items() if u not in done],
                              config_hash=meta["config_hash"])
