"""Install wheels without pip: a wheel is a zip laid out as site-packages.

Runs inside the image build, where no package index is reachable and pip is not installed.
Only the importable parts are kept: ``*.data/purelib`` and ``platlib`` are merged into the
target, scripts and headers are dropped (nothing in the harness runs them).
"""

import shutil
import sys
import zipfile
from pathlib import Path


def install(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    for data in target.glob("*.data"):
        for part in ("purelib", "platlib"):
            if (data / part).is_dir():
                shutil.copytree(data / part, target, dirs_exist_ok=True)
        shutil.rmtree(data)


def main() -> None:
    target, wheels = Path(sys.argv[1]), sorted(Path(sys.argv[2]).glob("*.whl"))
    if not wheels:
        sys.exit(f"no wheels in {sys.argv[2]}")
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        install(wheel, target)
        print("installed", wheel.name)


if __name__ == "__main__":
    main()
