"""Every measured figure in the README comes from a file a bench or a measurement wrote, and says
which, with its commit, so a stale figure is visible.

A paragraph, list or table with figures carries a marker on the line before it:
``<!-- figures: PATH [PATH ...] -->``. The test then checks that the block names each PATH and
its commit (the ``commit`` the file records, else the last commit that changed it), and that every
figure in the block (a number with a unit: x, %, s, min, GiB, MB, tokens/s, ...) is a number of one
of those files, as written there or rounded. A block with numbers that are settings, not
measurements, says so: ``<!-- figures: none -- WHY -->``.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

from conftest import REPO

README = REPO / "README.md"
MARKER = re.compile(r"^<!-- figures: (.*?)-->$")
# a figure: a number with a unit of measure (ratios, percentages, durations, sizes, rates)
FIGURE = re.compile(
    r"(?<![\w.@-])(\d[\d,]*(?:\.\d+)?)(?:[–-](\d[\d,]*(?:\.\d+)?))?"
    r"(x\b|%|\s?(?:min|s|ms|GiB|GB|MB|tokens/s|tests)\b)"
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?")


def readme_blocks() -> list[tuple[int, str | None, str]]:
    """``(line, marker or None, text)`` of every block outside code fences (blank-line
    separated; a marker is the block's first line)."""
    out, block, start, fenced = [], [], 0, False
    lines = README.read_text().splitlines() + [""]
    for i, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced = not fenced
            block = []
            continue
        if fenced:
            continue
        if line.strip():
            if not block:
                start = i
            block.append(line)
            continue
        if block:
            m = MARKER.match(block[0].strip())
            body = "\n".join(block[1:] if m else block)
            out.append((start, m.group(1).strip() if m else None, body))
        block = []
    return out


def _figures(text: str) -> list[str]:
    text = re.sub(r"`[^`]*`", "", text)  # code: names, settings, commands
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    out = []
    for m in FIGURE.finditer(text):
        out += [g for g in (m.group(1), m.group(2)) if g]
    return out


@cache
def _source_numbers(path: str) -> tuple[float, ...]:
    text = (REPO / path).read_text(errors="replace")
    numbers = (float(x.replace(",", "")) for x in NUMBER.findall(text))
    return tuple(n for n in numbers if abs(n) < 1e15)


def _found(figure: str, numbers: tuple[float, ...]) -> bool:
    value = float(figure.replace(",", ""))
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    scale = 10**decimals
    for n in numbers:
        for candidate in (n, n * 100):  # a fraction shown as a percentage
            if abs(round(candidate * scale) - value * scale) < 1e-6 or candidate == value:
                return True
    return False


@cache
def source_commit(path: str) -> str | None:
    """The commit a source file records, else the last commit that changed it."""
    text = (REPO / path).read_text(errors="replace")
    m = re.search(r"""["']?commit["']?[\s:=]+["']?([0-9a-f]{7,40})\b""", text)
    if m:
        return m.group(1)[:7]
    proc = subprocess.run(
        ["git", "-C", str(REPO), "log", "-1", "--format=%h", "--abbrev=7", "--", path],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip()[:7] or None


def test_every_figure_names_its_source_and_matches_it() -> None:
    problems = []
    for line, marker, text in readme_blocks():
        figures = _figures(text)
        if marker is None:
            if figures:
                problems.append(f"line {line}: figures {figures[:4]} without <!-- figures: ... -->")
            continue
        if marker.startswith("none"):
            why = marker.removeprefix("none").strip()
            if not why.startswith("--") or len(why) < 8:
                problems.append(f"line {line}: <!-- figures: none -- WHY --> says why")
            continue
        paths = marker.split()
        for path in paths:
            if not (REPO / path).is_file():
                problems.append(f"line {line}: {path} does not exist")
                continue
            commit = source_commit(path)
            named = path in text or (Path(path).name in text and str(Path(path).parent) in text)
            if not named or (commit and commit not in text):
                problems.append(f"line {line}: the block does not name {path} at {commit}")
        numbers = tuple(n for p in paths if (REPO / p).is_file() for n in _source_numbers(p))
        missing = [f for f in figures if not _found(f, numbers)]
        if missing:
            problems.append(f"line {line}: {missing} are in none of {paths}")
    assert not problems, "README.md:\n" + "\n".join(problems)


def test_the_figure_check_catches_a_typed_figure(tmp_path) -> None:
    numbers = (0.5612, 1494606.0, 0.0084, 27.0)
    assert _found("0.56", numbers) and _found("1,494,606", numbers) and _found("0.84", numbers)
    assert not _found("0.61", numbers) and not _found("89", numbers)
    assert _figures("a step 1.21x as long, 2 min 8 s, `0.25x` (a setting)") == ["1.21", "2", "8"]
