"""Write the generated config reference into the docs page ``docs/reference/config.md`` between its markers.

``python -m datkit.config.docs_sync`` rewrites the block between ``<!-- config-reference:start -->`` and
``<!-- config-reference:end -->`` with ``datkit.config.docs.markdown()``; ``tests/test_readme.py`` fails when the two
differ.
"""
from __future__ import annotations

import pathlib
import re

from .docs import markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
PAGE = pathlib.Path("docs") / "reference" / "config.md"  # relative to the repository root


def sync(page: pathlib.Path) -> bool:
    """Rewrite the block; returns True if the file changed."""
    text = page.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{page}: no {START} ... {END} block")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{markdown()}\n{END}", text, flags=re.S)
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    path = pathlib.Path(__file__).resolve().parents[2] / PAGE
    print("updated" if sync(path) else "up to date", path)
