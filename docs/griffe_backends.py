"""Griffe extension for the API reference: find ``datkit.backends`` in ``backends/``.

``pyproject.toml`` installs the top-level folder ``backends/`` as the package ``datkit.backends``
(``[tool.setuptools] package-dir``). mkdocstrings reads the sources statically (griffe; nothing is imported), and
griffe looks for ``datkit.backends`` only inside ``datkit/``, so once it has loaded ``datkit`` this extension
loads ``backends/`` as its ``backends`` subpackage, with its modules, under the ``datkit.backends.*`` names.
It uses the loader's ``_load_module`` (the one griffe calls for every submodule), so a griffe release that renames
it makes the strict docs build fail here, loudly, rather than silently lose the page.
"""
from __future__ import annotations

from pathlib import Path

import griffe


class BackendsPackage(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "datkit" or "backends" in pkg.members:  # an editable checkout may have a datkit/backends link
            return
        init = Path(pkg.filepath).parent.parent / "backends" / "__init__.py"
        backends = loader._load_module("backends", init, submodules=True, parent=pkg)
        pkg.set_member("backends", backends)
