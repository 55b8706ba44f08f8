"""The package metadata users install from: the tested version range and a build setuptools accepts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(name: str, group: list[str]) -> Requirement:
    return next(r for r in map(Requirement, group) if r.name == name)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_license_is_an_spdx_string_not_the_deprecated_table():
    # setuptools deprecates `license = {text = ...}`; such builds stop working after 2027-02-18
    assert isinstance(PYPROJECT["project"]["license"], str)


def test_the_floor_make_test_installs_is_the_lower_bound_users_are_allowed():
    transformers = _requirement("transformers", PYPROJECT["project"]["dependencies"])
    floor = Version(_pins()["transformers"])
    lower = min(Version(s.version) for s in transformers.specifier if s.operator == ">=")
    assert floor == lower, (floor, lower)
    assert transformers.specifier.contains(floor)


def test_every_pin_satisfies_the_declared_ranges():
    pins = _pins()
    groups = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]
    for requirement in map(Requirement, groups):
        name = requirement.name.lower().replace("_", "-")
        if name in pins and name != "torch":
            assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (requirement, pins[name])


def test_the_lmms_extra_caps_filelock_for_lmms_eval_0_7_3():
    extra = PYPROJECT["project"]["optional-dependencies"]["lmms"]
    filelock = _requirement("filelock", extra)
    assert not filelock.specifier.contains("4.0.0")
    # the cap's reason is written beside it
    assert re.search(r"filelock\._api", (ROOT / "pyproject.toml").read_text())
