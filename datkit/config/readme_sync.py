"""Write the generated config reference into README.md between its markers.

``python -m datkit.config.readme_sync`` rewrites the block between ``<!-- config-reference:start -->``
and ``<!-- config-reference:end -->``; ``tests/test_readme.py`` fails when the two differ.
"""
from __future__ import annotations

import pathlib
import re

from .docs import markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def sync(readme: pathlib.Path) -> bool:
    """Rewrite the block; returns True if the file changed."""
    text = readme.read_text()
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{markdown()}\n{END}", text, flags=re.S)
    if new != text:
        readme.write_text(new)
    return new != text


if __name__ == "__main__":
    path = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    print("updated" if sync(path) else "up to date", path)
