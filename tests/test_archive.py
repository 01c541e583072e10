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


def test_each_unit_is_archived_when_it_finishes_not_only_at_the_end(checkpoints, tmp_path,
                                                                     monkeypatch):
    # without the end-of-run sync, the units are still archived one by one
    import benchmark.runner as runner
    monkeypatch.setattr(runner, "_archive_finish", lambda *a, **k: None)
    arch = tmp_path / "arch"
    evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive=str(arch))), progress=False,
             stop_after_units=4)
    assert len(list((arch / "units").rglob("*.jsonl.gz"))) == 4


def test_a_failing_unit_is_raised_and_the_finished_ones_are_archived(checkpoints, tmp_path,
                                                                    monkeypatch):
    import benchmark.runner as runner
    real = runner._run_unit
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(runner, "_run_unit", boom)
    arch = tmp_path / "arch"
    with pytest.raises(KeyboardInterrupt):
        evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive=str(arch))), progress=False)
    assert len(list((arch / "units").rglob("*.jsonl.gz"))) == 2
    meta = json.loads((arch / "run.json").read_text())
    assert not meta.get("complete") and meta["invocations"][-1]["done"] == 2


def test_a_subset_run_never_marks_the_archive_complete(checkpoints, tmp_path):
    arch = tmp_path / "arch"
    raw = _raw(checkpoints, tmp_path / "s", archive=str(arch))
    res = evaluate(from_dict(raw), progress=False, only={"grid"})
    assert res["complete"]                       # the sweep's own plan is done
    meta = json.loads((arch / "run.json").read_text())
    assert not meta.get("complete") and "end_time" not in meta
    res = evaluate(from_dict(raw), progress=False)
    meta = json.loads((arch / "run.json").read_text())
    assert meta["complete"] is True and meta["end_time"] > 0


def test_computed_state_is_archived_and_restored(checkpoints, tmp_path):
    # the early state chosen on validation data lives in the DB's meta: a rebuilt database
    # must reuse it, not recompute it
    arch = tmp_path / "arch"
    res = evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive=str(arch))),
                   progress=False)
    with ResultsDB(res["db"], create=False) as db:
        state = {k: v for k, v in db.meta().items() if k.startswith("early_select")}
    assert state
    meta = json.loads((arch / "run.json").read_text())
    assert {k: meta["db_state"][k] for k in state} == state
    rb = tmp_path / "rb.sqlite"
    rebuild(arch, rb)
    with ResultsDB(rb, create=False) as db:
        assert {k: db.get_meta(k) for k in state} == state


def test_commits_leave_a_users_staged_change_staged(checkpoints, repo, tmp_path):
    (repo / "other.txt").write_text("staged\n")
    _git(repo, "add", "other.txt")
    arch = repo / "results" / "tiny"
    evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive={"dir": str(arch), "git": True,
                                                                  "every_s": 0})),
             progress=False, stop_after_units=2)
    assert _git(repo, "diff", "--cached", "--name-only").split() == ["other.txt"]
    assert "other.txt" not in _git(repo, "show", "--name-only", "--format=", "HEAD")


def test_every_s_throttles_commits(checkpoints, repo, tmp_path):
    arch = repo / "results" / "tiny"
    evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive={"dir": str(arch), "git": True,
                                                                  "every_s": 3600})),
             progress=False, stop_after_units=4)
    msgs = _git(repo, "log", "--format=%s").splitlines()
    # the forced commits at start and stop only, none per unit
    assert msgs[:2] == ["results: tiny: 4/36 units", "results: tiny: 0/36 units (start)"]


def test_a_truncated_archived_unit_is_an_error_naming_it(checkpoints, tmp_path):
    arch = tmp_path / "arch"
    raw = _raw(checkpoints, tmp_path / "s", archive=str(arch))
    evaluate(from_dict(raw), progress=False, stop_after_units=1)
    f = next((arch / "units").rglob("*.jsonl.gz"))
    f.write_bytes(f.read_bytes()[:-20])
    (f.parent / "x.jsonl.gz.tmp").write_bytes(b"half")
    shutil.rmtree(tmp_path / "s")
    with pytest.raises(ArchiveError, match=f.name):
        evaluate(from_dict(raw), progress=False, stop_after_units=1)
    assert not (f.parent / "x.jsonl.gz.tmp").exists()


@pytest.mark.parametrize("order,workers", [("shard", 1), ("shard", 2), ("attack", 2)])
def test_top_settings_are_the_runs_whatever_the_unit_order(checkpoints, tmp_path, order,
                                                           workers):
    # top_settings reads the grid of EVERY shard (reads_all_shards): every shard's Table 4
    # uses the run's k strongest settings, also shard by shard and with two workers
    raw = _raw(checkpoints, tmp_path / "s", unit_order=order,
               models=[{"name": "deq_tiny_fashion_mnist", "checkpoint": checkpoints["deq"]}])
    raw["attacks"] = {"grid": {"steps": 2, "kas": [1, 5], "lams": [0.5, 1.0], "mode": "full"},
                      "top_settings": {"k": 1, "attacks": ["apgd-ce"],
                                       "budget": {"apgd_n_iter": 2}}}
    res = evaluate(from_dict(raw), progress=False, workers=workers)
    with ResultsDB(res["db"], create=False) as db:
        rec = db.records_frame()
    grid = rec[(rec.attack == "grid") & (rec.setting != "worst")]
    broken = (1 - grid.correct).groupby(grid.setting).sum()
    best = sorted(broken.index, key=lambda s: (-broken[s], s))[0]
    tops = rec[rec.attack == "top_settings"]
    assert set(tops.setting) == {f"apgd-ce@{best}"}
    assert tops.groupby("unit_id").ngroups == 3


def test_shard_major_order_puts_run_wide_readers_after_every_shard():
    from types import SimpleNamespace
    from benchmark.runner import shard_major
    m = SimpleNamespace(key="m")
    plan = [(m, "final", a, lo, lo + 4) for a in ("clean", "pgd", "grid", "autoattack",
                                                  "top_settings", "checks") for lo in (0, 4, 8)]
    out = [(p[2], p[3]) for p in shard_major(plan)]
    assert out == ([(a, lo) for lo in (0, 4, 8) for a in ("clean", "pgd", "grid", "autoattack")]
                   + [(a, lo) for lo in (0, 4, 8) for a in ("top_settings", "checks")])


def test_sigterm_stops_the_cli_gracefully_and_archives_what_finished(checkpoints, tmp_path):
    import signal
    import sys
    import time
    import yaml
    arch = tmp_path / "arch"
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(_raw(checkpoints, tmp_path / "s", archive=str(arch))))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "DEQBENCH_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmark.cli", "evaluate", str(cfgp),
                             "--quiet"], cwd=str(Path(__file__).resolve().parent.parent),
                            env=env, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "s" / "tiny" / "results.sqlite"
    t0 = time.time()
    while time.time() - t0 < 120:
        if len(list((arch / "units").rglob("*.jsonl.gz"))) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "stopped; finished work units are kept" in err
    with ResultsDB(db, create=False) as d:
        done = d.done_units()
    assert 3 <= len(done) < PLANNED
    assert set(Archive({"dir": str(arch)}, None).archived()) == done
    meta = json.loads((arch / "run.json").read_text())
    assert meta["invocations"][-1]["done"] == len(done)
