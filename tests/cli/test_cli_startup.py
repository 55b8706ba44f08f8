"""Issue 10, item 10 (start-up): `focusvlm --help` and usage errors never import torch or transformers.

Checked through sys.modules in a fresh interpreter rather than with a stopwatch: the import of
torch + transformers' model classes was what made every command take ~4 s to answer."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "accelerate", "PIL", "numpy", "matplotlib")

PROBE = """
import contextlib, io, json, sys
from focusvlm.cli import build_parser, main
build_parser()
codes = []
for argv in ({argvs}):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as exc:
            codes.append(exc.code)
print(json.dumps({{"loaded": [m for m in {heavy!r} if m in sys.modules], "codes": codes}}))
"""


def probe(*argvs):
    code = PROBE.format(argvs=", ".join(repr(list(a)) for a in argvs) + ",", heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parser_and_help_do_not_import_torch():
    result = probe(["--help"], ["eval", "if", "--help"], ["bench", "--help"], ["show", "--help"])
    assert result["loaded"] == []
    assert result["codes"] == [0, 0, 0, 0]


def test_usage_errors_do_not_import_torch():
    result = probe(["generate"], ["eval", "gqa"], ["bench", "--batch", "x"], ["no-such-command"])
    assert result["loaded"] == []
    assert result["codes"] == [2, 2, 2, 2]


def test_generate_defaults_to_the_embedded_model():
    from focusvlm.cli import build_parser

    args = build_parser().parse_args(["generate", "--image", "x.jpg", "--prompt", "hi"])
    assert args.model == "demo"
