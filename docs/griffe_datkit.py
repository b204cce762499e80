"""Griffe extension for the API reference: what static analysis alone misses in datkit's layout.

mkdocstrings reads the sources statically (griffe; nothing is imported), which misses two things:

- ``datkit.backends`` lives in the top-level folder ``backends/`` (``pyproject.toml``: ``[tool.setuptools]
  package-dir``), and griffe looks for it only inside ``datkit/``. Once ``datkit`` is loaded, ``backends/`` is
  loaded as its ``backends`` subpackage, with its modules, under the ``datkit.backends.*`` names.
- Lazy exports: ``datkit.fit`` and ``datkit.certify.ibp_bounds`` etc. are imported on first access by a module
  ``__getattr__`` (``import datkit`` stays cheap). Their targets are read from the source -- the ``from .X import
  NAME`` statements inside ``__getattr__`` and a module-level ``_EXPORTS = {"NAME": "package.module"}`` dict -- and
  added as public aliases, so the pages name the packages, not the modules the objects live in today.

It calls the loader's ``_load_module`` (the one griffe uses for every submodule): a griffe release that renames it
makes the strict docs build fail here, loudly, rather than silently lose the page.
"""
from __future__ import annotations

import ast
from pathlib import Path

import griffe


def _lazy_exports(module: griffe.Module) -> dict[str, str]:
    """NAME -> target path of the module's lazy exports, read from its source."""
    if not isinstance(module.filepath, Path) or module.filepath.name != "__init__.py":
        return {}
    tree = ast.parse(module.filepath.read_text(encoding="utf-8"))
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                for key, value in zip(node.value.keys, node.value.values):
                    if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                        out[key.value] = f"{value.value}.{key.value}"
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    base = module.path if sub.level else ""
                    for _ in range(max(sub.level - 1, 0)):
                        base = base.rsplit(".", 1)[0]
                    source = ".".join(p for p in (base, sub.module or "") if p)
                    for alias in sub.names:
                        out[alias.asname or alias.name] = f"{source}.{alias.name}"
    return out


def _add_lazy_exports(module: griffe.Module) -> None:
    for name, target in _lazy_exports(module).items():
        if name not in module.members:
            alias = griffe.Alias(name, target, parent=module)
            alias.public = True
            module.set_member(name, alias)
    for sub in list(module.members.values()):
        if not sub.is_alias and sub.is_module:  # its own subpackages and modules, not imported ones
            _add_lazy_exports(sub)


class DatkitPackage(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "datkit":
            return
        if "backends" not in pkg.members:  # an editable checkout may have a datkit/backends link
            init = Path(pkg.filepath).parent.parent / "backends" / "__init__.py"
            pkg.set_member("backends", loader._load_module("backends", init, submodules=True, parent=pkg))
        _add_lazy_exports(pkg)
