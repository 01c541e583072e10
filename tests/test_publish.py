"""The committed leaderboard is derived from committed results only (benchmark.publish): publish
and --check on a tiny archived run (identical re-rendering; a changed, missing or stale file is
named), and the CI check of the repository's own leaderboard (when its 1,000-image run is
complete; before that, the committed partial archive's integrity against its config)."""
import gzip
import json
from pathlib import Path

import pytest

from benchmark import publish as pub
from benchmark.archive import Archive
from benchmark.run_config import from_dict, load_run_config
from benchmark.runner import _shards, defense_key, evaluate
from tests.test_runner import _raw, checkpoints, needs_data  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


@needs_data
def test_publish_then_check_on_a_tiny_archived_run(checkpoints, tmp_path):
    arch = tmp_path / "results" / "tiny"
    raw = _raw(checkpoints, tmp_path / "scratch", archive=str(arch))
    raw["attacks"]["grid"]["mode"] = "full"
    res = evaluate(from_dict(raw), progress=False)
    assert res["complete"]
    lb = tmp_path / "lb"
    kw = dict(folder=str(lb), archive=str(arch), full_archive=str(tmp_path / "none"))
    pub.publish(figures=False, **kw)
    names = sorted(p.name for p in lb.iterdir())
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.html", "claims.md",
            "export.csv.gz"} <= set(names)
    assert pub.check(figures_required=False, **kw) == []
    # export: no gzip timestamp (the same bytes on every rendering)
    assert (lb / "export.csv.gz").read_bytes()[4:8] == b"\x00\x00\x00\x00"
    # the same check from another working directory and hash seed, in a fresh process
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "benchmark.publish", "--check", "--folder",
                          str(lb), "--archive", str(arch), "--full-archive",
                          str(tmp_path / "none")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True)
    # figures are not drawn in this test: only their absence may be reported
    assert all("figure missing" in line for line in out.stderr.splitlines()
               if line.startswith(str(lb))), out.stderr
    assert "differs" not in out.stderr and "missing from" not in out.stderr, out.stderr
    # the README block: one row per entry with the entries' own numbers and intervals
    from benchmark.leaderboard import read_entries
    block = pub.readme_block(lb)
    entries = read_entries(lb)
    for e in entries:
        row = next(line for line in block.splitlines() if f"| {e['name']} |" in line)
        lo, hi = e["deq"]["ci95"]["ALL"]
        assert f"**{float(e['deq']['worst_case_acc']):.2f} [{lo:.1f}, {hi:.1f}]**" in row
        lo, hi = e["deq"]["ci95"]["clean"]
        assert f"{float(e['clean_acc']):.2f} [{lo:.1f}, {hi:.1f}]" in row
    n = entries[0]["deq"]["n_examples"]
    assert f"What n = {n:,} resolves" in block
    assert "1. Intermediate-state attacks beat the final-state attack" in block   # claims
    text = f"intro\n{pub.README_BEGIN}\nold table\n{pub.README_END}\nrest\n"
    assert pub.readme_with_block(text, block) == (f"intro\n{pub.README_BEGIN}\n{block}"
                                                  f"{pub.README_END}\nrest\n")
    with pytest.raises(pub.PublishError, match="markers"):
        pub.readme_with_block("no markers here", block)
    md = lb / "leaderboard.md"
    md.write_text(md.read_text().replace("| 1 |", "| 9 |", 1))
    entry = next(p for p in lb.glob("*.json") if p.name not in ("claims.json",))
    entry.unlink()
    (lb / "old_entry.json").write_text("{}")
    diffs = pub.check(figures_required=False, **kw)
    assert f"{lb}/leaderboard.md: differs from its re-rendering" in diffs
    assert f"{lb}/{entry.name}: missing from the committed folder" in diffs
    assert f"{lb}/old_entry.json: committed but no longer rendered (stale)" in diffs
    assert len(diffs) == 3


@needs_data
def test_publish_refuses_an_incomplete_run(checkpoints, tmp_path, capsys):
    arch = tmp_path / "arch"
    evaluate(from_dict(_raw(checkpoints, tmp_path / "s", archive=str(arch))), progress=False,
             stop_after_units=2)
    with pytest.raises(pub.PublishError, match="incomplete"):
        pub.publish(folder=str(tmp_path / "lb"), archive=str(arch), figures=False)
    assert not (tmp_path / "lb").exists()


def test_the_committed_leaderboard_is_what_its_committed_results_render():
    """The CI check. Complete run: re-render and compare byte for byte. Incomplete (the run
    continues over several sessions): every archived unit belongs to the committed config."""
    cfg = load_run_config(REPO / "configs/eval/fmnist_zoo_1000.yaml")
    st = pub.archive_status(pub.ARCHIVE)
    if not st["exists"]:
        pytest.skip("the 1,000-image run has not started (no results/fmnist_zoo_1000/run.json)")
    assert st["config_hash"] == cfg.hash(), "archive and committed config disagree"
    if st["complete"]:
        assert pub.check() == []
        return
    entries = {f"{m.key}|{defense_key(d)}" for m in cfg.models for d in m.defenses}
    shards = {f"{lo}-{hi}" for lo, hi in _shards(cfg.data["n"], cfg.shard_size)}
    arch = Archive({"dir": str(REPO / cfg.archive["dir"])}, cfg)
    units = arch.archived()
    assert len(units) == st["units"] > 0
    for uid, path in units.items():
        entry, attack, shard = uid.rsplit("|", 2)
        assert entry in entries and shard in shards, uid
        assert attack in cfg.attacks or attack == "clean", uid
        with gzip.open(path, "rt") as f:
            head = json.loads(f.readline())
        assert head["unit_id"] == uid and head["n_examples"] >= 0
