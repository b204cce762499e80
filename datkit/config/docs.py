"""The config reference (docs/reference/config.md), generated from the schema's field comments.

``python -m datkit.config.docs`` prints a Markdown table (key, type, default, meaning) for every
field of ``datkit.config.schema``; ``python -m datkit.config.docs_sync`` writes it into the docs page and a test
checks that the page holds exactly this table.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from . import schema


def _comments(cls: type) -> dict[str, str]:
    """Field name -> the ``# comment`` on its line in the class source, continued by the comment-only lines that
    directly follow it (joined with a space), so that a long comment wraps within the line length."""
    out: dict[str, str] = {}
    field = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):\s*[^=]+=.*?#\s*(.+)$", line)
        if m:
            field = m.group(1)
            out[field] = m.group(2).strip()
        elif field is not None and line.strip().startswith("#"):
            out[field] += " " + line.strip().lstrip("#").strip()
        else:
            field = None
    return out


def _type_name(tp: object) -> str:
    s = str(tp).replace("typing.", "")
    names = {"<class 'int'>": "int", "<class 'float'>": "float", "<class 'str'>": "str", "<class 'bool'>": "bool"}
    return names.get(s, s)


def rows(cls: type = schema.Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field under ``cls``."""
    hints = typing.get_type_hints(cls)
    docs = _comments(cls)
    out: list[tuple[str, str, str, str]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f"{prefix}{f.name}", _type_name(tp), "null" if default is None else repr(default).replace("'", ""),
                    docs.get(f.name, "")))
    return out


def markdown() -> str:
    """The whole reference as one Markdown table."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in rows():
        lines.append(f"| `{key}` | {tp} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
