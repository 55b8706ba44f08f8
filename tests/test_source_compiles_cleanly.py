"""Every module compiles without warnings.

Python 3.12+ reports invalid escape sequences ("\\*" in a normal string) as a SyntaxWarning each time a
module is compiled; a GPU run of ``focusvlm bench`` printed one from ``bench/report.py`` into its logs.
"""

import warnings
from pathlib import Path

import pytest

import focusvlm

SOURCES = sorted(Path(focusvlm.__file__).parent.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(Path(focusvlm.__file__).parent)))
def test_module_compiles_without_warnings(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
