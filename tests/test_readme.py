"""The README's config reference is the generated one, and its Quickstart has exactly two commands."""
import pathlib
import re

from datkit.config.docs import markdown, rows
from datkit.config.readme_sync import END, START

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_in_sync():
    text = README.read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == markdown(), "README config reference is stale: run `python -m datkit.config.readme_sync`"


def test_every_field_documented():
    undocumented = [key for key, _, _, doc in rows() if not doc]
    assert not undocumented, f"schema fields without a comment: {undocumented}"


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    text = README.read_text()
    quick = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in quick.strip().splitlines() if ln.split("#")[0].strip()]
    assert len(commands) == 2, commands
    ci = (README.parent / ".ci" / "run").read_text()
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith(("#", "set ", "cd "))]
    assert ci_cmds == [commands[1]], (ci_cmds, commands[1])


def test_default_yaml_is_the_schema_default():
    from omegaconf import OmegaConf

    from datkit.config import load_config

    root = README.parent
    assert OmegaConf.to_container(load_config(str(root / "configs" / "default.yaml"))) == OmegaConf.to_container(load_config())
