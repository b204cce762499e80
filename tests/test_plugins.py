"""Plug-ins by import path that are right: a user's method, optimizer and compressor class train in-process
(the wrong ones are tests/test_examples.py's), and ``torchvision:NAME`` through the same registry."""
from __future__ import annotations

from pathlib import Path

import pytest

from datkit.registry import PluginError, Registry, load_object
from helpers.runs import TINY, load_checkpoint, train_inprocess


def test_a_users_method_and_optimizer_train(tmp_path: Path) -> None:
    out = tmp_path / "out"
    final = train_inprocess([*TINY, "method.name=helpers.good_plugins:LabelSmoothingClean",
                             "optim.name=helpers.good_plugins:plain_sgd", "optim.lr=0.05", "train.epochs=1",
                             "train.max_steps=3", "optim.momentum=0.9", "compression.name=datkit.compress.int8:Int8",
                             f"train.output_dir={out}"])
    assert 0.0 <= final["TA"] <= 1.0
    state = load_checkpoint(out)
    group = state["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0 and group["weight_decay"] == 0  # the user's factory, not datkit's sgd (momentum 0.9)


def test_the_registry_resolves_import_paths_and_prefixes() -> None:
    reg: Registry = Registry("thing")
    reg.register("one")(lambda: 1)
    reg.register_prefix("double", lambda rest: (lambda: 2 * int(rest)))
    assert reg.get("one")() == 1 and reg.get("double:21")() == 42
    assert reg.get("os.path:join") is load_object("os.path:join")
    with pytest.raises(KeyError, match="known: one .*MODULE:CALLABLE"):
        reg.get("two")
    with pytest.raises(PluginError, match="has no attribute 'nope'"):
        reg.get("os.path:nope")
    with pytest.raises(PluginError, match="not a callable thing factory"):
        reg.get("os:sep")
    with pytest.raises(KeyError, match="must not contain ':'"):
        reg.register("a:b")(lambda: 0)
