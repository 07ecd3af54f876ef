"""The dependency lock: requirements.lock pins every distribution the project installs.

    python tools/lock.py check   exit 1 with one sentence naming a package that differs
    python tools/lock.py write   rewrite requirements.lock from this environment

`make install` installs from the lock and then runs `check`; `make lock` re-resolves the
ranges in pyproject.toml in a scratch environment and runs `write` there.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"
# The project itself and the installer are not part of the lock.
NOT_LOCKED = {"edgefleet", "pip", "wheel"}
HEADER = ("# Every dependency of edgefleet at an exact version (direct and transitive).\n"
          "# Written by `make lock`; `make install` installs exactly this set and checks it.\n")


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed() -> dict[str, str]:
    """name -> version of every distribution in this environment, minus NOT_LOCKED."""
    out = {}
    for d in metadata.distributions():
        name = canonical(d.metadata["Name"] or "")
        if name and name not in NOT_LOCKED:
            out[name] = d.version
    return out


def read_lock(path: Path | None = None) -> dict[str, str]:
    """name -> version from a lock file of `name==version` lines (default: LOCK)."""
    path = path or LOCK
    pins = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{path.name} line {n} is not `name==version`; regenerate it with `make lock`")
        pins[canonical(name.strip())] = version.strip()
    return pins


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """One sentence per package where the environment differs from the lock: other
    versions first, then packages missing, then packages the lock does not know."""
    other = [f"{n} is {have[n]} but the lock says {v}" for n, v in sorted(pins.items()) if n in have and have[n] != v]
    missing = [f"{n} {v} is in the lock but not installed" for n, v in sorted(pins.items()) if n not in have]
    extra = [f"{n} {v} is installed but not in the lock" for n, v in sorted(have.items()) if n not in pins]
    return other + missing + extra


def main(argv: list[str]) -> int:
    if argv[1:] == ["write"]:
        have = installed()
        LOCK.write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(have.items())), encoding="utf-8")
        print(f"wrote {LOCK.name}: {len(have)} packages")
        return 0
    if argv[1:] == ["check"]:
        diff = differences(read_lock(), installed())
        if diff:
            print(f"the environment does not match {LOCK.name}: {diff[0]}"
                  f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; run `make clean install`",
                  file=sys.stderr)
            return 1
        return 0
    print("usage: python tools/lock.py check|write", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
