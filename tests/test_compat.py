"""Tests for model_zoo/compat.py: the robustbench door and the old-API AutoAttack shim."""

import base64
import hashlib
import importlib
import importlib.util
import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPAT_PATH = REPO_ROOT / "model_zoo" / "compat.py"


def _load_compat():
    try:
        return importlib.import_module("model_zoo.compat")
    except Exception:   # model_zoo/__init__.py broken by someone else's module: load by path
        spec = importlib.util.spec_from_file_location("model_zoo_compat_under_test", COMPAT_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


compat = _load_compat()


def _run_python(code_or_args, timeout=120):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=timeout)


def _close_file_logger(logger):
    """Drop the FileHandler compat attached for a log_path (tmp files must not stay open)."""
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()


def _tiny_data(model, n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)        # all correctly classified, so every point gets attacked
    return x, y


# --------------------------------------------------------------------------------------------
# install checks
# --------------------------------------------------------------------------------------------

def test_check_robustbench_install_is_clean_in_this_venv():
    assert compat.check_robustbench_install() == []


def test_check_with_import_is_clean_in_this_venv():
    assert compat.check_robustbench_install(try_import=True) == []


def test_clash_detector_reports_fake_robustbench_without_marker_line(tmp_path):
    pkg = tmp_path / "robustbench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .data import load_cifar10\nfrom .utils import load_model\n")
    problems = compat.check_robustbench_install(site_dir=tmp_path)
    assert len(problems) == 1
    assert "pip install --no-deps --force-reinstall robustbench==1.1.1" in problems[0]
    assert "from .eval import benchmark" in problems[0]
    assert str(pkg) in problems[0]


def test_clash_detector_reports_emptied_robustbench_folder(tmp_path):
    (tmp_path / "robustbench").mkdir()
    problems = compat.check_robustbench_install(site_dir=tmp_path)
    assert len(problems) == 1
    assert compat.CLASH_REPAIR_COMMAND in problems[0]


def test_clash_detector_accepts_fake_robustbench_with_marker_line(tmp_path):
    pkg = tmp_path / "robustbench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .data import load_cifar10\nfrom .eval import benchmark\n")
    assert compat.check_robustbench_install(site_dir=tmp_path) == []


def test_clash_detector_compares_files_with_the_dist_info_record(tmp_path):
    # torchattacks overwrites eval.py & co. too: a good __init__.py is not enough.
    pkg = tmp_path / "robustbench"
    pkg.mkdir()
    init_bytes = b"from .eval import benchmark\n"
    (pkg / "__init__.py").write_bytes(init_bytes)
    (pkg / "eval.py").write_bytes(b"# torchattacks' older copy\n")
    dist = tmp_path / "robustbench-1.1.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: robustbench\nVersion: 1.1.1\n")

    def entry(name, data):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={digest},{len(data)}"

    (dist / "RECORD").write_text("\n".join([
        entry("robustbench/__init__.py", init_bytes),
        entry("robustbench/eval.py", b"# the real 1.1.1 eval.py\n"),
        "robustbench-1.1.1.dist-info/RECORD,,",
    ]) + "\n")
    problems = compat.check_robustbench_install(site_dir=tmp_path)
    assert len(problems) == 1
    assert "1 of its files differ" in problems[0]
    assert "recorded: robustbench/eval.py)" in problems[0]
    assert compat.CLASH_REPAIR_COMMAND in problems[0]


def test_missing_pkg_resources_is_reported_with_setuptools_pin(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkg_resources", None)   # makes find_spec() return None
    problems = compat.check_robustbench_install()
    assert len(problems) == 1
    assert "pip install 'setuptools>=77.0.3,<81'" in problems[0]


def test_import_robustbench_without_pkg_resources_raises_clear_error():
    code = (
        "import sys, importlib.util\n"
        "sys.modules['pkg_resources'] = None\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(COMPAT_PATH)!r})\n"
        "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
        "try:\n"
        "    c.import_robustbench()\n"
        "except c.RobustbenchInstallError as e:\n"
        "    print('RAISED', e)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "RAISED" in result.stdout
    assert "setuptools>=77.0.3,<81" in result.stdout


def test_repair_dry_run_builds_the_pip_reinstall_command(tmp_path):
    (tmp_path / "robustbench").mkdir()
    (tmp_path / "robustbench" / "__init__.py").write_text("# old copy\n")
    commands = compat.repair_robustbench_install(site_dir=tmp_path, dry_run=True)
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                         "robustbench==1.1.1"]]
    good = tmp_path / "good"
    (good / "robustbench").mkdir(parents=True)
    (good / "robustbench" / "__init__.py").write_text("from .eval import benchmark\n")
    assert compat.repair_robustbench_install(site_dir=good, dry_run=True) == []


def test_cli_check_ok_and_problem_exit_codes(tmp_path, capsys):
    result = _run_python([str(COMPAT_PATH), "--check"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "OK"

    (tmp_path / "robustbench").mkdir()
    (tmp_path / "robustbench" / "__init__.py").write_text("# old copy\n")
    assert compat.main(["--check", "--site-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("PROBLEM:")
    assert compat.CLASH_REPAIR_COMMAND in out


def test_importing_compat_is_cheap_and_silent():
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(COMPAT_PATH)!r})\n"
        "c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
        "heavy = [m for m in ('torch', 'robustbench', 'pyautoattack', 'autoattack') "
        "if m in sys.modules]\n"
        "sys.stderr.write(repr(heavy))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "[]"


# --------------------------------------------------------------------------------------------
# AutoAttack shim
# --------------------------------------------------------------------------------------------

def test_shim_gives_the_old_api_adapter():
    shim = compat.install_autoattack_shim()
    from autoattack import AutoAttack
    from autoattack.state import EvaluationState
    import pyautoattack
    import pyautoattack.state

    assert sys.modules["autoattack"] is shim
    assert AutoAttack is compat.legacy_autoattack_class()
    assert issubclass(AutoAttack, pyautoattack.AutoAttack)
    assert EvaluationState is pyautoattack.state.EvaluationState
    assert compat.install_autoattack_shim() is shim      # idempotent


def test_adapter_old_signature_run_standard_evaluation():
    compat.install_autoattack_shim()
    from autoattack import AutoAttack

    model = _tiny_model()
    x, y = _tiny_data(model)
    eps = 0.05
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu",
                           log_path=None, seed=0)
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for name in ("apgd", "apgd_targeted", "fab", "square"):
        assert hasattr(adversary, name)
    assert adversary.seed == 0
    adversary.attacks_to_run = ["apgd-ce"]
    adversary.apgd.n_iter = 5

    x_adv = adversary.run_standard_evaluation(x, y, bs=4)
    assert isinstance(x_adv, torch.Tensor)
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0

    x_adv2, y_adv = adversary.run_standard_evaluation(x, y, bs=4, return_labels=True)
    assert x_adv2.shape == x.shape and y_adv.shape == y.shape
    with torch.no_grad():
        assert torch.equal(model(x_adv2).argmax(1), y_adv)


def test_adapter_custom_version_and_individual():
    AutoAttack = compat.install_autoattack_shim().AutoAttack
    model = _tiny_model()
    x, y = _tiny_data(model, n=6)
    with pytest.raises(ValueError):
        AutoAttack(model, eps=0.05, version="standard", attacks_to_run=["apgd-ce"])
    adversary = AutoAttack(model, norm="L2", eps=0.3, version="custom",
                           attacks_to_run=["apgd-ce", "apgd-dlr"], verbose=False)
    assert adversary.device == next(model.parameters()).device   # device=None: the model's
    adversary.apgd.n_iter = 3
    adversary.apgd.n_restarts = 1
    adv = adversary.run_standard_evaluation_individual(x, y, bs=3)
    assert set(adv) == {"apgd-ce", "apgd-dlr"}
    for x_adv in adv.values():
        assert x_adv.shape == x.shape
        norms = (x_adv - x).flatten(1).norm(dim=1)
        assert norms.max().item() <= 0.3 + 1e-4
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-dlr"]   # restored afterwards


def test_adapter_log_path_and_fresh_state_path(tmp_path):
    AutoAttack = compat.install_autoattack_shim().AutoAttack
    from autoattack.state import EvaluationState

    model = _tiny_model()
    x, y = _tiny_data(model, n=4)
    log_file = tmp_path / "aa.log"
    state_file = tmp_path / "aa_state.json"
    adversary = AutoAttack(model, eps=0.05, version="standard", device="cpu", log_path=str(log_file))
    adversary.attacks_to_run = ["apgd-ce"]
    adversary.apgd.n_iter = 3
    try:
        # robustbench.benchmark's call, verbatim shape
        x_adv = adversary.run_standard_evaluation(x, y, bs=4, state_path=state_file)
        assert x_adv.shape == x.shape
        state = EvaluationState.from_disk(state_file)      # what robustbench reads afterwards
        assert state.robust_flags.shape == (4,)
        assert "apgd-ce" in log_file.read_text()
        # pyautoattack 0.2.0 cannot resume: the adapter says so instead of crashing obscurely
        with pytest.raises(NotImplementedError, match="resume"):
            adversary.run_standard_evaluation(x, y, bs=4, state_path=state_file)
    finally:
        _close_file_logger(adversary.logger)


def test_shim_leaves_a_real_old_api_autoattack_alone(monkeypatch):
    class OldAutoAttack:
        def __init__(self, model, norm="Linf", eps=.3, seed=None, verbose=True, attacks_to_run=[],
                     version="standard", is_tf_model=False, device="cuda", log_path=None):
            pass

        def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
            pass

    real = types.ModuleType("autoattack")
    real.AutoAttack = OldAutoAttack
    monkeypatch.setitem(sys.modules, "autoattack", real)
    monkeypatch.delitem(sys.modules, "autoattack.state", raising=False)
    assert compat.install_autoattack_shim() is real
    assert sys.modules["autoattack"].AutoAttack is OldAutoAttack
    assert hasattr(sys.modules["autoattack.state"], "EvaluationState")


def test_shim_shadows_an_incompatible_autoattack(monkeypatch):
    other = types.ModuleType("autoattack")

    class NewStyle:
        def __init__(self, model, *, attacks=None):
            pass

    other.AutoAttack = NewStyle
    monkeypatch.setitem(sys.modules, "autoattack", other)
    shim = compat.install_autoattack_shim()
    assert shim is not other
    assert shim.AutoAttack is compat.legacy_autoattack_class()


# --------------------------------------------------------------------------------------------
# robustbench access
# --------------------------------------------------------------------------------------------

def test_robustbench_benchmark_is_reachable_through_compat():
    rb = compat.import_robustbench()
    assert callable(rb.benchmark)
    assert callable(compat.robustbench_benchmark)
    # robustbench's eval module got the shim's AutoAttack
    assert sys.modules["robustbench.eval"].AutoAttack is compat.legacy_autoattack_class()


def test_resnet18_is_the_standard_cifar_resnet18():
    model = compat.resnet18(num_classes=10)
    assert type(model).__module__ == "robustbench.model_zoo.architectures.resnet"
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert compat.resnet18(num_classes=100).linear.out_features == 100


def test_load_model_info_json(tmp_path):
    entry = {"link": "https://example.org", "name": "x", "authors": "a", "additional_data": False,
             "number_forward_passes": 1, "dataset": "cifar10", "venue": "v",
             "architecture": "ResNet-18", "eps": "8/255", "clean_acc": "90.00", "reported": "50.00",
             "autoattack_acc": "48.00"}
    path = tmp_path / "Model.json"
    path.write_text(json.dumps(entry))
    assert compat.load_model_info_json(path) == entry
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError):
        compat.load_model_info_json(bad)


def test_robustbench_benchmark_runs_end_to_end_through_the_shim(monkeypatch, tmp_path):
    """robustbench.benchmark's own AutoAttack call, on a tiny linear net and 4 fake CIFAR images.

    The dataset loader is replaced (robustbench would download CIFAR-10); a large eps makes APGD-CE
    flip every point, so the rest of the standard suite is skipped and the test stays fast.
    """
    compat.import_robustbench()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    monkeypatch.setattr(sys.modules["robustbench.eval"], "load_clean_dataset",
                        lambda dataset, n_examples, data_dir, prepr: (x[:n_examples], y[:n_examples]))
    clean_acc, adv_acc = compat.robustbench_benchmark(
        model, n_examples=4, dataset="cifar10", threat_model="Linf", eps=0.5, batch_size=4,
        data_dir=str(tmp_path / "data"), log_path=str(tmp_path / "aa.log"))
    assert clean_acc == 1.0
    assert adv_acc == 0.0
    assert not (tmp_path / "data").exists()
    _close_file_logger(compat._logger_for(str(tmp_path / "aa.log")))


def test_robustbench_benchmark_never_downloads_unless_allowed(monkeypatch, tmp_path):
    """robustbench's own loader calls torchvision with download=True: without allow_download a
    missing CIFAR-10 is a clear error and no network function is reached; files already in
    data_dir are used (torchvision's integrity check passes, nothing is fetched)."""
    import torchvision.datasets.utils as tvu
    import torchvision.datasets.cifar as tvc
    compat.import_robustbench()
    fetched = []
    monkeypatch.setattr(tvc, "download_and_extract_archive", lambda *a, **k: fetched.append(a))
    monkeypatch.setattr(tvu, "download_and_extract_archive", lambda *a, **k: fetched.append(a))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    with pytest.raises(compat.OfflineDataError, match="allow_download=True"):
        compat.robustbench_benchmark(model, n_examples=2, dataset="cifar10", eps=0.5,
                                     data_dir=str(tmp_path / "data"), batch_size=2)
    assert fetched == []
    import torchvision.datasets as tvd
    assert tvd.CIFAR10.download is not compat._refuse_torchvision_cifar_download  # restored
    # allowed: torchvision's own download path is taken (stubbed here: it fetches nothing, so
    # the dataset is still missing afterwards and torchvision says so)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        compat.robustbench_benchmark(model, n_examples=2, dataset="cifar10", eps=0.5,
                                     data_dir=str(tmp_path / "data"), batch_size=2,
                                     allow_download=True)
    assert len(fetched) == 1


def test_robustbench_benchmark_refuses_the_broken_aa_state_path(tmp_path):
    # robustbench 1.1.1 would run the whole attack, then fail on bool_tensor.mean().
    with pytest.raises(NotImplementedError, match="aa_state_path"):
        compat.robustbench_benchmark(nn.Linear(2, 2), aa_state_path=tmp_path / "state.json")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_zoo_model_with_defense_runs_through_robustbench_benchmark_on_local_data():
    """robustbench.benchmark() end to end (its clean accuracy and its standard AutoAttack) on the
    shipped standard DEQ with the early-state defense, fed by our local loader instead of
    robustbench's downloading one. The defended forward is wrapped as the attacks see it: output
    = the reported z[7] readout, gradient = the unrolled-intermediate surrogate's."""
    import model_zoo as mz
    from attacks.surrogates import JudgedModule, UnrolledIntermediate
    from benchmark.data import load_dataset
    from model_zoo.compat import robustbench_benchmark_local
    from model_zoo.forward import EarlyState

    ds = load_dataset("fashion_mnist", "test")
    x, y = ds.images[:3], ds.labels[:3]
    deq = mz.load("deq_tiny_fmnist_standard")
    model = JudgedModule(deq, EarlyState(7), UnrolledIntermediate(7, 2, 1.0)).eval()
    with torch.no_grad():
        pred = model(x).argmax(-1)
        assert torch.equal(pred, deq.run(x, defense=EarlyState(7)).logits.argmax(-1))
    y = pred.clone()
    y[2] = (pred[2] + 1) % 10  # one point wrong from the start: robustbench must count it so
    clean, adv = robustbench_benchmark_local(model, x, y, eps=0.1, batch_size=8)
    assert clean == pytest.approx(2 / 3)
    assert adv == 0.0  # a standard-trained model: APGD-CE breaks both remaining points
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        robustbench_benchmark_local(model, x * 2, y, eps=0.1)
