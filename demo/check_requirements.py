"""Exit 0 when every requirement of a requirements file is installed at an allowed version, else
print the unmet ones and exit 1 (demo/run.sh then runs `pip install -r`).

    python demo/check_requirements.py requirements.txt
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare environment: pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement


def unmet(requirements_file: str | Path) -> list[str]:
    """The requirements (one per line, `#` comments) that are missing or at a version outside their range."""
    out = []
    for line in Path(requirements_file).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            out.append(f"{req} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"{req} (installed: {have})")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    missing = unmet(argv[0])
    for m in missing:
        print(f"unmet requirement: {m}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
