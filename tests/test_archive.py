"""The committed archive of a long run (benchmark.archive): finished units as files, resumption
from the archive alone (the scratch run folder gone), git commits of the archive path only,
bit-exact round trip, shard-major unit order, and clear errors for a foreign archive or a bad
``archive:`` key. Tiny runs (12 images, shards of 4) on the checkpoints of test_runner."""
import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from benchmark.archive import Archive, ArchiveError, rebuild, unit_file
from benchmark.results_db import ResultsDB
from benchmark.run_config import ConfigError, from_dict
from benchmark.runner import evaluate
from tests.test_runner import KEY, PLANNED, _raw, checkpoints, needs_data  # noqa: F401

pytestmark = needs_data


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    _git(r, "config", "user.email", "t@example.org")
    _git(r, "config", "user.name", "t")
    (r / "other.txt").write_text("a\n")
    _git(r, "add", "other.txt")
    _git(r, "commit", "-q", "-m", "init")
    return r


def _frame(path) -> pd.DataFrame:
    with ResultsDB(path, create=False) as db:
        return db.records_frame().sort_values(KEY).reset_index(drop=True)


def test_archive_resume_from_committed_files_alone(checkpoints, repo, tmp_path):
    arch = repo / "results" / "tiny"
    raw = _raw(checkpoints, tmp_path / "scratch",
               archive={"dir": str(arch), "git": True, "every_s": 0}, unit_order="shard")
    cfg = from_dict(raw)
    (repo / "other.txt").write_text("b\n")           # a user's uncommitted edit: left alone
    res = evaluate(cfg, progress=False, stop_after_units=5)
    assert res["units_run"] == 5 and not res["complete"]
    files = sorted((arch / "units").rglob("*.jsonl.gz"))
    assert len(files) == 5
    meta = json.loads((arch / "run.json").read_text())
    assert meta["config_hash"] == cfg.hash() and len(meta["dataset"]["indices"]) == 12
    # shard-major: the five units are the first shard's (every attack), not attack-major
    shards = {p.parent.name for p in files}
    assert shards == {"0-4"}
    # committed: the archive folder only, the other edit stays a working-tree change
    assert _git(repo, "status", "--porcelain", "--", "results") == ""
    assert _git(repo, "status", "--porcelain", "--", "other.txt").strip() == "M other.txt"
    log = _git(repo, "log", "--format=%s")
    assert "results: tiny: 5/" in log
    committed = _git(repo, "ls-files", "results").split()
    assert len([c for c in committed if c.endswith(".jsonl.gz")]) == 5
    # the session ends: the scratch run folder is lost, only the repository is left
    shutil.rmtree(tmp_path / "scratch")
    res = evaluate(from_dict(raw), progress=False)
    assert res["complete"]
    assert res["units_run"] == PLANNED - 5               # the 5 committed units are not rerun
    assert len(list((arch / "units").rglob("*.jsonl.gz"))) == PLANNED
    assert "(complete)" in _git(repo, "log", "-1", "--format=%s")
    # the same records as a run without an archive (wall times aside)
    ref = evaluate(from_dict(_raw(checkpoints, tmp_path / "ref")), progress=False)
    a, b = _frame(res["db"]), _frame(ref["db"])
    pd.testing.assert_frame_equal(a.drop(columns=["wall_s", "unit_id"]),
                                  b.drop(columns=["wall_s", "unit_id"]))
    # rebuilt from the archive alone (no config): bit for bit, wall times included
    rb = tmp_path / "rebuilt.sqlite"
    assert rebuild(arch, rb) == PLANNED
    pd.testing.assert_frame_equal(_frame(rb), a)
    with ResultsDB(rb, create=False) as db:
        assert db.get_meta("config_hash") == cfg.hash()
        assert len(db.get_meta("dataset")["indices"]) == 12
    # an unchanged unit is written with the same bytes (gzip without a timestamp)
    f = files[0]
    before = f.read_bytes()
    with gzip.open(f, "rt") as fh:
        uid = json.loads(fh.readline())["unit_id"]
    assert unit_file(arch, uid) == f
    with ResultsDB(res["db"]) as db:
        Archive({"dir": str(arch)}, cfg).export_unit(db, uid)
    assert f.read_bytes() == before


def test_archive_of_another_config_is_refused(checkpoints, tmp_path):
    arch = tmp_path / "arch"
    raw = _raw(checkpoints, tmp_path / "s1", archive=str(arch))
    evaluate(from_dict(raw), progress=False, stop_after_units=1)
    other = _raw(checkpoints, tmp_path / "s2", archive=str(arch), seed=1)
    with pytest.raises(ArchiveError, match="different configuration"):
        evaluate(from_dict(other), progress=False, stop_after_units=1)
    assert len(list((arch / "units").rglob("*.jsonl.gz"))) == 1


def test_archive_and_unit_order_do_not_change_the_hash(checkpoints, tmp_path):
    base = from_dict(_raw(checkpoints, tmp_path)).hash()
    assert from_dict(_raw(checkpoints, tmp_path, archive="x", unit_order="shard")).hash() == base


@pytest.mark.parametrize("value,key", [
    ({"dir": "x", "gti": True}, "archive.gti"),
    ({"dir": 3}, "archive.dir"),
    ({"dir": "x", "git": "yes"}, "archive.git"),
    ({"dir": "x", "every_s": -1}, "archive.every_s"),
    (5, "archive"),
])
def test_bad_archive_keys_are_named(checkpoints, tmp_path, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(_raw(checkpoints, tmp_path, archive=value))


def test_bad_unit_order_is_named(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="unit_order"):
        from_dict(_raw(checkpoints, tmp_path, unit_order="random"))


def test_a_damaged_archived_unit_names_the_file(checkpoints, tmp_path):
    arch = tmp_path / "arch"
    raw = _raw(checkpoints, tmp_path / "s", archive=str(arch))
    evaluate(from_dict(raw), progress=False, stop_after_units=1)
    f = next((arch / "units").rglob("*.jsonl.gz"))
    f.write_bytes(b"not gzip")
    with pytest.raises(ArchiveError, match=str(f.name)):
        evaluate(from_dict(raw), progress=False, stop_after_units=1)


def test_parallel_workers_archive_every_unit(checkpoints, tmp_path):
    arch = tmp_path / "arch"
    res = evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive=str(arch),
                                  unit_order="shard")), progress=False, workers=2)
    assert res["complete"]
    assert len(Archive({"dir": str(arch)}, None).archived()) == PLANNED
    rb = tmp_path / "rebuilt.sqlite"
    rebuild(arch, rb)
    pd.testing.assert_frame_equal(_frame(rb), _frame(res["db"]))


def test_git_outside_a_work_tree_warns_once_and_keeps_archiving(checkpoints, tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    arch = tmp_path / "arch"
    res = evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive={
        "dir": str(arch), "git": True, "every_s": 0})), progress=False, stop_after_units=3)
    assert res["units_run"] == 3
    assert len(list((arch / "units").rglob("*.jsonl.gz"))) == 3
    err = capsys.readouterr().err
    assert err.count("is not inside a git work tree") == 1
