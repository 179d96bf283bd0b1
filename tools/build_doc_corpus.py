"""A larger English corpus from Debian's documentation packages (for the GPU rung): every
document's text, one JSON line each, with its package and path, and a manifest of the packages,
their versions and licences.

    python tools/build_doc_corpus.py --out build/gpu-corpus [--packages python3.11-doc ...]

Downloads the packages with ``apt-get download`` (Debian's archive is reachable where the package
registries are), unpacks them with ``dpkg-deb -x`` and reads: Sphinx sources (``_sources/*.txt``),
POD (``*.pod``), AsciiDoc (``git-doc``'s ``*.txt``) and, where a package ships only HTML, the
text of each page's body (navigation, scripts and styles left out). Identical documents are kept
once. ``launch/gpu_check.sh prepare`` then shards them with the project's own tools (a 16384-token
BPE, ``slowqk data shard ... --split 98,2,0``) into ``.gpu/corpus/dataset``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# package -> licence as its copyright file states it (checked when the corpus is built)
PACKAGES = {
    "python3.11-doc": "PSF-2.0 (Python documentation)",
    "linux-doc-6.1": "GPL-2",
    "perl-doc": "GPL-1+ or Artistic",
    "postgresql-doc-15": "PostgreSQL",
    "git-doc": "GPL-2",
    "python-django-doc": "BSD-3-Clause",
    "python-scipy-doc": "BSD-3-clause",
    "sphinx-doc": "BSD-2-clause",
}
SKIP_HTML = re.compile(r"sphinxsidebar|related|footer|navheader|navfooter|headerlink|toc")


class _BodyText(HTMLParser):
    """The text of a page's body, without scripts, styles and navigation."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0  # depth inside an element that is left out
        self.stack: list[bool] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag in ("br", "img", "meta", "link", "hr", "input"):
            return
        attrs = dict(attrs)
        drop = tag in ("script", "style", "nav", "head") or bool(
            SKIP_HTML.search(f"{attrs.get('class', '')} {attrs.get('id', '')}")
        )
        self.stack.append(drop)
        self.skip += drop
        if tag in ("p", "div", "pre", "li", "h1", "h2", "h3", "h4", "tr", "dt", "dd"):
            self.parts.append("\n")

    def handle_endtag(self, tag) -> None:
        if tag in ("br", "img", "meta", "link", "hr", "input") or not self.stack:
            return
        self.skip -= self.stack.pop()

    def handle_data(self, data) -> None:
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        text = "".join(self.parts)
        text = re.sub(r"[ \t]+\n", "\n", text)
        return re.sub(r"\n{3,}", "\n\n", text).strip()


def html_text(raw: str) -> str:
    parser = _BodyText()
    parser.feed(raw)
    return parser.text()


def documents(root: Path) -> list[tuple[str, str]]:
    """``(path, text)`` of the documents a package's files hold."""
    sources = sorted(root.rglob("_sources/**/*.txt"))
    if sources:  # Sphinx: the sources, not the rendered pages
        return [(str(p.relative_to(root)), p.read_text(errors="replace")) for p in sources]
    out = [(str(p.relative_to(root)), p.read_text(errors="replace")) for p in root.rglob("*.pod")]
    out += [
        (str(p.relative_to(root)), p.read_text(errors="replace"))
        for p in root.rglob("*.txt")
        if "/usr/share/doc/git-doc/" in f"/{p.relative_to(root)}"
    ]
    if not out:
        out = [
            (str(p.relative_to(root)), html_text(p.read_text(errors="replace")))
            for p in sorted(root.rglob("*.html"))
        ]
    return out


def licence_lines(root: Path) -> list[str]:
    lines = []
    for copyright_file in root.rglob("usr/share/doc/*/copyright"):
        for line in copyright_file.read_text(errors="replace").splitlines():
            if line.startswith("License:") and line.split(":", 1)[1].strip():
                lines.append(line.split(":", 1)[1].strip())
    return sorted(set(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--packages", nargs="*", default=list(PACKAGES))
    ap.add_argument("--min-chars", type=int, default=200, help="shorter documents are left out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seen, manifest, total = set(), {"packages": {}}, 0
    tmp_path = args.out / "docs.jsonl.tmp"
    with tempfile.TemporaryDirectory() as tmp, open(tmp_path, "w") as out:
        for package in args.packages:
            download = ["apt-get", "download", package]
            subprocess.run(download, cwd=tmp, check=True, capture_output=True)
            (deb,) = Path(tmp).glob(f"{package}_*.deb")
            version = deb.name.split("_")[1]
            root = Path(tmp) / package
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            kept = chars = 0
            for path, text in documents(root):
                digest = hashlib.sha256(text.encode()).digest()
                if len(text) < args.min_chars or digest in seen:
                    continue
                seen.add(digest)
                out.write(json.dumps({"text": text, "source": f"{package}:{path}"}) + "\n")
                kept, chars = kept + 1, chars + len(text)
            manifest["packages"][package] = {
                "version": version,
                "licence": PACKAGES.get(package, "see its copyright file"),
                "copyright_licences": licence_lines(root),
                "documents": kept,
                "characters": chars,
            }
            total += chars
            print(f"{package} {version}: {kept} documents, {chars:,} characters")
            deb.unlink()
    tmp_path.replace(args.out / "docs.jsonl")
    manifest["characters"] = total
    (args.out / "corpus.json").write_text(json.dumps(manifest, indent=2))
    print(f"{args.out / 'docs.jsonl'}: {total:,} characters")


if __name__ == "__main__":
    main()
