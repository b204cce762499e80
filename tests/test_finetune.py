"""Robust pre-training then fine-tuning: ``train.init_from`` (head replacement, frozen backbone), ``data.resize``,
and the errors for a missing file, a file that is not a checkpoint and a checkpoint whose model does not fit."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datkit.checkpoint import atomic_save
from datkit.config import ConfigError, load_config, validate_for_training
from datkit.data import build_data, resize_images
from datkit.engine.transfer import init_from_checkpoint, last_linear
from datkit.models import create_model
from datkit.preflight import validate_config
from helpers.runs import load_checkpoint, train_inprocess

RUN = ["train.epochs=1", "train.max_steps=2"]


def _model(num_classes: int, image_size: int = 8, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn_small", num_classes, in_channels=1, image_size=image_size, channels=[4, 8], hidden=16,
                        **kw)


def _save(model: torch.nn.Module, path: Path, name: str = "cnn_small") -> str:
    atomic_save({"model": model.state_dict(), "config": f"model:\n  name: {name}\ndata:\n  name: mnist5k\n"}, str(path))
    return str(path)


# --- data.resize -----------------------------------------------------------------------------------------

def test_resize_images_shape_and_range() -> None:
    x = torch.rand(5, 1, 8, 8)
    y = resize_images(x, 28)
    assert y.shape == (5, 1, 28, 28) and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert resize_images(x[0], 28).shape == (1, 28, 28)
    assert torch.equal(resize_images(x, 8), x)
    assert resize_images(torch.ones(2, 3, 32, 32), 16).sub(1.0).abs().max() < 1e-6  # a constant image stays constant


def test_digits_resized_to_28() -> None:
    cfg = load_config(None, ["data.name=digits", "data.resize=28"])
    validate_config(cfg)
    data = build_data(cfg.data)
    assert data.spec.image_size == 28 and data.train[0][0].shape == (1, 28, 28) and data.test[0][0].shape == (1, 28, 28)
    assert "28x28" in data.test_name


# --- init_from_checkpoint --------------------------------------------------------------------------------

def test_last_linear_is_the_classifier() -> None:
    name, head = last_linear(_model(10))
    assert name == "net.7" and head.out_features == 10
    name, head = last_linear(create_model("preact_resnet18", 7, in_channels=3, image_size=32))
    assert head.out_features == 7 and name.endswith("linear")


def test_head_replaced_for_a_new_number_of_classes(tmp_path: Path) -> None:
    pre = _model(10, seed=1)
    path = _save(pre, tmp_path / "pre.pt")
    new = _model(5, seed=2)
    fresh_head = new.net[7].weight.detach().clone()
    note = init_from_checkpoint(new, path)
    assert "replaced (10 -> 5 classes" in note
    pre_sd, new_sd = pre.state_dict(), new.state_dict()
    for k in pre_sd:
        if not k.startswith("net.7."):
            assert torch.equal(pre_sd[k], new_sd[k]), k
    assert torch.equal(new.net[7].weight, fresh_head) and new.net[7].weight.shape == (5, 16)
    assert all(p.requires_grad for p in new.parameters())


def test_head_kept_when_classes_match_unless_new_head(tmp_path: Path) -> None:
    pre = _model(10, seed=1)
    path = _save(pre, tmp_path / "pre.pt")
    kept = _model(10, seed=2)
    assert "kept" in init_from_checkpoint(kept, path)
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), pre.state_dict().values()))
    fresh = _model(10, seed=2)
    head = fresh.net[7].weight.detach().clone()
    init_from_checkpoint(fresh, path, new_head=True)
    assert torch.equal(fresh.net[7].weight, head) and torch.equal(fresh.net[0].weight, pre.net[0].weight)


def test_freeze_backbone_leaves_only_the_head_trainable(tmp_path: Path) -> None:
    path = _save(_model(10), tmp_path / "pre.pt")
    m = _model(3)
    init_from_checkpoint(m, path, freeze_backbone=True)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["net.7.weight", "net.7.bias"]


def test_model_that_does_not_fit_is_refused_with_both_models_named(tmp_path: Path) -> None:
    path = _save(_model(10, image_size=28), tmp_path / "pre.pt")
    with pytest.raises(ConfigError) as exc:
        init_from_checkpoint(_model(10, image_size=8), path, run_model="cnn_small at 8x8")
    msg = str(exc.value)
    assert "train.init_from" in msg and "cnn_small" in msg and "8x8" in msg and "net.5.weight" in msg, msg
    assert "data.resize" in msg, msg


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        init_from_checkpoint(_model(10), str(bad))
    atomic_save({"weights": torch.ones(2)}, str(tmp_path / "other.pt"))
    with pytest.raises(ConfigError, match="not a datkit checkpoint"):
        init_from_checkpoint(_model(10), str(tmp_path / "other.pt"))


def test_missing_init_from_file_fails_at_start_up(tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.init_from={tmp_path / 'missing.pt'}", f"train.output_dir={tmp_path / 'out'}"])
    validate_config(cfg)
    with pytest.raises(ConfigError, match="train.init_from=.*no such checkpoint file"):
        validate_for_training(cfg)
    with pytest.raises(SystemExit) as exc:
        train_inprocess([*RUN, f"train.init_from={tmp_path / 'missing.pt'}", f"train.output_dir={tmp_path / 'out'}"])
    assert exc.value.code == 2 and not (tmp_path / "out").exists()


def test_freeze_backbone_needs_init_from() -> None:
    with pytest.raises(ConfigError, match="train.init_from"):
        validate_config(load_config(None, ["train.freeze_backbone=true"]))


# --- end to end: pre-train on mnist5k, fine-tune on digits at 28x28 ---------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre")
    train_inprocess([*RUN, "data.name=mnist5k", "data.test=split", f"train.output_dir={out}"])
    return out / "checkpoint_last.pt"


def test_finetune_frozen_backbone_on_resized_digits(pretrained: Path, tmp_path: Path) -> None:
    final = train_inprocess([*RUN, "data.resize=28", f"train.init_from={pretrained}", "train.freeze_backbone=true",
                             "train.new_head=true", f"train.output_dir={tmp_path}"])
    assert final["init_from"] == str(pretrained)
    pre, tuned = torch.load(pretrained, weights_only=True)["model"], load_checkpoint(tmp_path)["model"]
    for k in pre:
        if k.startswith("net.7."):
            assert not torch.equal(pre[k], tuned[k]), f"{k}: the head did not change"
        else:
            assert torch.equal(pre[k], tuned[k]), f"{k}: a frozen tensor changed"


def test_finetune_without_resize_is_refused(pretrained: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        train_inprocess([*RUN, f"train.init_from={pretrained}", f"train.output_dir={tmp_path}"])
    assert exc.value.code == 2


def test_finetuned_checkpoint_evaluates_and_resumes_without_the_pretrained_file(pretrained: Path,
                                                                                tmp_path: Path) -> None:
    from datkit.evaluate import evaluate

    moved = tmp_path / "pre.pt"
    moved.write_bytes(pretrained.read_bytes())
    out = tmp_path / "ft"
    common = [*RUN, "data.resize=28", f"train.init_from={moved}", "schedule.name=constant", f"train.output_dir={out}"]
    train_inprocess(common)
    moved.unlink()  # neither evaluation nor resume needs the pre-trained checkpoint any more
    res = evaluate([f"checkpoint={out / 'checkpoint_last.pt'}", "attacks=[pgd]", "num_samples=20", "pgd_steps=2"])
    assert res["n"] == 20
    final = train_inprocess([*common[1:], "train.epochs=2", "train.resume=true"])
    assert final["epochs"] == 2 and load_checkpoint(out)["epoch"] == 2
