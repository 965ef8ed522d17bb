"""What every script shares at its edges: its --help and argument types, the console it writes to
(a problem is one line, never a traceback), the command lines it prints, and SIGTERM taken as
Ctrl-C.

Each script has ``parse_args(argv=None)`` and ``main(argv=None)``, where ``None`` means no
arguments (the defaults, as a notebook cell wants), and ends with
``if __name__ == "__main__": sys.exit(main(sys.argv[1:]))`` after ``safe_console()``.
"""

import argparse
import contextlib
import math
import os
import shlex
import signal
import subprocess
import sys
import threading


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the module docstring as written and each option's default, where it has one:
    not for a flag (off unless given) or an option that is unset unless given."""

    def _get_help_string(self, action):  # the hook ArgumentDefaultsHelpFormatter itself overrides
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(prog, doc):
    """The ArgumentParser of script ``prog``, its --help opening with the module docstring."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


def arguments(argv):
    """The argument list a script parses: ``argv``, or none at all for None."""
    return [] if argv is None else list(argv)


def number(kind, description, low=None):
    """An argparse type: ``kind``, above ``low`` when given; errors name what is expected."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        # float("inf") and float("nan") parse, and would train into NaN rows
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and not value > low:
            raise argparse.ArgumentTypeError(f"must be greater than {low}, got {text}")
        return value

    return parse


WHOLE = number(int, "a whole number")
POSITIVE_WHOLE = number(int, "a whole number greater than 0", 0)
DECIMAL = number(float, "a number")
POSITIVE_DECIMAL = number(float, "a number greater than 0", 0)


def comma_list(text, what, kind=str, description=None):
    """The values of a comma list (``kind`` each, stripped), none of them twice: a job named twice
    would train twice into one folder. ``description``: what the error says is expected."""
    try:
        values = [kind(part.strip()) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{what} {', '.join(repeated)} given more than once")
    return values


def names(text, what, known, also=""):
    """A comma list of names from ``known``; ``also``: what else the error offers."""
    values = comma_list(text, what)
    unknown = [value for value in values if value not in known]
    if unknown or not values:
        choices = ", ".join(known)
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)}; choose from {choices}{also}"
        )
    return values


def first_line(error):
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line message quotes of an error from below (torch, a tar, the network)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error(message, prefix=""):
    """Print ``error: message`` on stderr, as one line (``prefix``: the rank, under torchrun)."""
    print(f"{prefix}error: {message}", file=sys.stderr)


def warning(message):
    """Print ``warning: message`` on stderr, as one line: work goes on."""
    print(f"warning: {message}", file=sys.stderr)


def safe_console():
    """Make stdout and stderr write what the console cannot encode (a Hangul path on a CP1252
    console) as escapes instead of raising, and each line in one write, even under
    PYTHONUNBUFFERED (which writes a print's text and its newline apart): torchrun's ranks share
    one stdout, and their lines must not interleave. Each script calls it when run, never on
    import."""
    for stream in (sys.stdout, sys.stderr):
        # a stream replaced by a notebook or a test
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace", line_buffering=True, write_through=False)


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM ends a run the way Ctrl-C does (completed epochs are on disk); the handler that was
    there before comes back afterwards, so a notebook that calls main() is left as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def command(*args):
    """A command line this system's shell reads back as the same arguments (spaces, quotes)."""
    args = [str(a) for a in args]
    return subprocess.list2cmdline(args) if os.name == "nt" else shlex.join(args)
