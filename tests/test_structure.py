"""The shape the code keeps: files and functions short enough to read, one shape for every script,
and a --help that states each default once."""

import ast
import importlib

import pytest
from conftest import ROOT

MODULES = sorted(ROOT.glob("*.py"))
# Each script, and the arguments that show its --help.
SCRIPTS = {
    "main": ["--help"],
    "plot": ["--help"],
    "predict": ["--help"],
    "dataset": ["prepare", "--help"],
    "model": ["--help"],
    "bench": ["--help"],
}
MAIN_LINE = 'if __name__ == "__main__":\n    cli.safe_console()\n    sys.exit(main(sys.argv[1:]))\n'


def test_no_file_is_over_500_lines_and_no_function_over_60():
    long_files, long_functions = [], []
    for path in MODULES:
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > 500:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.name}: {node.name}")
    assert not long_files and not long_functions


def test_the_formatter_is_never_told_to_skip_a_line():
    skipped = [
        p.name for p in [*MODULES, *ROOT.glob("tests/*.py")] if "fmt: " + "skip" in p.read_text()
    ]
    assert not skipped


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_parse_args_and_main_of_argv_none_and_the_same_main_line(script):
    source = (ROOT / f"{script}.py").read_text(encoding="utf-8")
    functions = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    for name in ("parse_args", "main"):
        arguments = functions[name].args
        assert arguments.args[0].arg == "argv", (script, name)
        assert ast.literal_eval(arguments.defaults[0]) is None, (script, name)
    assert source.endswith(MAIN_LINE)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_states_each_default_once_through_the_formatter(script, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as done:
        module.parse_args(SCRIPTS[script])
    help_text = capsys.readouterr().out
    assert done.value.code == 0 and "options:" in help_text
    # ArgumentDefaultsHelpFormatter writes "(default: X)"; a help string that says it too repeats it
    assert help_text.count("default") == help_text.count("(default:")
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
