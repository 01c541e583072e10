"""The protocol-attack registry (benchmark.suite): keys, options and plan order as before the
registry; a new attack is one registered class that the config validation, the runner's plan and
the summary pick up with no change elsewhere; the runner holds no per-attack branch."""
import re
from pathlib import Path

import pytest
import torch

from benchmark import suite
from benchmark.run_config import ConfigError, from_dict
from benchmark.suite import _registry

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# the protocol as it was hard-coded in runner.ORDER / run_config.ATTACK_KEYS before the registry,
# but for top_settings, which since issue 16 runs after autoattack: it reads AutoAttack's first
# member (share_autoattack) instead of re-running it
OLD_ORDER = ("clean", "pgd", "grid", "autoattack", "top_settings", "adaptive", "checks", "transfer")
OLD_KEYS = {
    "pgd": {"steps", "alpha", "random_start", "surrogate"},
    "grid": {"steps", "alpha", "kas", "lams", "mode", "preset", "on_test_time_defenses"},
    "autoattack": {"attacks", "budget", "surrogate", "on_test_time_defenses"},
    "checks": {"steps", "alpha", "square_queries", "large_eps", "surrogate",
               "on_test_time_defenses"},
    "adaptive": {"steps", "alpha", "ka", "lam"},
    "top_settings": {"k", "attacks", "budget", "on_test_time_defenses"},
    "transfer": {"sources", "targets", "steps", "alpha", "surrogates"},
}


def test_registry_keeps_the_old_protocol():
    keys = suite.list_attacks()
    # later files (strength, ...) may add keys; the old ones keep their relative order
    assert [k for k in keys if k in OLD_ORDER] == list(OLD_ORDER)
    # an attack runs after every attack whose records it reads
    for k in keys:
        for r in getattr(suite.get_attack(k), "reads", None) or ():
            assert keys.index(r) < keys.index(k), (k, r)
    for k, opts in OLD_KEYS.items():
        assert k in suite.config_attacks()
        # every option an old config could name is still accepted (attacks may add options:
        # the adaptive protocol of issue 13 s1 does)
        assert opts <= suite.attack_options(k), k
    assert "clean" not in suite.config_attacks() and suite.get_attack("clean").always
    with pytest.raises(KeyError, match="unknown protocol attack 'cw'"):
        suite.get_attack("cw")


def test_runner_has_no_per_attack_branch():
    src = (REPO / "benchmark" / "runner.py").read_text()
    for key in OLD_ORDER:
        # the plan variable ``attack`` is never compared with a key (records' ``g.attack ==
        # "clean"`` in summarize is the base of every accuracy, not a dispatch)
        assert not re.search(rf"(?<![.\w])attack\s*[!=]=\s*['\"]{key}['\"]", src), key
        assert not re.search(rf"(?<![.\w])attack\s+in\s+\(.*['\"]{key}['\"]", src), key


def test_a_second_registration_of_a_key_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        @suite.register_attack("pgd")
        class Other(suite.ProtocolAttack):
            pass


@pytest.fixture
def toy():
    """A new protocol attack defined in one class: 'flip' records, per example, whether the
    model still classifies the horizontally flipped image correctly (not an eps-attack, so it
    must not count in ALL unless it says so)."""
    @suite.register_attack("flip")
    class Flip(suite.ProtocolAttack):
        options = {"count_in_all": False}
        order = 95

        def check(self, opts, cfg, attacks):
            if not isinstance(opts.get("count_in_all", False), bool):
                suite.config_error("attacks.flip.count_in_all",
                                   f"must be true or false, got {opts['count_in_all']!r}")

        def applicable(self, model, defense, opts):
            return not getattr(model, "is_deq", False)

        def run(self, ctx):
            with torch.no_grad():
                pred = ctx.model(ctx.x.flip(-1)).argmax(-1)
            recs = [{"setting": "flip", "example": ctx.idx[k], "label": int(ctx.y[k]),
                     "correct": int(pred[k] == ctx.y[k]), "state": ctx.state}
                    for k in range(len(ctx.idx))]
            return recs, {"attack": "flip", "seed": ctx.seed}

        def summary(self, g, clean):
            a = g[g.attack == "flip"]
            if not len(a):
                return None, {}
            s = a.set_index("example").correct
            return (s if self.count else None), {"flip": s.mean()}
    try:
        yield Flip
    finally:
        _registry._REGISTRY.pop("flip", None)


def _raw(tmp_path, **flip):
    return {"name": "toy", "output": str(tmp_path), "batch_size": 8, "shard_size": 4,
            "data": {"dataset": "fashion_mnist", "n": 8, "seed": 0},
            "threat": {"eps": 0.05}, "device": "cpu",
            "models": ["small_cnn_fmnist_pgdat", "deq_tiny_fmnist_pgdat"],
            "attacks": {"flip": flip}}


def test_new_attack_is_validated_through_the_registry(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"attacks\.flip\.mode: unknown option \(known: \['count_in_all'\]\)"):
        from_dict(_raw(tmp_path, mode=1))
    with pytest.raises(ConfigError, match=r"attacks\.flip\.count_in_all: must be true or false"):
        from_dict(_raw(tmp_path, count_in_all="yes"))
    cfg = from_dict(_raw(tmp_path, count_in_all=True))
    assert cfg.attacks["flip"] == {"count_in_all": True}


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed")
def test_new_attack_runs_in_the_plan_and_the_summary(toy, tmp_path):
    from benchmark.results_db import ResultsDB
    from benchmark.runner import evaluate
    torch.manual_seed(0)
    for count in (False, True):
        toy.count = count
        cfg = from_dict(_raw(tmp_path / str(count), count_in_all=count))
        res = evaluate(cfg, progress=False)
        assert res["complete"] and res["units_run"] == 2 * 2 * 2  # (clean, flip) x models x shards
        with ResultsDB(res["db"]) as db:
            df = db.records_frame()
            units = db.conn.execute("SELECT unit_id, n_examples, config FROM units "
                                    "WHERE attack = 'flip'").fetchall()
        flip = df[df.attack == "flip"]
        assert set(flip.model) == {"small_cnn_fmnist_pgdat"} and len(flip) == 8
        # not applicable to the DEQ: its two flip units are committed as skipped
        assert sorted(n for _, n, _ in units) == [0, 0, 4, 4]
        s = res["summary"].set_index("model")
        cnn = s.loc["small_cnn_fmnist_pgdat"]
        assert cnn.flip == pytest.approx(flip.correct.mean())
        clean = df[(df.attack == "clean") & (df.model == "small_cnn_fmnist_pgdat")]
        per = clean.set_index("example").correct
        want = (per & flip.set_index("example").correct.reindex(per.index)).mean() if count \
            else per.mean()
        assert cnn.ALL == pytest.approx(want)
