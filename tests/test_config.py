"""Configuration: every bad input fails at start-up with a ``ConfigError`` naming the key and what is allowed.

Also: every YAML file in ``configs/`` loads, and the command line (``python -m datkit.train``) exits
with code 2 and a clear message before any training starts.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datkit.backends import BACKEND_CHOICES
from datkit.config import ConfigError, load_config, validate_for_training, validate_for_world
from datkit.data import DATASETS
from datkit.methods import METHODS
from datkit.models import MODELS
from datkit.optim import OPTIMIZERS, SCHEDULES
from datkit.preflight import validate_config
from helpers.runs import REPO, describe, run_python


def _load_error(*overrides: str, config: str | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(config, list(overrides))
    return str(exc.value)


def _validate_error(*overrides: str) -> str:
    cfg = load_config(None, list(overrides))
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    return str(exc.value)


# --- defaults ---------------------------------------------------------------------------------------

def test_defaults_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cfg = load_config(None, [])
    validate_config(cfg)
    validate_for_world(cfg, 1)
    assert cfg.data.name == "mnist5k" and cfg.model.name == "cnn_small" and cfg.method.name == "pgd"


def test_overrides_are_applied_with_types() -> None:
    cfg = load_config(None, ["train.epochs=3", "attack.eps=0.1", "model.kwargs.channels=[8,16]", "log.plot=false"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.attack.eps == pytest.approx(0.1)
    assert list(cfg.model.kwargs.channels) == [8, 16]
    assert cfg.log.plot is False


def test_output_dir_interpolation_is_resolved() -> None:
    cfg = load_config(None, ["data.name=digits", "method.name=fgsm"])
    assert cfg.train.output_dir == "runs/digits_fgsm"


# --- unknown keys and wrong types (load_config) ------------------------------------------------------

def test_unknown_section_key_lists_allowed_keys() -> None:
    msg = _load_error("train.foo=1")
    assert "train.foo" in msg
    for allowed in ("epochs", "batch_size", "grad_accum", "output_dir"):
        assert allowed in msg, msg


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    msg = _load_error("foo=1")
    assert "foo" in msg
    for allowed in ("backend", "device", "data", "model", "attack", "method", "optim", "train", "eval"):
        assert allowed in msg, msg


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("attack:\n  epsilon: 0.3\n")
    msg = _load_error(config=str(path))
    assert "attack.epsilon" in msg and str(path) in msg
    assert "eps" in msg and "steps" in msg, msg


@pytest.mark.parametrize("override, key, expected", [
    ("train.epochs=abc", "train.epochs", "int"),
    ("attack.eps=big", "attack.eps", "float"),
    ("log.plot=maybe", "log.plot", "bool"),
    ("train.checkpoint_every_steps=often", "train.checkpoint_every_steps", "int"),
])
def test_wrong_type_names_key_and_type(override: str, key: str, expected: str) -> None:
    msg = _load_error(override)
    assert key in msg, msg
    assert expected in msg.lower(), msg


def test_override_without_equals_sign() -> None:
    msg = _load_error("train.epochs")
    assert "train.epochs" in msg and "key=value" in msg


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = _load_error(config=str(missing))
    assert str(missing) in msg and "does not exist" in msg


# --- impossible values (validate_config) -------------------------------------------------------------

@pytest.mark.parametrize("override, key, allowed", [
    ("attack.eps=-0.1", "attack.eps", ">= 0"),
    ("attack.steps=0", "attack.steps", ">= 1"),
    ("attack.alpha=0", "attack.alpha", "> 0"),
    ("attack.norm=l1", "attack.norm", "linf, l2"),
    ("train.epochs=0", "train.epochs", ">= 1"),
    ("train.grad_accum=0", "train.grad_accum", ">= 1"),
    ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps", ">= 0"),
    ("train.batch_size=10", "train.batch_size", "divisible by train.grad_accum"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("optim.momentum=1.5", "optim.momentum", "[0, 1)"),
    ("eval.pgd_steps=0", "eval.pgd_steps", ">= 1"),
    ("device=tpu", "device", "cpu"),
])
def test_impossible_value_names_key_and_bound(override: str, key: str, allowed: str) -> None:
    extra = ["train.grad_accum=3"] if key == "train.batch_size" else []
    msg = _validate_error(override, *extra)
    assert f"{key}=" in msg, msg
    assert allowed in msg, msg


def test_every_impossible_value_is_reported_at_once() -> None:
    msg = _validate_error("attack.eps=-0.1", "attack.steps=0", "model.name=nope")
    assert "attack.eps" in msg and "attack.steps" in msg and "model.name" in msg, msg


@pytest.mark.parametrize("key, registry", [
    ("model.name", MODELS.names()),
    ("data.name", DATASETS.names()),
    ("method.name", METHODS.names()),
    ("optim.name", OPTIMIZERS.names()),
    ("schedule.name", list(SCHEDULES)),
    ("backend", list(BACKEND_CHOICES)),
])
def test_unknown_name_lists_known_names(key: str, registry: list[str]) -> None:
    assert registry, f"nothing registered for {key}"
    msg = _validate_error(f"{key}=no_such_thing")
    assert f"{key}='no_such_thing'" in msg, msg
    for name in registry:
        assert name in msg, f"{name!r} missing from: {msg}"


def test_unknown_model_message_mentions_cnn_small() -> None:
    assert "cnn_small" in _validate_error("model.name=cnn_huge")


def test_official_test_set_missing(tmp_path: Path) -> None:
    msg = _validate_error("data.test=mnist", f"data.shared_root={tmp_path / 'missing'}")
    assert "data.test" in msg and "data.shared_root" in msg and str(tmp_path / "missing") in msg, msg


def test_official_test_set_needs_mnist_training_data(tmp_path: Path) -> None:
    msg = _validate_error("data.name=digits", "data.test=mnist")
    assert "data.test=mnist" in msg and "digits" in msg and "split" in msg, msg


def test_torchvision_dataset_without_files(tmp_path: Path) -> None:
    msg = _validate_error("data.name=cifar10", f"data.root={tmp_path}")
    assert "data.root" in msg and "data.download" in msg, msg


# --- checks that depend on the number of workers -----------------------------------------------------

def test_global_batch_must_split_across_workers() -> None:
    cfg = load_config(None, ["train.batch_size=100"])
    validate_config(cfg)
    validate_for_world(cfg, 2)
    with pytest.raises(ConfigError) as exc:
        validate_for_world(cfg, 3)
    msg = str(exc.value)
    assert "train.batch_size=100" in msg and "world_size" in msg and "3" in msg, msg


def test_global_batch_must_split_across_workers_and_microbatches() -> None:
    cfg = load_config(None, ["train.batch_size=100", "train.grad_accum=2"])
    validate_config(cfg)
    validate_for_world(cfg, 2)
    with pytest.raises(ConfigError, match="train.grad_accum"):
        validate_for_world(cfg, 4)


def test_eval_batch_at_least_world_size() -> None:
    cfg = load_config(None, ["eval.batch_size=2", "train.batch_size=8"])
    validate_config(cfg)
    with pytest.raises(ConfigError, match="eval.batch_size"):
        validate_for_world(cfg, 4)


# --- the YAML files in configs/ ---------------------------------------------------------------------

_CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs").glob("*.yml"))


def _leaves(node: object, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("path", _CONFIGS or [None], ids=[p.name for p in _CONFIGS] or ["no-configs"])
def test_config_file_loads(path: Path | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if path is None:
        pytest.skip(f"no YAML files in {REPO / 'configs'} yet")
    monkeypatch.chdir(REPO)  # data.shared_root and other relative paths are relative to the repository root
    cfg = load_config(str(path), [])
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    merged = OmegaConf.to_container(cfg, resolve=True)
    for key, value in _leaves(raw):
        section = key.split(".")
        got = merged
        for part in section:
            assert isinstance(got, dict) and part in got, f"{path.name}: key {key} is not in the loaded config"
            got = got[part]
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation: resolved by load_config
        if isinstance(value, float) or isinstance(got, float):
            assert got == pytest.approx(value), f"{path.name}: {key}={value!r} loaded as {got!r}"
        elif not (key.startswith("model.kwargs") and isinstance(value, list)):
            assert got == value, f"{path.name}: {key}={value!r} loaded as {got!r}"
    if cfg.data.name in ("mnist5k", "digits"):
        validate_config(cfg)


@pytest.mark.parametrize("path", _CONFIGS, ids=[p.name for p in _CONFIGS])
def test_every_config_file_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``validate_config`` (every plug-in's check, as ``datkit.train`` runs it) on every file in ``configs/``, with
    the data sets' presence aside (CIFAR-10, MNIST, ImageNet, Tiny ImageNet are not on a CI machine): each
    registered dataset's file check and the official-MNIST check report "present", a fine-tuning config's
    ``train.init_from`` checkpoint is set aside; every other check runs."""
    import dataclasses

    import datkit.data.checks as data_checks

    monkeypatch.chdir(REPO)
    registry, get = data_checks.DATASETS, data_checks.DATASETS.get
    monkeypatch.setattr(registry, "get", lambda name: dataclasses.replace(get(name), check=None))
    monkeypatch.setattr(data_checks, "official_mnist_available", lambda root: True)
    # a fine-tuning config starts from a checkpoint that its pre-training run writes: its presence is aside too
    init_from = load_config(str(path), []).train.init_from
    assert init_from is None or str(init_from).endswith(".pt"), init_from
    cfg = load_config(str(path), [] if init_from is None else ["train.init_from=null"])
    validate_config(cfg)
    validate_for_training(cfg)


def test_config_validation_of_the_files_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same validation, on a file of configs/ with one bad value, fails naming it (data presence still aside)."""
    import dataclasses

    import datkit.data.checks as data_checks

    monkeypatch.chdir(REPO)
    registry, get = data_checks.DATASETS, data_checks.DATASETS.get
    monkeypatch.setattr(registry, "get", lambda name: dataclasses.replace(get(name), check=None))
    with pytest.raises(ConfigError, match="attack.steps"):
        validate_config(load_config(str(REPO / "configs" / "cifar10_pgd.yaml"), ["attack.steps=0"]))


# --- the command line ------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_bad_value_exits_2_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    proc = run_python(["-m", "datkit.train", "attack.steps=0", f"train.output_dir={out}"], cwd=tmp_path, timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, describe(proc)
    assert "attack.steps" in proc.stderr and ">= 1" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert not out.exists(), "the output directory was created although the config was rejected"
    assert "epoch" not in proc.stdout, describe(proc)
    # The default config trains for minutes; failing at start-up costs about one start of the entry point. The bound is
    # scaled by that start measured here, now (machine speed and load alike), with room for a slow second start.
    start = time.monotonic()
    ref = run_python(["-c", "import datkit.train"], cwd=tmp_path, timeout=180)
    startup = time.monotonic() - start
    assert ref.returncode == 0, describe(ref)
    assert elapsed < 3 * startup + 15, (f"took {elapsed:.1f} s to reject the config "
                                        f"(importing datkit.train: {startup:.1f} s)")


@pytest.mark.slow
def test_cli_unknown_key_and_missing_config_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_python(["-m", "datkit.train", "--config", str(tmp_path / "missing.yaml"), "train.foo=1",
                       f"train.output_dir={out}"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, describe(proc)
    assert "missing.yaml" in proc.stderr and "does not exist" in proc.stderr, describe(proc)
    assert not out.exists()
    proc = run_python(["-m", "datkit.train", "train.foo=1", f"train.output_dir={out}"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, describe(proc)
    assert "train.foo" in proc.stderr and "epochs" in proc.stderr, describe(proc)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "deepspeed"])
def test_cli_backend_without_its_library_says_how_to_install(backend: str, tmp_path: Path) -> None:
    # the library is made unimportable in the child (it may well be installed here: the dev extra has DeepSpeed)
    out = tmp_path / "out"
    script = (f"import sys; sys.modules['{backend}'] = None\n"
              f"from datkit.train import main\nmain(['backend={backend}', 'train.output_dir={out}'])\n")
    proc = run_python(["-c", script], cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, describe(proc)
    assert backend in proc.stderr and "install" in proc.stderr and "backend=torch" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert not out.exists()
