"""The dependency lock (constraints.txt): what differs from an environment, and writing it from one.

    python .ci/lock.py diff constraints.txt freeze.txt    # packages whose version differs, new or gone
    python .ci/lock.py write freeze.txt > constraints.txt

`freeze.txt` is `pip freeze --all --exclude-editable` of an environment where the checks passed. torch is not locked:
the README installs `torch==2.13.0` (the CPU build on our machines) first, and a GPU user brings a CUDA build.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

UNLOCKED = {"torch", "pip"}  # installed by the README's first command / by the venv itself

HEADER = """\
# Tested dependency versions: the versions the whole suite last passed with (`bash .ci/run` installs with
# `-c constraints.txt`, as the README does). pyproject.toml keeps the ranges a user may install.
# Regenerate from the newest versions those ranges allow (a fresh venv, a smoke run, then this file):
#   bash .ci/newest --update-lock
# torch is not here: install it first (`pip install torch==2.13.0` on our CPU machines, a CUDA build on a GPU).
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: str | Path) -> dict[str, str]:
    """name -> version from `name==version` lines (comments, blank lines and non-pinned lines skipped)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and " @ " not in line:
            name, version = line.split("==", 1)
            pins[canonical(name.split("[")[0])] = version.strip()
    return pins


def diff(lock: dict[str, str], env: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted((lock.keys() | env.keys()) - UNLOCKED):
        old, new = lock.get(name), env.get(name)
        if old != new:
            lines.append(f"  {name}: {old or '(not locked)'} -> {new or '(not installed)'}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "diff":
        lines = diff(read(argv[1]), read(argv[2]))
        print(f"{len(lines)} package(s) differ from {argv[1]}" + (":" if lines else ""))
        for line in lines:
            print(line)
        return 0
    if len(argv) == 2 and argv[0] == "write":
        env = read(argv[1])
        sys.stdout.write(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(env.items()) if n not in UNLOCKED))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
