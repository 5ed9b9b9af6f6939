"""requirements.lock, which `make` installs from: it covers pyproject.toml and pins s3fs beside its fsspec."""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def locked() -> dict[str, str]:
    return {canonicalize_name(name): v for name, v in PIN.findall((ROOT / "requirements.lock").read_text())}


def test_lock_pins_every_dependency_of_pyproject_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    missing = [str(r) for r in wanted if canonicalize_name(r.name) not in pins]
    assert not missing, f"requirements.lock lacks {missing}: run 'make lock'"
    outside = [f"{r} (locked {pins[canonicalize_name(r.name)]})" for r in wanted
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"requirements.lock pins versions pyproject.toml excludes: {outside}; run 'make lock'"


def test_s3fs_is_pinned_with_the_fsspec_release_it_was_made_for():
    # s3fs's calendar-versioned releases (2021.4.0 on) require fsspec of the same version; 0.4.x predates fsspec's
    # calendar versions and is what an unpinned resolve backtracked to.
    pins = locked()
    assert pins["s3fs"] == pins["fsspec"], (pins["s3fs"], pins["fsspec"])
    assert int(pins["s3fs"].split(".")[0]) >= 2021


def test_installed_s3fs_and_fsspec_are_the_locked_pair():
    pins = locked()
    assert (version("s3fs"), version("fsspec")) == (pins["s3fs"], pins["fsspec"]), \
        "this venv was not installed from requirements.lock: run make"
