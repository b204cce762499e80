"""The README is the front door: at most 200 lines, a Quickstart of exactly two commands (CI runs the second),
and links that resolve. The generated config reference and the docs site: tests/test_docs.py."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines (at most 200): move the detail into docs/"


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in quick.strip().splitlines() if ln.split("#")[0].strip()]
    assert len(commands) == 2, commands
    ci = (README.parent / ".ci" / "run").read_text()
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith(("#", "set ", "cd "))]
    assert ci_cmds == [commands[1]], (ci_cmds, commands[1])


def test_readme_links_resolve_and_index_every_docs_page():
    text = README.read_text()
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
    # the index of the docs pages: every page but the API reference's (one link to it is enough)
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if "reference/api/" not in str(p)}
    assert sorted(pages - set(targets)) == [], "docs pages the README's index does not link"


def test_default_yaml_is_the_schema_default():
    from omegaconf import OmegaConf

    from datkit.config import load_config

    root = README.parent
    default_yaml = load_config(str(root / "configs" / "default.yaml"))
    assert OmegaConf.to_container(default_yaml) == OmegaConf.to_container(load_config())
