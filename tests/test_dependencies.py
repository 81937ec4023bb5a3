"""The dependency bounds users install against: pyproject.toml's lower bounds are what .ci/lowest.txt
installs for the second CI job, so a bound raised or lowered in one place must move in the other."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parents[1]


def _lower_bounds() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep.split(";")[0].strip())
        assert m, f"dependency {dep!r} has no plain '>=' lower bound to test"
        bounds[m[1].lower()] = m[2]
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_lowest_pins_are_the_declared_lower_bounds():
    bounds, pins = _lower_bounds(), _pins()
    assert set(pins) == set(bounds) - {"torch"}  # torch: see the file's header
    for name, version in pins.items():
        declared = bounds[name].split(".")
        # a release of the bound's own line: >=0.4 -> 0.4.x, >=15 -> 15.x, >=6.0 -> 6.0 or 6.0.x
        assert version.split(".")[: len(declared)] == declared, \
            f"{name}: .ci/lowest.txt has {version}, pyproject.toml says >={bounds[name]}"


def test_ci_installs_the_lowest_pins():
    assert "-c .ci/lowest.txt" in (ROOT / ".ci" / "run").read_text()


def test_the_package_version_is_one_number():
    """run.json records loraclf.__version__ to say which release trained a run (a release may cut
    batches differently); pip reads pyproject.toml's. They must be the same number."""
    import loraclf

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == loraclf.__version__
