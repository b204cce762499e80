"""1-bit Adam / 1-bit LAMB (``datkit.optim.onebit``) and the communicating-optimizer seam
(``datkit.optim.communicating``).

In-process: the warm-up is exactly ``torch.optim.Adam`` (1-bit LAMB: exactly LALR), the variance freezes at
``freeze_step``, a fractional ``freeze_step`` resolves against the run, bad settings fail at start-up.
One torchrun launch (2 workers, ``helpers/wire_train.py``): with DDP and without, the same weights; the warm-up
epoch equals Adam's under DDP; after the warm-up the bytes per step are the 1-bit codec's (~0.032 of the float32
allreduce) and each worker's socket writes match them; a run resumed after its first epoch ends with the
uninterrupted run's weights (atol 0); 1-bit LAMB trains. Horovod and DeepSpeed ZeRO-0 take the same steps
(``test_horovod.py``, ``test_deepspeed.py`` run ``ONEBIT`` in their launches and compare with ``torch_onebit``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datkit.optim import LALR
from datkit.optim.onebit import OnebitAdam
from helpers.runs import assert_same_weights, load_checkpoint

# 2 epochs of 3 steps, the variance frozen after step 2: epoch 1 ends with a compressed step (so a checkpoint after
# it holds error-feedback residuals), epoch 2 is compressed. A 512-unit
# hidden layer (~40k parameters) so that the codec's padding to whole blocks is small next to the payload.
ONEBIT = ["optim.name=onebit_adam", "optim.freeze_step=2", "optim.lr=0.01", "schedule.name=constant", "train.epochs=2",
          "train.max_steps=3", "model.kwargs.hidden=512"]

# --- in-process ---------------------------------------------------------------------------------------
def _train(make, steps: int = 12) -> torch.Tensor:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    opt = make(net.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = net(torch.randn(8, 5, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_the_warm_up_is_exactly_adam_and_lalr(wd: float) -> None:
    assert torch.equal(_train(lambda p: OnebitAdam(p, lr=1e-2, weight_decay=wd, freeze_step=100)),
                       _train(lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=wd)))
    assert torch.equal(_train(lambda p: OnebitAdam(p, lr=1e-2, weight_decay=wd, freeze_step=100, lamb=True)),
                       _train(lambda p: LALR(p, lr=1e-2, weight_decay=wd)))


def test_the_variance_freezes_after_freeze_step() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    opt = OnebitAdam([p], lr=1e-2, freeze_step=3)
    seen = []
    for k in range(6):
        p.grad = torch.full_like(p, float(k + 1))
        opt.step()
        seen.append(opt.state[p]["exp_avg_sq"].clone())
    assert not torch.equal(seen[1], seen[2])  # steps 1..3 update v
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[2], seen[5])  # then it stays
    assert [opt.frozen(t) for t in (3, 4)] == [False, True]
    # one worker after the freeze: Adam's step with the frozen variance (nothing to compress)
    assert not torch.equal(_train(lambda q: OnebitAdam(q, lr=1e-2, freeze_step=6)),
                           _train(lambda q: torch.optim.Adam(q, lr=1e-2)))


def test_a_fractional_freeze_step_is_a_share_of_the_run() -> None:
    opt = OnebitAdam([torch.nn.Parameter(torch.zeros(3))], freeze_step=0.25)
    with pytest.raises(RuntimeError, match="plan"):
        opt.frozen(1)
    opt.plan(936)
    assert opt.freeze_at == 234


@pytest.mark.parametrize("override,needle", [
    ("compression.name=onebit", "compression.name='onebit' with optim.name=onebit_adam"),
    ("optim.freeze_step=2.5", "optim.freeze_step=2.5 must be a whole number"),
    ("optim.freeze_step=0", "optim.freeze_step=0"),
    ("optim.onebit_block_size=12", "optim.onebit_block_size=12 must be a positive multiple of 8"),
    ("train.grad_clip=1.0", "train.grad_clip=1.0 with optim.name=onebit_adam"),
])
def test_bad_settings_fail_at_start_up(override: str, needle: str) -> None:
    from datkit.config import ConfigError, load_config
    from datkit.preflight import validate_config

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        validate_config(load_config(None, ["optim.name=onebit_adam", override]))


def test_zero_stage_1_is_refused_with_the_reason() -> None:
    from datkit.config import ConfigError, load_config

    pytest.importorskip("deepspeed")
    from datkit.backends.deepspeed_config import refuse_at_zero_stage

    with pytest.raises(ConfigError, match="optim.name=onebit_adam needs ZeRO stage 0"):
        refuse_at_zero_stage(load_config(None, ["optim.name=onebit_adam"]), 1)


# --- one torchrun launch --------------------------------------------------------------------------------
# ``torch_onebit`` (tests/conftest.py): every torch-backend run of this module, and the certified runs that
# test_horovod and test_deepspeed compare with, in ONE 2-worker torchrun launch.


def _fp32_allreduce_bytes(weights: dict[str, torch.Tensor]) -> float:
    numel = sum(v.numel() for k, v in weights.items() if not k.startswith("normalize."))
    return 2 * (2 - 1) / 2 * 4 * numel


def _onebit_bytes(weights: dict[str, torch.Tensor], block: int = 1024) -> float:
    """One worker of 2, one compressed step: all_to_all of half the padded payload, all_gather of one chunk."""
    numel = sum(v.numel() for k, v in weights.items() if not k.startswith("normalize."))
    chunk = -(-numel // (2 * block)) * block
    payload = chunk // 8 + 4 * (chunk // block)  # packed signs + float32 scales of one chunk
    return payload * 1 + payload * 1  # (M-1)/M of 2 chunks' payload, then (M-1) x one chunk's


@pytest.mark.slow
def test_with_and_without_ddp_the_same_steps(torch_onebit: Path) -> None:
    ddp, manual = load_checkpoint(torch_onebit / "ddp"), load_checkpoint(torch_onebit / "noddp")
    assert_same_weights(ddp["model"], manual["model"], atol=1e-6)


@pytest.mark.slow
def test_the_warm_up_equals_adam_under_ddp(torch_onebit: Path) -> None:
    """The optimizer's own float32 allreduce of the local gradients = DDP's average: Adam's steps to 1e-6."""
    assert_same_weights(load_checkpoint(torch_onebit / "adam_warm")["model"],
                        load_checkpoint(torch_onebit / "onebit_warm")["model"], atol=1e-6)


@pytest.mark.slow
def test_bytes_after_the_warm_up_are_the_codecs_and_match_the_wire(torch_onebit: Path) -> None:
    from helpers.wire import wire_records

    ckpt = load_checkpoint(torch_onebit / "ddp")
    first, compressed = (r["bytes_per_iter"] for r in ckpt["records"])
    fp32, onebit = _fp32_allreduce_bytes(ckpt["model"]), _onebit_bytes(ckpt["model"])
    # 2 float32 allreduces of the gradients, 1 codec step
    assert first == pytest.approx((2 * fp32 + onebit) / 3, rel=1e-9)
    assert compressed == pytest.approx(onebit, rel=1e-9)
    assert compressed <= 0.04 * fp32, compressed / fp32
    recs = [r for r in wire_records(torch_onebit) if r["run"] == "ddp" and r["epoch"] == 2]
    assert sorted(r["rank"] for r in recs) == [0, 1], recs
    ratios = [r["written"] / r["steps"] / r["bytes_per_iter"] for r in recs]
    assert all(0.9 <= x <= 1.3 for x in ratios), ratios  # small messages: gloo's headers show


@pytest.mark.slow
def test_resume_after_the_first_epoch_is_exact(torch_onebit: Path) -> None:
    resumed, full = load_checkpoint(torch_onebit / "part"), load_checkpoint(torch_onebit / "ddp")
    assert resumed["epoch"] == full["epoch"] == 2
    assert_same_weights(resumed["model"], full["model"], atol=0.0)
    assert resumed["optimizer_exchange"]["world_size"] == 2
    assert all(r["worker"] and r["server"] for r in resumed["optimizer_exchange"]["ranks"])  # residuals travel


@pytest.mark.slow
def test_onebit_lamb_trains(torch_onebit: Path) -> None:
    ckpt = load_checkpoint(torch_onebit / "lamb")
    losses = [r["train_loss"] for r in ckpt["records"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert ckpt["records"][1]["bytes_per_iter"] == pytest.approx(_onebit_bytes(ckpt["model"]), rel=1e-9)
    adam = load_checkpoint(torch_onebit / "ddp")["model"]
    assert any(not torch.equal(ckpt["model"][k], adam[k]) for k in adam)  # the trust ratio changed the steps


def test_a_frozen_variance_stays_frozen_when_a_resumed_run_plans_more_steps() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = OnebitAdam([p], freeze_step=0.25)
    opt.plan(8)  # freezes after step 2
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    saved = opt.state_dict()
    resumed = OnebitAdam([p], freeze_step=0.25)
    resumed.plan(40)  # the resumed run is longer: 0.25 of it would be step 10
    resumed.load_state_dict(saved)
    assert resumed.freeze_at == 2 and resumed.frozen(4)
    early = OnebitAdam([p], freeze_step=0.25)
    early.plan(40)
    early.load_state_dict({**saved, "freeze_at": 5})  # not frozen yet when saved: the new plan decides
    assert early.freeze_at == 10
