"""Issue 10, item 10: the fallback sentence splitter's notice comes once per process, reloads included
(the suite used to show it twice because a test reloads the module)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from focusvlm.eval import instructions as ins
    ins.count_sentences("One. Two.")
    ins.count_sentences("Three.")
    ins = importlib.reload(ins)
    ins.count_sentences("Four. Five.")
print(sum("punkt_tab data is not installed" in str(w.message) for w in caught))
"""


def test_fallback_notice_once_per_process_even_across_reload():
    env = {"PYTHONPATH": str(ROOT), "FOCUSVLM_SENTENCE_SPLITTER": "fallback", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "1"
