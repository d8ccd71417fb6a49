"""The CLI starts light: `uwrt --help` and the commands that never run a model (`decide`,
`generate`, `bench`, `proto`) import neither torch, ONNX Runtime nor xgboost (issue 14: every
command took 1.6-1.8 s because the CLI imported torch through the bundle module). A test on the
modules imported, never on time; README's Commands section has the measured wall times."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.factories import ROOT
from uwrt.runtime.cli.main import COMMANDS, build_parser

HEAVY = ("torch", "onnxruntime", "xgboost")

#: run the CLI's main in a fresh interpreter, then report which heavy modules it imported
PROBE = """
import json, sys
from uwrt.runtime.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("\\nHEAVY=" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def heavy_imports(*argv: str, tmp_path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])}
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    line = [x for x in r.stderr.splitlines() if x.startswith("HEAVY=")]
    assert line, r.stderr
    return json.loads(line[-1][len("HEAVY="):])


@pytest.mark.parametrize("argv", [
    ("--help",),
    ("decide", "--help"),
    ("generate", "--n", "1"),
    ("bench", "--help"),
    ("proto", "export", "--out", "exported"),
    # a whole `decide` run but the RPCs: generate a request, find no server, exit 2
    ("decide", "--n", "1", "--target", "127.0.0.1:9", "--connect-timeout-s", "0.2"),
], ids=lambda a: " ".join(a[:2]))
def test_light_commands_import_no_model_library(argv, tmp_path):
    assert heavy_imports(*argv, tmp_path=tmp_path) == []


def test_the_probe_sees_heavy_imports(tmp_path):
    """The check above can fail: a command that loads a model library is seen doing so."""
    assert "xgboost" in heavy_imports("score", "--bundle", "missing", "--input", "missing", tmp_path=tmp_path)


def test_the_lazy_parser_lists_every_command_with_its_own_help():
    """`uwrt --help` shows name-and-help stubs for the commands it does not load: their help
    strings are the full parsers' (COMMANDS must not drift from the modules that define them)."""
    full = build_parser()
    lazy = build_parser(["--help"])

    def helps(p):
        sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
        return {a.dest: a.help for a in sub._choices_actions}
    assert helps(full) == helps(lazy) == {name: h for name, (h, _) in COMMANDS.items()}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_parses_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser([name, "--help"]).parse_args([name, "--help"])
    assert e.value.code == 0 and f"uwrt {name}" in capsys.readouterr().out
