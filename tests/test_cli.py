"""cli.py: what every script shares at its edges, each promise checked on its own."""

import argparse
import io
import shlex
import signal
import sys

import pytest

import cli


def test_a_scripts_help_opens_with_its_module_docstring_as_written(capsys):
    doc = "What this script does.\n\n    python it.py RUN    # kept as written\n"
    p = cli.parser("it.py", doc)
    p.add_argument("--steps", type=int, default=3, help="how many")
    p.add_argument("--name", help="unset unless given")
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: it.py") and doc in out
    assert "how many (default: 3)" in out and "unset unless given\n" in out


def test_no_arguments_means_the_defaults_whatever_the_command_line_holds(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["notebook", "--not-an-option", "x"])
    assert cli.arguments(None) == [] and cli.arguments(("--a", "1")) == ["--a", "1"]


def test_a_comma_list_strips_its_values_and_refuses_one_given_twice():
    assert cli.comma_list(" 0, 1 ,2", "seed", int) == [0, 1, 2]
    assert cli.comma_list("mlp, lenet5", "model") == ["mlp", "lenet5"]
    with pytest.raises(argparse.ArgumentTypeError, match="seed 1 given more than once"):
        cli.comma_list("1,0, 1", "seed", int)
    with pytest.raises(argparse.ArgumentTypeError, match="expected whole numbers, got '1,x'"):
        cli.comma_list("1,x", "seed", int, "whole numbers")


def test_the_first_line_of_an_error_or_its_type_when_it_says_nothing():
    assert cli.first_line(OSError("disk full\nmore detail")) == "disk full"
    assert cli.first_line(RuntimeError("  ")) == "RuntimeError"


def test_errors_and_warnings_are_one_line_on_stderr(capsys):
    cli.error("bad.tar: not a tar file", prefix="rank 1 | ")
    cli.warning("no font has it")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "rank 1 | error: bad.tar: not a tar file\nwarning: no font has it\n"


def test_the_console_writes_what_it_cannot_encode_as_escapes(monkeypatch):
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stream)
    cli.safe_console()
    print("runs/한글")
    stream.flush()
    assert raw.getvalue() == b"runs/\\ud55c\\uae00\n"


def test_sigterm_is_ctrl_c_inside_and_the_old_handler_comes_back():
    def before(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(KeyboardInterrupt), cli.sigterm_as_ctrl_c():
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_command_line_reads_back_as_the_same_arguments():
    args = ["python", "main.py", "--resume", "runs/my run's copy", "a;b"]
    assert shlex.split(cli.command(*args)) == args


def test_a_number_must_be_finite_and_above_its_low_and_says_what_it_expected():
    assert cli.POSITIVE_WHOLE("3") == 3 and cli.DECIMAL("-0.5") == -0.5
    for kind, text, message in (
        (cli.POSITIVE_WHOLE, "0", "must be greater than 0, got 0"),
        (cli.POSITIVE_DECIMAL, "nan", "expected a finite number, got 'nan'"),
        (cli.DECIMAL, "inf", "expected a finite number, got 'inf'"),
        (cli.WHOLE, "1.5", "expected a whole number, got '1.5'"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            kind(text)
