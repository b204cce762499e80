"""The docs site: the config reference page is the generated one, every page is in the nav, and
`mkdocs build --strict` passes (offline), with the docs tools of .venv-docs (made by tests/run.sh)."""
import os
import pathlib
import subprocess

import pytest
import yaml

from datkit.config.docs import markdown, rows
from datkit.config.docs_sync import END, PAGE, START

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS = ROOT / ".venv-docs" / "bin" / "mkdocs"


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def _mkdocs_yml() -> dict:
    # mkdocs.yml uses no !!python tags, so the safe loader reads it
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_config_reference_in_sync():
    text = (ROOT / PAGE).read_text()
    assert START in text and END in text, f"{PAGE}: the config-reference markers are missing"
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == markdown(), f"{PAGE} is stale: run `python -m datkit.config.docs_sync`"


def test_every_field_documented():
    undocumented = [key for key, _, _, doc in rows() if not doc]
    assert not undocumented, f"schema fields without a comment: {undocumented}"


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    # mkdocs reports a page missing from the nav only as INFO, which --strict lets through
    nav = _nav_pages(_mkdocs_yml()["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(pages) - set(nav)) == [], "docs pages not in mkdocs.yml's nav"
    assert sorted(set(nav) - set(pages)) == [], "nav entries without a page"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def test_no_network_plugins():
    # the build must run offline: Material's privacy / social / blog plugins fetch at build time
    names = [p if isinstance(p, str) else next(iter(p)) for p in _mkdocs_yml().get("plugins", [])]
    assert not {"privacy", "social", "blog", "material/privacy", "material/social", "material/blog"} & set(names), names


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    if not MKDOCS.exists():
        pytest.skip(f"{MKDOCS} missing: tests/run.sh creates .venv-docs (python3 -m venv .venv-docs && "
                    ".venv-docs/bin/pip install -r docs/requirements.txt)")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # nothing may be fetched: a proxy that refuses every connection
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    site = tmp_path / "site"
    proc = subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "WARNING" not in out, out[-6000:]
    assert (site / "index.html").exists()
    for page in ("reference/config", "reference/api/backends", "reference/api/datkit"):
        assert (site / page / "index.html").exists(), page
    # docs/griffe_datkit.py: the API reference found datkit.backends (in backends/) and the lazy exports
    assert 'id="datkit.backends.Backend"' in (site / "reference/api/backends/index.html").read_text()
    assert 'id="datkit.fit"' in (site / "reference/api/datkit/index.html").read_text()
    assert 'id="datkit.certify.ibp_bounds"' in (site / "reference/api/certify/index.html").read_text()


def test_plugins_page_lists_every_registered_name():
    # docs/plugins.md's table of plug-in points names what each registry holds
    from datkit.compress import COMPRESSORS
    from datkit.data import DATASETS
    from datkit.methods import METHODS
    from datkit.optim import OPTIMIZERS

    text = (DOCS / "plugins.md").read_text()
    for key, registry in (("data.name", DATASETS), ("method.name", METHODS), ("optim.name", OPTIMIZERS),
                          ("compression.name", COMPRESSORS)):
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| `{key}` |"))
        listed = {name.strip() for name in row.split("|")[2].split(",")}
        assert listed == set(registry.names()), (key, sorted(listed ^ set(registry.names())))
