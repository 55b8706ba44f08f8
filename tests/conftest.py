import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# tests/ mirrors the package (tests/inhibit, tests/compress, tests/models, ...); test modules have unique
# basenames and share helpers by plain import (`helpers`, `test_vmtc_model`, `fixtures_std`), so every test
# folder is importable; tests/reference holds the slow literal oracles, importable as `reference.*`
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
for _folder in sorted(p for p in _HERE.iterdir() if p.is_dir() and p.name not in ("reference", "__pycache__")):
    sys.path.append(str(_folder))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from deprecations import RECORDER  # noqa: E402

RECORDER.install()


@pytest.fixture(autouse=True)
def _no_deprecated_calls():
    """A deprecation transformers raises because of a call focusvlm (or a test) makes fails that test
    (tests/deprecations.py): the next rename is caught while the old name still works."""
    RECORDER.take()
    yield
    found = RECORDER.take()
    if found:
        pytest.fail("deprecated transformers API called by focusvlm:\n" + "\n".join(dict.fromkeys(found)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.focusvlm_call_passed = report.passed
    return report


@pytest.fixture(autouse=True)
def _free_tmp_path_of_passed_test(request):
    """A passed test's tmp_path is removed at once: the recipe tests save the real 135M LM several times
    (~3 GB each), and pytest keeps a session's folders until later sessions, so CI's two suites (floor and
    newest) filled the disk. A failed test's folder stays, for reading."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None and getattr(request.node, "focusvlm_call_passed", False):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def demo():
    """The random-vision demo model (model, processor) (`demo-random`); built once per machine, cached after."""
    from focusvlm.models.demo.load import random_demo_model

    return random_demo_model()
