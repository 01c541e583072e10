"""The per-example results database of a run (SQLite, one file per run folder).

Tables
------
``meta``     key -> JSON value: config, config hash, seeds, package versions, git commit,
             device, start/end time.
``units``    one row per finished work unit (model, defense, attack, shard of examples): its id,
             wall time and configuration. A unit's records and its ``units`` row are written in
             ONE transaction, so a run killed at any moment (SIGKILL included) has either all
             of a unit or none of it; a restarted run skips finished units.
``records``  one row per (model, defense, attack, setting, example): correct, margin, the
             evaluated state, entropies and residuals (JSON, clean passes), f_theta evaluations
             (without / with graph), wall time (the unit's, split evenly), unit id.
``adversarial`` adversarial examples a unit kept for a later unit of the run to reuse (issue
             16: transfer reuses the sources' PGD examples, Table 4 AutoAttack's APGD-CE ones):
             one row per (model, defense, attack, name, example), float32 bytes and the shape,
             written in the unit's transaction. Raw bytes, never pickle.

Aggregates (accuracies, worst cases, tables, figures) are always derived from ``records``
with pandas (:func:`ResultsDB.records_frame`); nothing re-attacks to draw a plot.
"""
from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from model_zoo.scoring import record_status

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    unit_id TEXT PRIMARY KEY, model TEXT NOT NULL, defense TEXT NOT NULL, attack TEXT NOT NULL,
    shard TEXT NOT NULL, n_examples INTEGER NOT NULL, wall_s REAL, finished REAL,
    rank INTEGER, config TEXT);
CREATE TABLE IF NOT EXISTS records (
    model TEXT NOT NULL, defense TEXT NOT NULL, attack TEXT NOT NULL, setting TEXT NOT NULL,
    example INTEGER NOT NULL, label INTEGER, correct INTEGER NOT NULL, margin REAL,
    state TEXT, entropies TEXT, residuals TEXT, nfev_nograd REAL, nfev_grad REAL,
    wall_s REAL, unit_id TEXT NOT NULL, extra TEXT, status TEXT, final_residual REAL,
    PRIMARY KEY (model, defense, attack, setting, example));
CREATE INDEX IF NOT EXISTS records_by_attack ON records (model, defense, attack);
CREATE TABLE IF NOT EXISTS adversarial (
    model TEXT NOT NULL, defense TEXT NOT NULL, attack TEXT NOT NULL, name TEXT NOT NULL,
    example INTEGER NOT NULL, unit_id TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (model, defense, attack, name, example));
"""
ADVERSARIAL_FIELDS = ("model", "defense", "attack", "name", "example", "unit_id", "shape", "data")

RECORD_FIELDS = ("model", "defense", "attack", "setting", "example", "label", "correct", "margin",
                 "state", "entropies", "residuals", "nfev_nograd", "nfev_grad", "wall_s",
                 "unit_id", "extra", "status", "final_residual")
# Columns added after the first release: databases written before get them on open (NULL).
_ADDED_COLUMNS = {"status": "TEXT", "final_residual": "REAL"}


class ResultsDBError(ValueError):
    """A results database that cannot be read (corrupt, truncated, not SQLite, missing)."""


def _recover_hint(path: Path) -> str:
    return (f"move it aside (mv {path} {path}.broken) and rerun the same command: finished "
            "work is recomputed into a fresh database, nothing else is touched")


class ResultsDB:
    """A run's SQLite database (``path``, created if missing). Safe to open from several
    processes one after another; each process should hold its own file when running in
    parallel (see :func:`merge`)."""

    def __init__(self, path, create: bool = True, residual_threshold: Optional[float] = None):
        """``create=False`` (readers: tables, figures, leaderboard): a missing file is a
        :class:`ResultsDBError` and nothing is created. A file that is not a readable SQLite
        results database is a :class:`ResultsDBError` naming it and saying how to recover.
        ``residual_threshold``: final relative residual above which a record is
        ``unconverged`` (default: the run config's ``reliability.residual_threshold``
        stored in the database, else :data:`model_zoo.scoring.UNCONVERGED_REL_RESIDUAL`)."""
        self.path = Path(path)
        self._threshold = residual_threshold
        if self.path.is_dir():
            raise ResultsDBError(f"{self.path} is a folder, not a results database")
        if not create and not self.path.is_file():
            raise ResultsDBError(f"results database not found: {self.path} (run `deqbench "
                                 "evaluate CONFIG` first, or give the run folder holding "
                                 "results.sqlite)")
        if self.path.is_file():
            with open(self.path, "rb") as f:
                head = f.read(16)
            if head and head != b"SQLite format 3\x00":
                raise ResultsDBError(f"{self.path} is not an SQLite results database (it starts "
                                     f"with {head[:8]!r}); {_recover_hint(self.path)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(SCHEMA)
            have = {r[1] for r in self.conn.execute("PRAGMA table_info(records)")}
            for col, typ in _ADDED_COLUMNS.items():
                if col not in have:
                    self.conn.execute(f"ALTER TABLE records ADD COLUMN {col} {typ}")
            # a truncated file opens but fails on the first read of a damaged page
            ok = self.conn.execute("PRAGMA quick_check").fetchone()
            if ok is None or ok[0] != "ok":
                raise sqlite3.DatabaseError(ok[0] if ok else "integrity check failed")
        except sqlite3.DatabaseError as e:
            if getattr(self, "conn", None) is not None:
                self.conn.close()
            raise ResultsDBError(f"{self.path} is corrupt or truncated ({e}); "
                                 f"{_recover_hint(self.path)}") from None

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- metadata -------------------------------------------------------------------------------
    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str)))

    def get_meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def residual_threshold(self) -> float:
        if self._threshold is None:
            from model_zoo.scoring import UNCONVERGED_REL_RESIDUAL
            cfg = self.get_meta("config") or {}
            rel = cfg.get("reliability") if isinstance(cfg, dict) else None
            self._threshold = float((rel or {}).get("residual_threshold",
                                                    UNCONVERGED_REL_RESIDUAL))
        return self._threshold

    # -- work units -----------------------------------------------------------------------------
    def done_units(self) -> set:
        return {r[0] for r in self.conn.execute("SELECT unit_id FROM units")}

    def is_done(self, unit_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM units WHERE unit_id = ?", (unit_id,)).fetchone() is not None

    def commit_unit(self, unit_id: str, model: str, defense: str, attack: str, shard: str,
                    records: Iterable[dict], wall_s: float, config: Optional[dict] = None,
                    rank: int = 0, adversarial: Optional[dict] = None) -> int:
        """Write a unit's records and mark it finished, atomically. Returns the record count.
        Committing a unit that is already finished is an error (nothing is counted twice).
        ``adversarial`` {name: (examples, tensor (B, ...))}: adversarial examples kept for
        later units (table ``adversarial``, :meth:`adversarial`)."""
        adv_rows = []
        for name, (examples, xs) in (adversarial or {}).items():
            xs = xs.detach().to("cpu", torch.float32).contiguous()
            if len(examples) != len(xs):
                raise ValueError(f"adversarial {name!r}: {len(examples)} examples, {len(xs)} rows")
            shape = json.dumps(list(xs.shape[1:]))
            adv_rows += [(model, defense, attack, name, int(e), unit_id, shape,
                          xs[k].numpy().tobytes()) for k, e in enumerate(examples)]
        rows = []
        threshold = self.residual_threshold()
        for r in records:
            row = dict(r)
            # why an example is what it is: 'nonfinite' (non-finite logits, states or residuals:
            # never a prediction), 'unconverged' (final relative residual above threshold), 'ok'
            if row.get("status") is None:
                res = row.get("residuals")
                if isinstance(res, str):
                    res = json.loads(res)
                row["status"], row["final_residual"] = record_status(
                    row.get("margin"), res, threshold,
                    True if row.get("nonfinite") else None)
                if row["final_residual"] is not None and row["final_residual"] != row["final_residual"]:
                    row["final_residual"] = None  # NaN: SQLite stores NULL; the status says why
                m = row.get("margin")
                if row.get("correct") and m is not None and (math.isnan(float(m))
                                                             or float(m) == float("-inf")):
                    raise RuntimeError(f"record {row.get('example')} of {unit_id!r} is marked "
                                       "correct but its logits are not finite")
            for k in ("entropies", "residuals", "extra"):
                if row.get(k) is not None and not isinstance(row[k], str):
                    row[k] = json.dumps(row[k])
            row.setdefault("model", model)
            row.setdefault("defense", defense)
            row.setdefault("attack", attack)
            row["unit_id"] = unit_id
            rows.append(tuple(row.get(f) for f in RECORD_FIELDS))
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if cur.execute("SELECT 1 FROM units WHERE unit_id = ?", (unit_id,)).fetchone():
                raise RuntimeError(f"work unit {unit_id!r} is already in the database")
            cur.executemany(f"INSERT INTO records ({', '.join(RECORD_FIELDS)}) VALUES "
                            f"({', '.join('?' * len(RECORD_FIELDS))})", rows)
            cur.executemany(f"INSERT INTO adversarial ({', '.join(ADVERSARIAL_FIELDS)}) VALUES "
                            f"({', '.join('?' * len(ADVERSARIAL_FIELDS))})", adv_rows)
            cur.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (unit_id, model, defense, attack, shard, len(rows), wall_s, time.time(),
                         rank, json.dumps(config or {}, default=str)))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return len(rows)

    # -- reading --------------------------------------------------------------------------------
    def records_frame(self, **where):
        """All records (optionally filtered by column equality) as a pandas DataFrame."""
        import pandas as pd
        sql = "SELECT * FROM records"
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
        return pd.read_sql_query(sql, self.conn, params=tuple(where.values()))

    def adversarial(self, model: str, defense: str, attack: str, name: str, examples) -> list:
        """The adversarial examples ``name`` that units of (model, defense, attack) kept for
        ``examples``: ``[(unit config (dict), {example: tensor})]``, one item per unit that
        holds some of them (a caller reuses them only where every example is there and the
        unit's configuration is the attack it would run)."""
        examples = [int(e) for e in examples]
        if not examples:
            return []
        rows = self.conn.execute(
            "SELECT a.example, a.shape, a.data, u.unit_id, u.config FROM adversarial a JOIN units u "
            "ON a.unit_id = u.unit_id WHERE a.model = ? AND a.defense = ? AND a.attack = ? AND "
            f"a.name = ? AND a.example IN ({','.join('?' * len(examples))})",
            (model, defense, attack, name, *examples)).fetchall()
        out = {}
        for ex, shape, data, uid, config in rows:
            conf, xs = out.setdefault(uid, (json.loads(config or "{}"), {}))
            t = torch.frombuffer(bytearray(data), dtype=torch.float32)
            xs[int(ex)] = t.reshape(json.loads(shape))
        return list(out.values())

    def units_frame(self):
        import pandas as pd
        return pd.read_sql_query("SELECT * FROM units", self.conn)

    def count(self, table: str = "records") -> int:
        if table not in ("records", "units", "meta", "adversarial"):
            raise ValueError(table)
        return self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def merge(target, sources: Iterable) -> int:
    """Merge the units and records of shard databases ``sources`` into ``target`` (units already
    present are skipped). Returns the number of units added. A missing source is an error
    (e.g. ranks on several nodes without a shared run folder), never an empty shard."""
    sources = list(sources)
    missing = [str(p) for p in sources if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot merge: shard database(s) {', '.join(missing)} not found. Every rank must "
            "write into the same run folder (a shared filesystem on several nodes), or copy "
            "the results.rank<R>.sqlite files there and run again to merge.")
    added = 0
    with ResultsDB(target) as dst:
        have = dst.done_units()
        for src in sources:
            with ResultsDB(src) as s:
                for k, v in s.meta().items():
                    if dst.get_meta(k) is None:
                        dst.set_meta(k, v)
                units = s.conn.execute("SELECT * FROM units").fetchall()
                for u in units:
                    if u[0] in have:
                        continue
                    recs = s.conn.execute(f"SELECT {', '.join(RECORD_FIELDS)} FROM records "
                                          "WHERE unit_id = ?", (u[0],)).fetchall()
                    advs = s.conn.execute(f"SELECT {', '.join(ADVERSARIAL_FIELDS)} FROM "
                                          "adversarial WHERE unit_id = ?", (u[0],)).fetchall()
                    cur = dst.conn.cursor()
                    cur.execute("BEGIN IMMEDIATE")
                    try:
                        cur.executemany(f"INSERT INTO records ({', '.join(RECORD_FIELDS)}) VALUES "
                                        f"({', '.join('?' * len(RECORD_FIELDS))})", recs)
                        cur.executemany(f"INSERT INTO adversarial ({', '.join(ADVERSARIAL_FIELDS)}) "
                                        f"VALUES ({', '.join('?' * len(ADVERSARIAL_FIELDS))})", advs)
                        cur.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", u)
                        cur.execute("COMMIT")
                    except BaseException:
                        cur.execute("ROLLBACK")
                        raise
                    have.add(u[0])
                    added += 1
    return added
