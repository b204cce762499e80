"""Certified training on 2 CPU workers (torchrun, gloo): a 2-worker run equals the 1-worker run with the same
global batch, for IBP, CROWN-IBP, MTL-IBP and SABR, on a BatchNorm model (CC-IBP differs from MTL-IBP only in how
it combines the two losses); the crown-ibp runs evaluate VA by the verification cascade ``[ibp, crown-ibp, crown]``,
whose per-stage columns must agree too.

With ``model.sync_bn=true`` every BatchNorm becomes a GlobalBatchNorm (torch's SyncBatchNorm is GPU-only):
the clean pass and the bounds normalize with the statistics of the global batch, so the gradients and the
running statistics of 2 workers x 16 examples are those of 1 worker x 32. Without it, each worker
normalizes its own half and the runs differ (the control below), which is what the sync is for.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from datkit.models import create_model
from datkit.models.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from helpers.runs import assert_same_weights, describe, load_checkpoint, one_thread, run_python

# A tiny CNN-7 with BatchNorm; eps at its maximum from the first step (no warm-up, no regularizer: plain
# IBP / CROWN-IBP with beta from the ramp), SGD as in test_distributed (Adam turns rounding noise in
# near-zero gradients into lr-sized steps), gradient clipping as in the paper.
RUN = ["backend=torch", "device=cpu", "eval.aa_samples=0", "data.name=digits", "model.name=cnn_7layer_bn",
       "model.kwargs.width=4", "model.kwargs.linear_size=16", "attack.eps=0.01", "eval.eps=0.01",
       "bounds.eps_schedule=linear", "bounds.eps_start=0", "bounds.reg_lambda=0", "train.epochs=1", "train.max_steps=3",
       "train.batch_size=32", "train.grad_clip=10",
       "optim.name=sgd", "optim.lr=0.05", "eval.num_samples=50", "eval.final_num_samples=50", "eval.batch_size=50",
       "eval.pgd_steps=2", "log.progress=false", "log.tensorboard=false", "log.plot=false"]
METHODS = {"ibp": ["method.name=ibp", "bounds.eps_length=0"],  # eps_max from the start
           # mid-ramp: beta > 0 (CROWN-IBP bounds used); VA by the whole verification cascade
           # (datkit.certify.cascade) at an eval.eps where IBP verifies none of these 50 images and full CROWN the
           # clean-correct ones
           "crown-ibp": ["method.name=crown-ibp", "bounds.eps_length=2", "bounds.verify=[ibp,crown-ibp,crown]",
                         "eval.eps=0.05"],
           # a PGD point in the loss: the attack's forward passes normalize with the global batch too
           "mtl-ibp": ["method.name=mtl-ibp", "bounds.alpha=0.5", "bounds.eps_length=0", "attack.steps=2"],
           "sabr": ["method.name=sabr", "bounds.lambda_box=0.5", "bounds.eps_length=0", "attack.steps=2"]}
# the cascade's counts, sharded over workers
CASCADE = ["VA", "VA_gap", "VA_gain_ibp", "VA_gain_crown-ibp", "VA_gain_crown"]


def _train(nproc: int, args: list[str], out: Path) -> dict:
    """``nproc`` workers under torchrun, or (nproc = 1) one plain process in this interpreter."""
    if nproc == 1:
        from datkit.train import main

        with one_thread():
            main([*RUN, *args, f"train.output_dir={out}"])
        return load_checkpoint(out)
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = run_python([*cmd, "-m", "datkit.train", *RUN, *args, f"train.output_dir={out}"], cwd=out.parent, timeout=280)
    assert proc.returncode == 0, describe(proc)
    assert f"world_size={nproc}" in proc.stdout, describe(proc)
    return load_checkpoint(out)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", list(METHODS))
def test_two_workers_match_one_worker_with_the_same_global_batch(method: str, tmp_path: Path) -> None:
    one = _train(1, METHODS[method], tmp_path / "one")
    two = _train(2, [*METHODS[method], "model.sync_bn=true"], tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert_same_weights(two["model"], one["model"], atol=1e-5)
    assert two["records"][0]["train_loss"] == pytest.approx(one["records"][0]["train_loss"], rel=1e-5)
    if method == "crown-ibp":  # the cascade's per-stage fractions: the same for 1 and 2 workers
        assert {k: two["records"][0][k] for k in CASCADE} == pytest.approx({k: one["records"][0][k] for k in CASCADE})
        assert (sum(one["records"][0][f"VA_gain_{s}"] for s in ("ibp", "crown-ibp", "crown"))
                == pytest.approx(one["records"][0]["VA"]))
        assert one["records"][0]["VA_gain_crown"] > 0 and one["records"][0]["VA_time_crown_s"] > 0
    init = _initial(tmp_path)
    moved = max((one["model"][k].double() - init[k].double()).abs().max().item()
                for k in init if init[k].is_floating_point())
    assert moved > 1e-3, "the weights did not change in 3 steps"
    if method == "ibp":  # control: without global statistics each worker normalizes its half batch
        plain = _train(2, METHODS[method], tmp_path / "plain")
        diff = max((plain["model"][k].double() - one["model"][k].double()).abs().max().item()
                   for k in one["model"] if one["model"][k].is_floating_point())
        assert diff > 1e-3, f"per-worker BatchNorm statistics should change the run (max difference {diff:.2g})"


def _initial(tmp_path: Path) -> dict:
    """The weights the runs start from: the model built and IBP-initialized as the trainer does."""
    from datkit.config import load_config
    from datkit.data import DATASETS
    from datkit.engine import build_model
    from datkit.methods import create_method

    cfg = load_config(None, [*RUN, *METHODS["ibp"], f"train.output_dir={tmp_path / 'init'}"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, DATASETS.get(cfg.data.name))
    create_method(cfg).prepare_model(model)
    return model.state_dict()


def test_global_batchnorm_is_batchnorm_on_one_process() -> None:
    torch.manual_seed(0)
    model = create_model("cnn_7layer_bn", 10, 1, 8, width=4, linear_size=8).train()
    reference = create_model("cnn_7layer_bn", 10, 1, 8, width=4, linear_size=8).train()
    reference.load_state_dict(model.state_dict())
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    kinds = [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds and all(k is GlobalBatchNorm for k in kinds)
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.state_dict(), reference.state_dict())  # running statistics updated alike
