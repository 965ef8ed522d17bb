"""Windows, macOS, notebooks and other locales, simulated on Linux: what CI cannot run, it
imitates."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, epochs_without_time, interrupt_at, run_main, tiny_idx_dir
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import dataset
import files
import machine
import main
import plot
import predict
import runs

TINY = ("--train-limit", "200", "--test-limit", "100", "--device", "cpu")


# ------------------------------------------------------------ Windows


@pytest.fixture
def like_windows(monkeypatch):
    """os.chmod that takes no file descriptor (Windows before Python 3.13) and symlinks that need a
    privilege."""
    real_chmod = os.chmod

    def chmod(path, mode, **kwargs):
        if isinstance(path, int):
            raise TypeError("chmod: path should be string, bytes or os.PathLike, not int")
        return real_chmod(path, mode, **kwargs)

    def symlink(*args, **kwargs):
        raise OSError(errno.EPERM, "A required privilege is not held by the client")

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "symlink", symlink)
    # Python 3.10's pathlib holds its own os.symlink
    monkeypatch.setattr(Path, "symlink_to", symlink)


def test_training_resume_and_plot_work_without_symlinks_or_chmod_on_descriptors(
    mnist_dir, tmp_path, monkeypatch, like_windows
):
    common = (*TINY, "--model", "mlp,lenet5", "--epochs", "2")
    assert run_main(mnist_dir, tmp_path, *common, name="whole") == 0
    real_train = main.train
    monkeypatch.setattr(main, "train", interrupt_at(3))
    assert run_main(mnist_dir, tmp_path, *common, name="cut") == 130
    monkeypatch.setattr(main, "train", real_train)
    latest = tmp_path / "latest"
    assert not latest.is_symlink() and latest.read_text(encoding="utf-8") == "cut\n"
    assert main.main(["--resume", str(latest), "--quiet"]) == 0
    for name in ("mlp", "lenet5"):
        assert epochs_without_time(tmp_path / "cut" / name / "stats.json") == epochs_without_time(
            tmp_path / "whole" / name / "stats.json"
        )
    assert plot.main([str(latest)]) == 0 and (tmp_path / "cut/plots/lenet5_confusion.png").is_file()
    stroke = np.zeros((40, 40), np.uint8)
    stroke[5:35, 18:22] = 255
    Image.fromarray(stroke).save(tmp_path / "one.png")
    assert predict.main([str(tmp_path / "one.png"), "--run", str(latest)]) == 0


def test_a_rename_onto_a_file_held_open_is_retried_then_reported_in_one_line(
    tmp_path, monkeypatch, capsys
):
    target = tmp_path / "stats.json"
    target.write_text("old")
    real_replace, refusals = os.replace, [2]
    waits = []
    monkeypatch.setattr(files.time, "sleep", waits.append)

    def replace_refused_while_open(src, dst):
        if refusals[0] > 0:
            refusals[0] -= 1
            raise PermissionError(errno.EACCES, "Access is denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_refused_while_open)
    files.write_text(target, "new")  # an antivirus let go after two tries
    assert target.read_text() == "new" and len(waits) == 2

    refusals[0] = 100  # an editor that never lets go
    with pytest.raises(PermissionError) as error:
        files.write_text(target, "newer")
    assert (
        str(error.value)
        == f"[Errno {errno.EACCES}] Access is denied (is it open in another program?): '{target}'"
    )
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [
        "stats.json"
    ]
    assert sum(waits[2:]) < 2  # retried briefly, not for ever


def test_a_run_whose_stats_file_stays_open_stops_in_one_line(
    mnist_dir, tmp_path, monkeypatch, capsys
):
    real_replace = os.replace
    monkeypatch.setattr(files.time, "sleep", lambda s: None)

    def replace(src, dst):
        if str(dst).endswith("stats.json"):
            raise PermissionError(errno.EACCES, "Access is denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert run_main(mnist_dir, tmp_path, *TINY, "--model", "mlp", "--epochs", "1") == 1
    err = capsys.readouterr().err
    stats = tmp_path / "run/mlp/stats.json"
    assert err.startswith(
        f"error: {stats}: Access is denied (is it open in another program?); completed epochs"
    )
    assert err.count("\n") == 1


# ------------------------------------------------------------ locales and consoles


@pytest.fixture(scope="module")
def cp949_locale(tmp_path_factory):
    """Korean Windows' code page as this machine's locale, compiled into a folder of the test's
    own."""
    folder = tmp_path_factory.mktemp("locales")
    subprocess.run(["localedef", "-i", "ko_KR", "-f", "CP949", folder / "ko_KR.CP949"], check=True)
    return {
        "LOCPATH": str(folder),
        "LC_ALL": "ko_KR.CP949",
        "LANG": "ko_KR.CP949",
        "PYTHONUTF8": "0",
    }


def script(*argv, env=None, cwd=None):
    """Run one of the project's scripts in a fresh interpreter; the CompletedProcess."""
    env = {**os.environ, "PYTHONIOENCODING": "", **(env or {})}
    return subprocess.run(
        [sys.executable, *argv], env=env, cwd=cwd, capture_output=True, timeout=300
    )


def test_every_text_file_is_utf8_under_a_cp949_locale(mnist_dir, tmp_path, cp949_locale):
    probe = script("-c", "import locale; print(locale.getpreferredencoding())", env=cp949_locale)
    assert probe.stdout.decode().strip().lower() == "cp949"  # the simulation holds
    out = os.fsencode(tmp_path) + "/런".encode()  # a folder a UTF-8 program made: not text in CP949
    args = [b"--data-dir", mnist_dir, b"--out-dir", out, b"--run-name", b"seeds", *TINY]
    args += b"--model mlp --seeds 0,1 --epochs 1 --quiet".split()
    for argv in ([ROOT / "main.py", *args], [ROOT / "plot.py", out + b"/seeds"]):
        done = script(*argv, env=cp949_locale)
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode(
            "cp949", "replace"
        )
    run = tmp_path / "런/seeds"  # here, where names are UTF-8, the folder reads as it was made
    report = (run / "report.md").read_bytes().decode("utf-8")
    assert "±" in report
    for path in [run / "config.json", run / "mlp/seed0/stats.json"]:
        json.loads(path.read_bytes().decode("utf-8"))


def test_a_hangul_path_on_a_cp1252_console_and_a_name_that_is_not_utf8_work(mnist_dir, tmp_path):
    # and Latin-1 bytes below, under this machine's UTF-8
    out = os.fsencode(tmp_path / "런") + b"/caf\xe9"
    args = [b"--data-dir", mnist_dir, b"--out-dir", out, b"--run-name", b"r\xe9", *TINY]
    args += b"--model mlp --epochs 1 --quiet".split()
    console = {"PYTHONIOENCODING": "cp1252"}
    trained = script(ROOT / "main.py", *args, env=console)
    plotted = script(ROOT / "plot.py", out + b"/latest", env=console)  # it reads config.json back
    for done in (trained, plotted):
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode(
            "cp1252"
        )
        assert b"\\ub7f0" in done.stdout  # the path, escaped where the console has no glyph for it
    run = Path(os.fsdecode(out)) / "latest"
    config = json.loads((run / "config.json").read_bytes().decode("utf-8"))
    assert os.fsencode(config["out_dir"]) == out  # the name as the system gave it
    assert (run / "plots/mlp_curves.png").exists()
    assert (run / "report.md").read_bytes().startswith(b"# Report: r\xe9\n")


# ------------------------------------------------------------ MPS: no float64


class NoFloat64(TorchDispatchMode):
    """Fails any operation that takes or makes a float64 tensor, as MPS cannot hold one."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        pending = [args, kwargs, out]
        while pending:
            value = pending.pop()
            if isinstance(value, (list, tuple)):
                pending += value
            elif isinstance(value, dict):
                pending += value.values()
            elif isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                raise AssertionError(f"{func} uses a float64 tensor")
        return out


def test_an_epoch_of_every_model_uses_no_float64(mnist_dir, tmp_path):
    with NoFloat64():
        torch.ones(2, dtype=torch.float32).sum()  # the guard lets float32 through
        with pytest.raises(AssertionError, match="float64"):
            torch.ones(2, dtype=torch.float64).sum()  # and catches float64
        assert run_main(mnist_dir, tmp_path, *TINY, "--epochs", "1") == 0
    assert all(
        len(json.loads(p.read_text())["epochs"]) == 1 for p in tmp_path.glob("run/*/stats.json")
    )


def test_an_operation_the_device_lacks_is_one_line(mnist_dir, tmp_path, monkeypatch, capsys):
    def train_on_a_device_without_max_pool(*args, **kwargs):
        raise NotImplementedError(
            "The operator 'aten::max_pool2d_with_indices' is not currently implemented for the MPS"
            " device.\n"
            "As a temporary fix, you can set the environment variable PYTORCH_ENABLE_MPS_FALLBACK=1"
        )

    monkeypatch.setattr(main, "train", train_on_a_device_without_max_pool)
    assert run_main(mnist_dir, tmp_path, *TINY, "--model", "lenet5", "--epochs", "1") == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "not currently implemented for the MPS device" in err
        and "--device cpu" in err
    )


# ------------------------------------------------------------ notebooks


def test_importing_and_running_the_scripts_leaves_backend_and_signal_handlers_as_they_were(
    mnist_dir, tmp_path
):
    code = textwrap.dedent(f"""
        import signal, sys
        import matplotlib
        matplotlib.use("pdf")  # the notebook's own choice
        state = lambda: (
            matplotlib.get_backend(),
            signal.getsignal(signal.SIGTERM),
            signal.getsignal(signal.SIGINT),
        )
        before = state()
        sys.path.insert(0, {str(ROOT)!r})
        import dataset, model, main, plot, predict
        assert state() == before, ("import", before, state())
        common = ["--data-dir", {str(mnist_dir)!r}, "--out-dir", {str(tmp_path)!r}, "--quiet"]
        assert main.main([*common, *{list(TINY)!r}, "--model", "mlp", "--epochs", "1"]) == 0
        assert plot.main([{str(tmp_path / "latest")!r}]) == 0
        assert state() == before, ("main", before, state())
        print("unchanged")
    """)
    done = script("-c", code)
    assert done.returncode == 0 and done.stdout.decode().strip().endswith("unchanged"), (
        done.stderr.decode()
    )


def test_main_and_plot_from_a_notebook_cell_ignore_the_kernels_arguments(tmp_path, monkeypatch):
    idx, _ = tiny_idx_dir(tmp_path / "idx", n_train=64, n_test=32)
    dataset.prepare(tmp_path / "data", idx)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["ipykernel_launcher.py", "-f", "/root/.local/share/jupyter/kernel-1.json"]
    )
    assert main.main() == 0  # the defaults: every model, 10 epochs, data/ and runs/
    for name in ("lenet5", "mlp", "lenet5_reg"):
        assert (
            len(json.loads((tmp_path / "runs/latest" / name / "stats.json").read_text())["epochs"])
            == 10
        )
    assert plot.main() == 0 and (runs.find_run(tmp_path / "runs/latest") / "report.md").is_file()


# ------------------------------------------------------------ GPUs


@pytest.fixture
def nvidia_driver(tmp_path, monkeypatch):
    """An nvidia-smi on PATH, as every NVIDIA driver installs one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_gpu_this_torch_cannot_use_is_named_before_training_on_the_cpu(
    nvidia_driver, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert machine.pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert machine.pick_device("auto") == torch.device("cpu")
    old_gpu = {
        "is_available": True,
        "device_count": 1,
        "get_device_capability": (6, 1),
        "get_device_name": "NVIDIA GeForce GTX 1080",
        "get_arch_list": ["sm_75", "sm_90", "compute_90"],
    }
    for name, value in old_gpu.items():
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert machine.pick_device("auto") == torch.device("cpu")
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 3 and all(
        n.startswith("note: ") and n.endswith("says what to install.") for n in notes
    )
    assert "cannot use it" in notes[0] and "CPU-only build" in notes[1]
    assert "NVIDIA GeForce GTX 1080 (sm_61) is older than any this torch was built for" in notes[2]
    # sm_89 runs sm_80..sm_89 code
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    assert machine.pick_device("auto") == torch.device("cuda") and machine.pick_device(
        "cuda:0"
    ) == torch.device("cuda:0")
    with pytest.raises(ValueError, match="cuda:1: this machine has 1 CUDA device"):
        machine.pick_device("cuda:1")


def test_without_an_nvidia_driver_auto_says_nothing(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert machine.pick_device("auto") == torch.device("cpu") and capsys.readouterr().err == ""
