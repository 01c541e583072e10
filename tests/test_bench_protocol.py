"""``deqbench bench protocol``: the restricted config, the per-attack costs read from a run's
database, the ALL comparison, and one end-to-end run against a baseline worktree of HEAD."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.bench_protocol import compare_all, restricted_config

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file()
                                and not (FMNIST / "t10k-images-idx3-ubyte").is_file(),
                                reason="Fashion-MNIST (dataset-fashion-mnist) not installed")


def test_restricted_config_keeps_seed_and_caps_shards(tmp_path):
    raw = {"name": "x", "output": "runs/x", "shard_size": 48, "data": {"n": 48, "seed": 3},
           "attacks": {"pgd": {"steps": 2}, "grid": {"steps": 2}}}
    c = restricted_config(raw, 8, tmp_path, attacks=["pgd"])
    assert c["data"] == {"n": 8, "seed": 3} and c["shard_size"] == 8
    assert c["output"] == str(tmp_path) and c["attacks"] == {"pgd": {"steps": 2}}
    assert raw["data"]["n"] == 48                          # the input is not changed
    with pytest.raises(ValueError, match=r"--attacks: the config has no attacks.fab section"):
        restricted_config(raw, 8, tmp_path, attacks=["fab"])


def test_compare_all_lists_every_differing_example():
    a = {"m@final": {1: 1, 2: 0, 3: 1}}
    b = {"m@final": {1: 0, 2: 1, 3: 0}}
    out = compare_all(a, b)["m@final"]
    assert out["baseline"] == pytest.approx(2 / 3) and out["new"] == pytest.approx(1 / 3)
    assert [d["example"] for d in out["differ"]] == [1, 2, 3]
    assert out["differ"][0] == {"example": 1, "baseline": 1, "new": 0}
    assert compare_all(a, a)["m@final"]["differ"] == []


@needs_data
def _remove_head_worktree():
    """The test's baseline worktree (benchmark.bench_protocol.baseline_tree of HEAD) goes again."""
    import tempfile
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"deqbench_baseline_{sha[:12]}"
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                   capture_output=True)


def test_bench_protocol_against_head_worktree(tmp_path, request):
    """Same code on both sides (a worktree of HEAD): every example's ALL agrees, the counts
    are per example and positive, the speed-up is a ratio of the measured walls."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "name": "bp", "output": str(tmp_path / "unused"), "seed": 0, "device": "cpu",
        "batch_size": 8, "shard_size": 8, "data": {"dataset": "fashion_mnist", "n": 48, "seed": 0,
                                                   "val_n": 8},
        "threat": {"norm": "Linf", "eps": 0.1},
        "models": [{"name": "deq_tiny_fmnist_pgdat", "defenses": ["final"]}],
        "attacks": {"pgd": {"steps": 2}, "grid": {"steps": 1, "kas": [1], "lams": [1.0]}}}))
    out = tmp_path / "bp.json"
    request.addfinalizer(_remove_head_worktree)
    r = subprocess.run([sys.executable, "-m", "benchmark.cli", "bench", "protocol", str(cfg),
                        "--n", "4", "--baseline", "HEAD", "--workers", "1", "--attacks", "pgd",
                        "--keep", str(tmp_path / "runs"), "--output", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["n"] == 4 and set(res["wall_s"]) == {"baseline", "new"}
    assert res["speedup_wall"]["median"] == pytest.approx(
        res["wall_s"]["baseline"][0] / res["wall_s"]["new"][0])
    assert res["ALL_differences"] == 0
    for side in ("baseline", "new"):
        pa = res["sides"][side]["per_attack"]
        assert set(pa) == {"clean", "pgd"} and res["sides"][side]["n"] == 4
        assert pa["pgd"]["f_backward_per_example"] > 0 and pa["clean"]["f_backward_per_example"] == 0
    f = res["f_evals_per_example"]
    assert f["baseline"] == pytest.approx(f["new"]) and f["new"] > 0
    assert "speed-up (baseline / new wall" in r.stdout and "| pgd | new |" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmark.cli", "bench", "protocol", str(cfg),
                          "--n", "4", "--baseline", "no-such-rev"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--baseline: 'no-such-rev' is not a commit" in bad.stderr
    assert "Traceback" not in bad.stderr
