"""Issue 15: no traceback and no silent accept on bad input; non-finite and unconverged dynamics
are recorded outcomes (never a silent class 0) and flagged.

The table below drives ``benchmark.cli.main`` in-process (no subprocess: each would pay the torch
import) with malformed configs, arguments, checkpoints, data files and results databases, and
the Python API with malformed inputs. For every case: exit code 2 (or the documented exception
type), a one-line message naming the offending key / argument / file, no traceback, and nothing
written under the output folder."""
from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml

import model_zoo as mz
from benchmark.cli import main
from model_zoo.scoring import (UNCONVERGED_REL_RESIDUAL, predict, record_status, safe_margin,
                               score_logits)

ZOO = "deq_tiny_fmnist_pgdat"       # shipped, trained
ARCH = "deq_tiny_fashion_mnist"     # architecture only


# ---------------------------------------------------------------------------------------------
# fixtures: small files generated in the test
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    f = {}
    sd = mz.load(ZOO).state_dict()
    nan = {k: v.clone() for k, v in sd.items()}
    nan["stem.0.weight"].view(-1)[0] = float("nan")
    torch.save({"state_dict": nan}, d / "nan.pt")
    f["nan"] = d / "nan.pt"
    # the cell's weights x 30: finite outputs, but every solve ends at a relative residual
    # > 0.3 (measured: min 0.33, median 0.51 on 100 test images)
    big = {k: (v * 30 if k.startswith("cell.") and v.is_floating_point() else v)
           for k, v in sd.items()}
    torch.save({"state_dict": big}, d / "unconverged.pt")
    f["unconverged"] = d / "unconverged.pt"
    (d / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    f["garbage"] = d / "garbage.pt"
    torch.save({"state_dict": mz.create("small_cnn_fashion_mnist").state_dict()}, d / "other.pt")
    f["other"] = d / "other.pt"
    torch.save({"state_dict": sd}, d / "good.pt")
    f["good"] = d / "good.pt"
    f["good_sha"] = mz.sha256_file(d / "good.pt")
    (d / "folder.pt").mkdir()
    f["folder"] = d / "folder.pt"
    return f


def _base(out, **over):
    raw = {"name": "t", "output": str(out), "threat": {"eps": 0.1}, "models": [ARCH],
           "data": {"n": 4}, "shard_size": 4, "attacks": {"pgd": {"steps": 1}}}
    raw.update(over)
    return raw


def _model(**kw):
    return [{"name": ZOO, **kw}]


def _file_tree(p: Path) -> list:
    return sorted(str(q.relative_to(p)) for q in p.rglob("*")) if p.exists() else []


def _run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out + out.err


# ---------------------------------------------------------------------------------------------
# 1. run configs: (id, config (dict, or raw YAML text / bytes), regex the message must match)
# ---------------------------------------------------------------------------------------------

def _config_cases(f):
    C = []

    def add(cid, match, **over):
        C.append((cid, lambda out, over=over: _base(out, **{k: (v(f) if callable(v) else v)
                                                            for k, v in over.items()}), match))

    def text(cid, match, body):
        C.append((cid, lambda out, body=body: body.replace("OUT", str(out)), match))

    add("eps_div0", r"threat\.eps: division by zero", threat={"eps": "1/0"})
    add("eps_3parts", r"threat\.eps: .*fraction A/B.*8/255/2", threat={"eps": "8/255/2"})
    add("eps_word", r"threat\.eps: .*'abc'", threat={"eps": "abc"})
    add("eps_bool", r"threat\.eps: .*True", threat={"eps": True})
    add("eps_big", r"threat\.eps: must be a number in \[0, 1\]", threat={"eps": 5})
    add("threat_not_map", r"threat: must be a mapping", threat=0.1)
    add("ckpt_int", r"models\[0\]\.checkpoint: must be a file path", models=_model(checkpoint=123))
    add("ckpt_missing", r"models\[0\]\.checkpoint: file not found", models=_model(checkpoint="/nope.pt"))
    add("ckpt_folder", r"models\[0\]\.checkpoint: .* is not a file",
        models=lambda f: _model(checkpoint=str(f["folder"])))
    add("ckpt_garbage", r"models\[0\]\.checkpoint: cannot read checkpoint .*garbage\.pt",
        models=lambda f: _model(checkpoint=str(f["garbage"])))
    add("ckpt_wrong_model", r"models\[0\]\.checkpoint: checkpoint .*other\.pt does not fit",
        models=lambda f: _model(checkpoint=str(f["other"])))
    add("sha_mismatch", r"models\[0\]\.sha256: .*good\.pt has SHA-256 [0-9a-f]{64}, not the given",
        models=lambda f: _model(checkpoint=str(f["good"]), sha256="0" * 64))
    add("sha_malformed", r"models\[0\]\.sha256: must be 64 hexadecimal digits",
        models=lambda f: _model(checkpoint=str(f["good"]), sha256="xyz"))
    add("sha_no_ckpt", r"models\[0\]\.sha256: given without a checkpoint", models=_model(sha256="0" * 64))
    add("name_list", r"^\S*t\.yaml: name: .*\['a', 'b'\]", name=["a", "b"])
    add("name_dotdot", r"name: .*'\.\.'", name="..")
    add("name_slash", r"name: .*'a/b'", name="a/b")
    add("name_parent", r"name: .*'\.\./x'", name="../x")
    add("name_hidden", r"name: .*'\.hidden'", name=".hidden")
    add("name_int", r"name: .*123", name=123)
    add("label_space", r"models\[0\]\.label: .*'a b'", models=_model(label="a b"))
    add("label_dotdot", r"models\[0\]\.label: .*'\.\.'", models=_model(label=".."))
    add("attack_list", r"attacks\.pgd: must be a mapping of options.*\[1, 2\]", attacks={"pgd": [1, 2]})
    add("attack_word", r"attacks\.pgd: must be a mapping of options.*'fast'", attacks={"pgd": "fast"})
    add("attacks_word", r"attacks: must be a mapping", attacks="pgd")
    add("alpha_bool", r"attacks\.pgd\.alpha: .*True", attacks={"pgd": {"alpha": True}})
    add("alpha_zero", r"attacks\.pgd\.alpha: must be a number in \(0, 1\]", attacks={"pgd": {"alpha": 0}})
    add("kas_bool", r"attacks\.grid\.kas: .*True", attacks={"grid": {"kas": [True]}})
    add("kas_scalar", r"attacks\.grid\.kas: must be a non-empty list", attacks={"grid": {"kas": 5}})
    add("lams_bool", r"attacks\.grid\.lams: .*True", attacks={"grid": {"lams": [True]}})
    add("steps_zero", r"attacks\.pgd\.steps: must be an integer >= 1", attacks={"pgd": {"steps": 0}})
    add("steps_float", r"attacks\.pgd\.steps: .*2\.5", attacks={"pgd": {"steps": 2.5}})
    add("aa_budget_str", r"attacks\.autoattack\.budget\.apgd_n_iter: .*'abc'",
        attacks={"autoattack": {"budget": {"apgd_n_iter": "abc"}}})
    add("aa_attacks_str", r"attacks\.autoattack\.attacks: must be a non-empty list",
        attacks={"autoattack": {"attacks": "apgd-ce"}})
    add("n_too_big", r"data\.n: 20000 is larger than the fashion_mnist test set \(10,000",
        data={"n": 20000})
    add("n_zero", r"data\.n: must be an integer >= 1", data={"n": 0})
    add("first_n_str", r"data\.first_n: must be true .*'yes'", data={"n": 4, "first_n": "yes"})
    add("data_list", r"data: must be a mapping", data=[1])
    add("dataset_int", r"data\.dataset: 5 does not match", data={"n": 4, "dataset": 5})
    add("device_tpu", r"device: must be 'cpu' or 'cuda\[:k\]' or 'auto'", device="tpu")
    add("batch_zero", r"batch_size: must be an integer >= 1", batch_size=0)
    add("output_int", r"output: must be a folder path", output=123)
    add("output_file", r"t\.yaml: output: .*good\.pt exists and is not a folder",
        output=lambda f: str(f["good"]))
    add("reliability_neg", r"reliability\.residual_threshold: must be a number > 0",
        reliability={"residual_threshold": -1})
    add("reliability_key", r"reliability\.foo: unknown key", reliability={"foo": 1})
    add("unknown_top", r"epochs: unknown key", epochs=3)
    add("models_empty", r"models: a non-empty list", models=[])
    add("model_name_int", r"models\[0\]\.name: must be a registered model name", models=[{"name": 123}])
    add("defenses_str", r"models\[0\]\.defenses: must be a list", models=_model(defenses="final"))
    add("defense_bad", r"models\[0\]\.defenses: .*index must be an integer",
        models=_model(defenses=["early:x"]))
    text("dup_top", r"t\.yaml: not valid YAML: line \d+, column \d+: duplicate key 'name'",
         "name: a\nname: b\noutput: OUT\nthreat: {eps: 0.1}\nmodels: [deq_tiny_fashion_mnist]\n")
    text("dup_nested", r"t\.yaml: not valid YAML: line \d+, column \d+: duplicate key 'eps'",
         "name: a\noutput: OUT\nthreat:\n  eps: 0.1\n  eps: 0.3\nmodels: [deq_tiny_fashion_mnist]\n")
    text("dup_deep", r"t\.yaml: not valid YAML: line \d+, column \d+: duplicate key 'steps'",
         "name: a\noutput: OUT\nthreat: {eps: 0.1}\nmodels: [deq_tiny_fashion_mnist]\n"
         "attacks:\n  pgd: {steps: 1, steps: 2}\n")
    text("dup_in_list", r"t\.yaml: not valid YAML: line \d+, column \d+: duplicate key 'name'",
         "name: a\noutput: OUT\nthreat: {eps: 0.1}\nmodels:\n  - {name: x, name: y}\n")
    text("bad_yaml", r"t\.yaml: not valid YAML: line 2, column 1: expected ',' or '\]'", "name: [unclosed\n")
    text("yaml_list", r"run config must be a YAML mapping, got list", "- a\n- b\n")
    text("yaml_empty", r"run config must be a YAML mapping, got NoneType", "")
    text("python_tag", r"t\.yaml: not valid YAML: line 1, column 7: could not determine a constructor for the tag .*python/object",
         "name: !!python/object/apply:os.system ['true']\n")
    C.append(("non_utf8", lambda out: b"name: t\noutput: " + str(out).encode() + b"\n# \xff\xfe\n",
              r"t\.yaml: not UTF-8 text \(byte 0xff"))
    return C


_CONFIG_IDS = [c[0] for c in _config_cases({})]


@pytest.mark.parametrize("cid", _CONFIG_IDS)
def test_bad_run_config(cid, files, tmp_path, capsys):
    case = {c[0]: c for c in _config_cases(files)}[cid]
    out = tmp_path / "out"
    cfg = case[1](out)
    path = tmp_path / "t.yaml"
    if isinstance(cfg, bytes):
        path.write_bytes(cfg)
    elif isinstance(cfg, str):
        path.write_text(cfg)
    else:
        path.write_text(yaml.safe_dump(cfg))
    rc, text = _run_cli(["evaluate", str(path), "--quiet"], capsys)
    assert rc == 2, text
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("deqbench: error: "), text
    assert re.search(case[2], lines[0][len("deqbench: error: "):]), lines[0]
    assert _file_tree(out) == [] and not (out.parent / "results.sqlite").exists()


def test_missing_config_file(tmp_path, capsys):
    rc, text = _run_cli(["evaluate", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2 and "config file not found: " + str(tmp_path / "nope.yaml") in text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------------------------
# 2. command-line arguments of eval / attack (the same validator, errors name the argument)
# ---------------------------------------------------------------------------------------------

def _cli_cases(f):
    E = ["eval", "--model", ZOO, "--n", "4"]
    A = ["attack", "--model", ZOO, "--n", "4"]
    return [
        ("eval_batch0", E + ["--batch-size", "0"], r"argument --batch-size: must be an integer >= 1"),
        ("attack_batch0", A + ["--batch-size", "0"], r"argument --batch-size: must be an integer >= 1"),
        ("eval_n0", ["eval", "--model", ZOO, "--n", "0"], r"argument --n: must be an integer >= 1"),
        ("eval_n_big", ["eval", "--model", ZOO, "--n", "20000"], r"argument --n: 20000 is larger"),
        ("eval_first_n_big", ["eval", "--model", ZOO, "--n", "10001", "--first-n"], r"argument --n:"),
        ("eval_seed_neg", E + ["--seed", "-1"], r"argument --seed: must be an integer >= 0"),
        ("eval_device", E + ["--device", "tpu"], r"argument --device: must be 'cpu'"),
        ("eval_model", ["eval", "--model", "nope", "--n", "4"], r"argument --model: unknown model 'nope'"),
        ("eval_ckpt_missing", E + ["--checkpoint", "/nope.pt"], r"argument --checkpoint: file not found"),
        ("eval_ckpt_garbage", E + ["--checkpoint", str(f["garbage"])], r"cannot read checkpoint .*garbage\.pt"),
        ("eval_sha", E + ["--checkpoint", str(f["good"]), "--sha256", "1" * 64],
         r"argument --sha256: .*good\.pt has SHA-256"),
        ("eval_sha_alone", E + ["--sha256", "1" * 64], r"argument --sha256: given without a checkpoint"),
        ("eval_defense_json", E + ["--defense", "{bad json"], r"argument --defense: not valid JSON"),
        ("eval_defense_json_name", E + ["--defense", '{"name": "nope"}'],
         r"argument --defense: unknown defense 'nope'"),
        ("eval_defense_json_list", E + ["--defense", "[1]"], r"argument --defense: unknown defense|argument --defense"),
        ("eval_defense_early", E + ["--defense", "early:x"], r"argument --defense: .*index must be an integer"),
        ("eval_threshold", E + ["--residual-threshold", "0"], r"argument --residual-threshold: must be a number > 0"),
        ("attack_eps5", A + ["--eps", "5"], r"argument --eps: must be a number in \[0, 1\]"),
        ("attack_eps_div0", A + ["--eps", "1/0"], r"argument --eps: division by zero"),
        ("attack_eps_3parts", A + ["--eps", "8/255/2"], r"argument --eps: .*'8/255/2'"),
        ("attack_eps_word", A + ["--eps", "big"], r"argument --eps: .*'big'"),
        ("attack_steps0", A + ["--steps", "0"], r"argument --steps: must be an integer >= 1"),
        ("attack_steps_word", A + ["--steps", "x"], r"argument --steps: invalid int value"),
        ("attack_alpha0", A + ["--alpha", "0"], r"argument --alpha: must be a number in \(0, 1\]"),
        ("attack_alpha_word", A + ["--alpha", "true"], r"argument --alpha: invalid float value"),
        ("attack_name", A + ["--attack", "nope"], r"argument --attack: unknown attack 'nope'"),
        ("attack_ta_name", A + ["--attack", "torchattacks:Nope"], r"argument --attack: torchattacks has no attack 'Nope'"),
        ("attack_ta_bare", A + ["--attack", "torchattacks"], r"argument --attack: unknown attack"),
        ("ta_arg_no_eq", A + ["--attack", "torchattacks:PGD", "--ta-arg", "steps"],
         r"argument --ta-arg: expected KEY=VALUE, got 'steps'"),
        ("ta_arg_unknown", A + ["--attack", "torchattacks:PGD", "--ta-arg", "bogus=1"],
         r"argument --ta-arg: torchattacks\.PGD takes no 'bogus'"),
        ("ta_arg_on_pgd", A + ["--ta-arg", "steps=3"], r"argument --ta-arg: only for --attack torchattacks"),
        ("aa_budget_abc", A + ["--attack", "autoattack", "--aa-budget", "apgd_n_iter=abc"],
         r"argument --aa-budget: apgd_n_iter: expected an integer, got 'abc'"),
        ("aa_budget_zero", A + ["--attack", "autoattack", "--aa-budget", "apgd_n_iter=0"],
         r"argument --aa-budget: must be an integer >= 1"),
        ("aa_budget_knob", A + ["--attack", "autoattack", "--aa-budget", "bogus=3"],
         r"argument --aa-budget: unknown knob"),
        ("aa_attacks", A + ["--attack", "autoattack", "--aa-attacks", "apgd-ce,cw"],
         r"argument --aa-attacks: unknown attack 'cw'"),
        ("kas_x", A + ["--attack", "grid", "--kas", "x"], r"argument --kas: expected integers or ranges"),
        ("kas_0", A + ["--attack", "grid", "--kas", "0,1"], r"argument --kas: every Ka must be an integer >= 1, got 0"),
        ("kas_range", A + ["--attack", "grid", "--kas", "5-2"], r"argument --kas: expected integers or ranges"),
        ("lams_x", A + ["--attack", "grid", "--lams", "x"], r"argument --lams: expected comma-separated numbers"),
        ("lams_2", A + ["--attack", "grid", "--lams", "2"], r"argument --lams: every lambda must be in \(0, 1\], got 2"),
        ("mode", A + ["--attack", "grid", "--mode", "fast"], r"argument --mode: invalid choice"),
        ("surrogate", A + ["--surrogate", "bogus"], r"argument --surrogate: "),
        ("bench_batch0", ["bench", "forward", "--batch-size", "0"], r"argument --batch-size: must be an integer >= 1"),
        ("bench_grid_n0", ["bench", "grid", "--n", "0"], r"argument --n: must be an integer >= 1"),
        ("bench_forward_tf", ["bench", "forward", "--tf", "1,x"], r"argument --tf: expected integers"),
        ("bench_grid_kas", ["bench", "grid", "--kas", "1-x"], r"argument --kas: expected integers"),
        ("bench_grid_modes", ["bench", "grid", "--modes", "efficient,fast"],
         r"argument --modes: unknown mode 'fast'"),
    ]


_CLI_IDS = [c[0] for c in _cli_cases({"garbage": "g", "good": "g"})]


@pytest.mark.parametrize("cid", _CLI_IDS)
def test_bad_cli_argument(cid, files, tmp_path, capsys):
    _, argv, match = {c[0]: c for c in _cli_cases(files)}[cid]
    out = tmp_path / "out"
    if argv[0] in ("eval", "attack"):
        argv = argv + ["--output", str(out / "r.json")]
    rc, text = _run_cli(argv, capsys)
    assert rc == 2, text
    assert "Traceback" not in text
    err = [ln for ln in text.splitlines() if "error" in ln]
    assert len(err) == 1 and re.search(match, err[0]), text
    assert _file_tree(out) == []


# ---------------------------------------------------------------------------------------------
# 3. results databases given to evaluate / tables / figures: name the file, say how to recover
# ---------------------------------------------------------------------------------------------

def _bad_db(kind: str, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path.write_text("this is not a database\n" * 20)
    elif kind == "zeros":
        path.write_bytes(b"\x00" * 4096)
    else:  # a real database, truncated after its first page
        con = sqlite3.connect(str(path))
        con.execute("CREATE TABLE x (a)")
        con.executemany("INSERT INTO x VALUES (?)", [("y" * 500,)] * 200)
        con.commit()
        con.close()
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 3])


@pytest.mark.parametrize("command", ["tables", "figures", "evaluate"])
@pytest.mark.parametrize("kind", ["text", "zeros", "truncated"])
def test_corrupt_results_database(command, kind, tmp_path, capsys):
    out = tmp_path / "out"
    db = out / "t" / "results.sqlite"
    _bad_db(kind, db)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    if command == "evaluate":
        cfg = tmp_path / "t.yaml"
        cfg.write_text(yaml.safe_dump(_base(out, data={"n": 4, "dataset": "fashion_mnist"})))
        argv = ["evaluate", str(cfg), "--quiet"]
    else:
        argv = [command, str(out / "t")]
    rc, text = _run_cli(argv, capsys)
    assert rc == 2, text
    assert "Traceback" not in text
    assert str(db) in text and "move it aside" in text, text
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing touched, no -wal / -shm files


def test_tables_on_missing_run_writes_nothing(tmp_path, capsys):
    rc, text = _run_cli(["tables", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "Traceback" not in text and str(tmp_path / "nope") in text
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------------------------------------
# 4. the Python API: InputError naming the problem (documented: images are not converted)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = mz.create("small_cnn_fashion_mnist").eval()
    return m, torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])


def _api_cases():
    from attacks.evaluation import autoattack_attack, pgd_attack, torchattacks_attack
    from attacks.surrogates import JudgedModule

    def pgd(x, y):
        return lambda m: pgd_attack(JudgedModule(m, None), x, y, 0.1, 0.025, 1)
    x = torch.rand(4, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3])
    return [
        ("float64_images", pgd(x.double(), y), r"dtype torch\.float32 \(the model's\), got torch\.float64; convert with x\.to"),
        ("float16_images", pgd(x.half(), y), r"got torch\.float16"),
        ("labels_range", pgd(x, torch.tensor([0, 1, 2, 10])), r"labels must lie in 0\.\.9, got values in \[0, 10\]"),
        ("labels_negative", pgd(x, torch.tensor([0, -1, 2, 3])), r"labels must lie in 0\.\.9, got values in \[-1, 3\]"),
        ("labels_length", pgd(x, torch.tensor([0, 1, 2])), r"labels: 3 labels for 4 images"),
        ("labels_float", pgd(x, y.float()), r"labels must be an integer tensor .*torch\.float32"),
        ("labels_2d", pgd(x, y[:, None]), r"labels must have shape \(B,\), got shape \(4, 1\)"),
        ("labels_list", pgd(x, [0, 1, 2, 3]), r"labels must be a torch\.Tensor"),
        ("images_list", pgd([[0.5]], y), r"images must be a torch\.Tensor"),
        ("images_range", pgd(x + 0.0001 + (1 - x.max()), y), r"got values in \[0\.\d+, 1\.000\d+\]"),
        ("aa_labels", lambda m: autoattack_attack(JudgedModule(m, None), x, y[:2], 0.1), r"2 labels for 4 images"),
        ("ta_labels", lambda m: torchattacks_attack(JudgedModule(m, None), x, y.float(), 0.1, "FGSM"),
         r"integer tensor"),
    ]


@pytest.mark.parametrize("cid", [c[0] for c in _api_cases()])
def test_bad_api_input_raises_input_error(cid, small):
    _, call, match = {c[0]: c for c in _api_cases()}[cid]
    with pytest.raises(mz.InputError, match=match):
        call(small[0])


def test_values_within_rounding_of_the_unit_interval_are_accepted(small):
    m, x, _ = small
    x = x.clone()
    x.view(-1)[0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))   # 1 + 1 ulp
    x.view(-1)[1] = -torch.finfo(torch.float32).tiny                        # -0 rounding
    assert m(x).shape == (4, 10)


def test_grid_attack_label_check(tiny_model):
    from attacks.evaluation import grid_attack
    from attacks.surrogates import grid_settings
    with pytest.raises(mz.InputError, match="0..9"):
        grid_attack(tiny_model, tiny_model.defense, torch.rand(2, 1, 28, 28), torch.tensor([0, 12]),
                    0.1, 0.025, 1, settings=grid_settings(8, kas=[1], lams=(1.0,)))


# ---------------------------------------------------------------------------------------------
# 5. scoring: non-finite logits are wrong, never class 0
# ---------------------------------------------------------------------------------------------

def test_score_logits_nonfinite_rows_are_wrong():
    logits = torch.tensor([[float("nan")] * 3, [1.0, 0, 0], [float("inf"), 0, 0], [0, 2.0, 0]])
    y = torch.tensor([0, 0, 0, 1])
    correct, nonfinite = score_logits(logits, y)
    assert correct.tolist() == [False, True, False, True]
    assert nonfinite.tolist() == [True, False, True, False]
    assert predict(logits).tolist() == [-1, 0, -1, 1]
    m = safe_margin(logits, y)
    assert m[0] == m[2] == float("-inf") and m[1] == 1.0 and m[3] == 2.0
    # huge finite logits: no overflow to a non-finite margin
    assert torch.isfinite(safe_margin(torch.tensor([[3e38, -3e38]]), torch.tensor([0]))).all()
    assert record_status(float("-inf"), [0.1]) == ("nonfinite", 0.1)
    assert record_status(0.5, [0.1, float("nan")])[0] == "nonfinite"
    assert record_status(0.5, [0.9, UNCONVERGED_REL_RESIDUAL + 0.01])[0] == "unconverged"
    assert record_status(0.5, [0.9, 0.05]) == ("ok", 0.05)
    assert record_status(float("inf"), None) == ("ok", None)  # +inf: a worst case over nothing


class _HalfNaN(torch.nn.Module):
    """A linear classifier whose logits are NaN for images brighter than 0.5 on average."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(784, 10)

    def forward(self, x):
        out = self.lin(x.flatten(1))
        bright = x.flatten(1).mean(1, keepdim=True) > 0.5
        return torch.where(bright, torch.full_like(out, float("nan")), out)


def test_attacks_on_partly_nonfinite_model_record_wrong_without_traceback():
    from attacks.evaluation import autoattack_attack, pgd_attack, torchattacks_attack
    from attacks.surrogates import JudgedModule
    from model_zoo.baselines import CheckedClassifier
    torch.manual_seed(0)
    m = CheckedClassifier(_HalfNaN(), 1, (28, 28), 10).eval()
    x = torch.cat([torch.rand(4, 1, 28, 28) * 0.4, 0.6 + 0.4 * torch.rand(4, 1, 28, 28)])
    with torch.no_grad():
        y = m.net.lin(x.flatten(1)).argmax(-1)   # the finite rows' own predictions: all correct
    j = JudgedModule(m, None)
    outs = [pgd_attack(j, x, y, 0.05, 0.01, 3), autoattack_attack(j, x, y, 0.05,
            attacks=["apgd-ce", "square"], budget={"apgd_n_iter": 3, "square_n_queries": 5}),
            torchattacks_attack(j, x, y, 0.05, "PGD", steps=2)]
    for o in outs:
        assert not o.correct[4:].any()                     # NaN rows: wrong under every attack
        recs = o.records()
        assert all(r["nonfinite"] and r["margin"] == float("-inf") for r in recs[4:])
        assert torch.isfinite(o.x_adv).all()


# ---------------------------------------------------------------------------------------------
# 6. a NaN-weight and an unconverged model through eval, attack, evaluate and leaderboard
# ---------------------------------------------------------------------------------------------

def test_nan_and_unconverged_models_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, text = _run_cli(["eval", "--model", ZOO, "--checkpoint", str(files["nan"]), "--n", "8",
                         "--first-n", "--output", str(out / "eval.json")], capsys)
    assert rc == 0, text
    assert "clean accuracy of the reported forward: 0.00%" in text
    assert "non-finite outputs (counted wrong): 8 of 8" in text and "WARNING" in text
    res = json.loads((out / "eval.json").read_text())
    assert res["summary"]["clean_acc"] == 0 and res["summary"]["nonfinite"] == 8
    assert res["dataset"]["first_n"] and [e["index"] for e in res["per_example"]] == list(range(8))
    assert all(e["status"] == "nonfinite" and e["pred"] == -1 and not e["correct"]
               for e in res["per_example"])
    assert res["checkpoint_sha256"] == mz.sha256_file(files["nan"])
    assert res["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert res["device_requested"] == "auto"

    rc, text = _run_cli(["eval", "--model", ZOO, "--checkpoint", str(files["unconverged"]), "--n",
                         "8", "--output", str(out / "unc.json")], capsys)
    assert rc == 0, text
    assert re.search(r"unconverged \(final relative residual > 0\.3\): 8 of 8 \(100\.0%\)", text)
    unc = json.loads((out / "unc.json").read_text())
    assert {e["status"] for e in unc["per_example"]} == {"unconverged"}

    rc, text = _run_cli(["attack", "--model", ZOO, "--checkpoint", str(files["nan"]), "--n", "8",
                         "--eps", "8/255", "--steps", "2", "--output", str(out / "atk.json")], capsys)
    assert rc == 0, text
    atk = json.loads((out / "atk.json").read_text())
    assert atk["summary"]["robust_accuracy"] == 0 and atk["summary"]["nonfinite"] == 8
    assert abs(atk["attack"]["eps"] - 8 / 255) < 1e-12
    assert all(r["status"] == "nonfinite" and r["margin"] is None for r in atk["per_example"])

    cfg = {"name": "broken", "output": str(out), "threat": {"eps": 0.1}, "shard_size": 8,
           "data": {"n": 8, "first_n": True},
           "models": [{"name": ZOO, "checkpoint": str(files["nan"]), "label": "nanw",
                       "sha256": mz.sha256_file(files["nan"])},
                      {"name": ZOO, "checkpoint": str(files["unconverged"]), "label": "unconv"},
                      {"name": ZOO}],
           "attacks": {"pgd": {"steps": 2}}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, text = _run_cli(["leaderboard", str(path), "--root", str(tmp_path / "lb"), "--quiet"], capsys)
    assert rc == 0, text
    assert re.search(r"warning: nanw \[final\]: 8 of 8 examples have non-finite", text)
    assert re.search(r"warning: unconv \[final\]: [6-8] of 8 examples \(\d+\.\d%\) end with a "
                     r"relative residual > 0\.3", text)
    entries = {p.stem: json.loads(p.read_text())
               for p in (tmp_path / "lb").rglob("*.json")}
    nanw, unconv, ok = entries["nanw"], entries["unconv"], entries[ZOO]
    assert nanw["clean_acc"] == "0.00" and nanw["autoattack_acc"] == "0.00"
    assert nanw["deq"]["flags"]["nonfinite"] == {"flag": True, "examples": 8, "n": 8}
    assert unconv["deq"]["flags"]["unconverged"]["flag"] is True
    assert unconv["deq"]["flags"]["nonfinite"]["flag"] is False
    assert not ok["deq"]["flags"]["nonfinite"]["flag"] and not ok["deq"]["flags"]["unconverged"]["flag"]
    md = next((tmp_path / "lb").rglob("leaderboard.md")).read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("|") and "nanw" in ln)
    assert "nonfinite" in row
    from benchmark.results_db import ResultsDB
    with ResultsDB(out / "broken" / "results.sqlite", create=False) as db:
        df = db.records_frame()
        meta = db.meta()
    nan_recs = df[df.model == "nanw"]
    assert set(nan_recs.status) == {"nonfinite"} and nan_recs.correct.sum() == 0
    unc_clean = df[(df.model == "unconv") & (df.attack == "clean")]
    assert (unc_clean.status == "unconverged").sum() >= 6   # measured: 7 of the first 8
    assert ((unc_clean.status == "unconverged") == (unc_clean.final_residual > 0.3)).all()
    st = df[df.model == "unconv"]
    assert ((st.status == "unconverged") == (st.final_residual > 0.3)).all()
    assert meta["dataset"]["indices"] == list(range(8))
    assert meta["config"]["models"][0]["sha256"] == mz.sha256_file(files["nan"])
    assert meta["weights"]["nanw"] == mz.sha256_file(files["nan"])


def test_typed_ta_args_and_parse_value():
    from benchmark.cli import parse_value
    assert parse_value("True") is True and parse_value("false") is False
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("1e-3") == 1e-3 and parse_value(".5") == 0.5
    assert parse_value("8/255") == 8 / 255
    assert parse_value("none") is None and parse_value("ce") == "ce"


def test_device_auto_is_the_default_everywhere():
    from benchmark.cli import build_parser
    from benchmark.run_config import from_dict
    from model_zoo.train_config import TrainConfig
    p = build_parser()
    for argv in (["eval", "--model", ZOO], ["attack", "--model", ZOO], ["bench", "forward"],
                 ["bench", "grid"], ["bench", "train", "--config", "x"]):
        assert p.parse_args(argv).device == "auto"
    cfg = from_dict({"name": "t", "threat": {"eps": 0.1}, "models": [ARCH]})
    assert cfg.device_requested == "auto"
    assert cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert TrainConfig().device == "auto"


def test_console_entry_point_exit_code_and_one_line(tmp_path):
    """The real process (one subprocess: each costs a torch import): exit status 2, one line on
    stderr naming the argument, no traceback, no output file."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "benchmark.cli", "attack", "--model", ZOO, "--eps",
                        "5", "--output", str(tmp_path / "out" / "r.json")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "deqbench: error: argument --eps: must be a number in [0, 1] (images live in [0, 1]), "
        "got '5'"]
    assert "Traceback" not in r.stdout + r.stderr and not (tmp_path / "out").exists()
