"""Inside a built image: the installed versions are the pins, the pins lie in pyproject.toml's
ranges, and torch is the one the base (or the CPU variant's first step) installed.

    python docker/check_image.py --variant cpu|gpu NAME==VERSION ...

Prints one line per package; exits 1 naming every mismatch. Run at the end of the image build
and again by tests/test_image.py in the built image.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TORCH_CONSTRAINT = Path(sys.prefix) / "torch-constraint.txt"


def _ranges() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    reqs += [r for extra in project["optional-dependencies"].values() for r in extra]
    parsed = [Requirement(r) for r in reqs]  # a name may have one line per Python version
    return {r.name: r for r in parsed if r.marker is None or r.marker.evaluate()}


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def problems(variant: str, pins: list[str]) -> list[str]:
    out, ranges = [], _ranges()
    for pin in pins:
        name, _, version = pin.partition("==")
        have = _installed(name)
        if name == "transformer-engine" and variant == "cpu":
            if have is not None:
                out.append(f"{name}: installed ({have}) in the CPU image")
            continue
        if have != version:
            out.append(f"{name}: installed {have}, pinned {version}")
        if name in ranges and not ranges[name].specifier.contains(version, prereleases=True):
            out.append(f"{name}: pin {version} outside pyproject.toml's {ranges[name].specifier}")
        print(f"{name} {have} (pin {version}, pyproject {ranges.get(name, '-')})")
    held = TORCH_CONSTRAINT.read_text().strip() if TORCH_CONSTRAINT.is_file() else None
    torch = _installed("torch")
    print(f"torch {torch} (held by {held})")
    if held != f"torch=={torch}":
        out.append(f"torch: installed {torch}, the base's was {held}")
    if _installed("slowqk") is None:
        out.append("slowqk: not installed")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["cpu", "gpu"], required=True)
    parser.add_argument("pins", nargs="+", help="NAME==VERSION as the Dockerfile pins them")
    args = parser.parse_args()
    bad = problems(args.variant, args.pins)
    for line in bad:
        print(f"image check: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
