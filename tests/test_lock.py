"""The environment is exactly requirements.lock, and a difference is named in one sentence."""
from __future__ import annotations

import subprocess
import sys

from tools.lock import LOCK, differences, installed, read_lock


def test_installed_set_is_the_lock():
    assert differences(read_lock(), installed()) == []


def test_every_direct_dependency_is_pinned_in_the_lock():
    import tomllib

    deps = tomllib.loads((LOCK.parent / "pyproject.toml").read_text())["project"]
    pins = read_lock()
    names = deps["dependencies"] + deps["optional-dependencies"]["dev"]
    for spec in names:
        name = spec.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
        assert name.lower().replace("_", "-") in pins, name


def test_a_difference_is_one_sentence_naming_the_package(tmp_path):
    assert differences({"numpy": "2.4.6"}, {"numpy": "2.4.5"}) == ["numpy is 2.4.5 but the lock says 2.4.6"]
    assert differences({"a": "1"}, {}) == ["a 1 is in the lock but not installed"]
    assert differences({}, {"b": "2"}) == ["b 2 is installed but not in the lock"]
    bad = tmp_path / "requirements.lock"
    bad.write_text("numpy==0.0.1\n")
    code = ("import sys, tools.lock as L; from pathlib import Path; L.LOCK = Path(sys.argv[1]); "
            "sys.exit(L.main(['lock', 'check']))")
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "numpy is" in r.stderr and "but the lock says 0.0.1" in r.stderr
