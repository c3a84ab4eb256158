"""``docs/evidence.md`` embeds each experiment's report as the experiment wrote it, never retyped.

A block ``<!-- include: PATH -->`` ... ``<!-- end include -->`` holds the text of ``PATH`` (relative to the
repository), an experiment's ``NAME.md``, which itself is rendered from ``NAME.json``
(:func:`model.experiments.report.write_report`). ``python -m model.experiments.evidence docs/evidence.md``
refreshes every block; a test checks that every block equals its file and every file equals the render of
its JSON.

>>> doc = "a\\n<!-- include: x.md -->\\nold\\n<!-- end include -->\\nb\\n"
>>> embed(doc, lambda p: "new\\n")
'a\\n<!-- include: x.md -->\\nnew\\n<!-- end include -->\\nb\\n'
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["INCLUDE", "blocks", "embed"]

INCLUDE = re.compile(r"(<!-- include: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)


def blocks(doc: str) -> list[tuple[str, str]]:
    """``(path, embedded text)`` of every include block."""
    return [(m.group("path"), m.group("body")) for m in INCLUDE.finditer(doc)]


def embed(doc: str, read: Callable[[str], str]) -> str:
    """``doc`` with every include block's body replaced by ``read(path)``."""
    def repl(m: re.Match[str]) -> str:
        text = read(m.group("path"))
        return m.group(1) + text + ("" if text.endswith("\n") else "\n") + m.group(4)

    return INCLUDE.sub(repl, doc)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m model.experiments.evidence docs/evidence.md", file=sys.stderr)
        return 2
    doc_path = Path(args[0])
    root = doc_path.resolve().parent.parent
    doc_path.write_text(embed(doc_path.read_text(), lambda p: (root / p).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
