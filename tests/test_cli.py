"""The deqbench command line (run in-process through benchmark.cli.main)."""
import json

import pytest

from benchmark.cli import main


def test_zoo_list_json(capsys):
    assert main(["zoo", "list", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["deq_large_cifar10"]["parameters"] == 11_097_438
    assert by_name["deq_tiny_fashion_mnist"]["dataset"] == "fashion_mnist"
    assert by_name["deq_tiny_fashion_mnist"]["checkpoint"] == "none"
    assert {"name", "dataset", "architecture", "parameters", "training", "threat_model",
            "checkpoint"} <= set(rows[0])


def test_zoo_list_table(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "deq_large_cifar10" in out and "11,097,438" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["zoo", "show", "deq_nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'deq_nonexistent'" in err


def test_eval_refuses_untrained_without_flag(capsys):
    assert main(["eval", "--model", "deq_tiny_fashion_mnist", "--dataset", "synthetic"]) == 2
    assert "--allow-untrained" in capsys.readouterr().err


def test_bench_forward_runs_and_counts(tmp_path, capsys):
    out = tmp_path / "fwd.json"
    assert main(["bench", "forward", "--model", "deq_tiny_fashion_mnist", "--batch-size", "2",
                 "--tf", "2", "--r", "0,1", "--repeats", "1", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    er = [r for r in rows if r["defense"].startswith("entropy_reduction")]
    plain = [r for r in rows if r["defense"] == "plain"]
    # inference: the 9 solver + 10 unroll evaluations all run without graph
    assert plain[0]["f_nograd"] == 19 and plain[0]["f_grad"] == 0
    # reference preset, N=8, Tf=2: 3 + 3*3 solver evals + 10 unroll; R*3 entropy-gradient steps
    assert [r["f_nograd"] for r in er] == [22, 22]
    assert [r["f_grad"] for r in er] == [0, 3]
    assert all(r["ratio"] > 0 for r in er)
