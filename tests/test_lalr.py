"""LALR (DAT's layer-wise adaptive learning rate): the update against the formula on hand-computed tensors,
the clipping of tau at c_l and c_u, excluded parameters (= the plain base optimizer), exact resume, config."""
from __future__ import annotations

import io
import math

import pytest
import torch

from datkit.config import ConfigError, load_config
from datkit.optim import LALR, build_optimizer
from datkit.preflight import validate_config


def _param(values, grad) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def _step(p: torch.nn.Parameter, **kw) -> torch.Tensor:
    LALR([p], **kw).step()
    return p.detach()


# --- the formula on hand-computed tensors ---------------------------------------------------------------

def test_sgd_direction_tau_inside_the_clip_range() -> None:
    # theta = [[3, 4]] (norm 5), g = [[0, 2]] -> u/||u|| = [[0, 1]]; tau = 5; step = 5 * 0.1 * [[0, 1]]
    p = _param([[3.0, 4.0]], [[0.0, 2.0]])
    out = _step(p, lr=0.1, base="sgd", momentum=0.0, c_l=0.0, c_u=10.0)
    assert torch.allclose(out, torch.tensor([[3.0, 3.5]], dtype=torch.float64), atol=1e-12)


def test_tau_clipped_at_c_u() -> None:
    # theta = [[30, 40]] (norm 50) > c_u = 10 -> tau = 10; step = 10 * 0.1 * [[-0.6, -0.8]] for g = [[-3, -4]]
    p = _param([[30.0, 40.0]], [[-3.0, -4.0]])
    out = _step(p, lr=0.1, base="sgd", momentum=0.0, c_l=0.0, c_u=10.0)
    assert torch.allclose(out, torch.tensor([[30.6, 40.8]], dtype=torch.float64), atol=1e-12)


def test_tau_clipped_at_c_l() -> None:
    # theta = [[0.03, 0.04]] (norm 0.05) < c_l = 0.5 -> tau = 0.5; g = [[1, 0]] -> step = 0.5 * 0.2 * [[1, 0]]
    p = _param([[0.03, 0.04]], [[1.0, 0.0]])
    out = _step(p, lr=0.2, base="sgd", momentum=0.0, c_l=0.5, c_u=10.0)
    assert torch.allclose(out, torch.tensor([[-0.07, 0.04]], dtype=torch.float64), atol=1e-12)


def test_zero_norm_tensor_with_c_l_zero_stays_and_c_l_moves_it() -> None:
    p = _param([[0.0, 0.0]], [[1.0, 1.0]])
    assert torch.equal(_step(p, lr=0.1, base="sgd", momentum=0.0, c_l=0.0), torch.zeros(1, 2, dtype=torch.float64))
    p = _param([[0.0, 0.0]], [[1.0, 1.0]])
    s = 0.1 * 0.2 / math.sqrt(2)
    assert torch.allclose(_step(p, lr=0.1, base="sgd", momentum=0.0, c_l=0.2),
                          torch.full((1, 2), -s, dtype=torch.float64))


def test_zero_direction_leaves_the_tensor_unchanged() -> None:
    p = _param([[1.0, 2.0]], [[0.0, 0.0]])
    out = _step(p, lr=0.1, base="sgd", momentum=0.0)
    assert torch.equal(out, torch.tensor([[1.0, 2.0]], dtype=torch.float64)) and torch.isfinite(out).all()


def test_update_does_not_depend_on_the_gradient_scale() -> None:
    a, b = _param([[1.0, -2.0, 0.5]], [[0.3, 0.1, -0.2]]), _param([[1.0, -2.0, 0.5]], [[300.0, 100.0, -200.0]])
    assert torch.allclose(_step(a, lr=0.05, base="sgd", momentum=0.0), _step(b, lr=0.05, base="sgd", momentum=0.0))


def test_adam_direction_two_steps_by_hand() -> None:
    # b1 = 0.5, b2 = 0.75, eps = 0, no weight decay.
    # step 1: g1 = [[1, -2]]; m = 0.5 g1, v = 0.25 g1^2; m_hat = g1, v_hat = g1^2 -> u = sign(g1) = [[1, -1]]
    # step 2: g2 = [[3, 0]]; m = 0.25 g1 + 0.5 g2 = [[1.75, -0.5]]; v = 0.1875 g1^2 + 0.25 g2^2 = [[2.4375, 0.75]]
    #         m_hat = m / 0.75, v_hat = v / 0.4375 -> u = m_hat / sqrt(v_hat)
    theta = torch.tensor([[6.0, 8.0]], dtype=torch.float64)  # norm 10, inside [0, 100]
    p = torch.nn.Parameter(theta.clone())
    opt = LALR([p], lr=0.1, base="adam", betas=(0.5, 0.75), eps=0.0, c_u=100.0)
    p.grad = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    opt.step()
    u1 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    expect = theta - 10.0 * 0.1 * u1 / u1.norm()
    assert torch.allclose(p.detach(), expect, atol=1e-12)
    p.grad = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    opt.step()
    m_hat = torch.tensor([[1.75, -0.5]], dtype=torch.float64) / 0.75
    v_hat = torch.tensor([[2.4375, 0.75]], dtype=torch.float64) / 0.4375
    u2 = m_hat / v_hat.sqrt()
    expect = expect - expect.norm() * 0.1 * u2 / u2.norm()
    assert torch.allclose(p.detach(), expect, atol=1e-12)


def test_adam_weight_decay_folded_in_after_normalization() -> None:
    # first step: u = sign(g) + wd * theta = [[1, 1]] + 0.5 * [[2, 0]] = [[2, 1]]; theta norm 2
    p = _param([[2.0, 0.0]], [[4.0, 0.01]])
    out = _step(p, lr=0.1, base="adam", eps=0.0, weight_decay=0.5, c_u=10.0)
    u = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(out, torch.tensor([[2.0, 0.0]], dtype=torch.float64) - 2.0 * 0.1 * u / u.norm(), atol=1e-12)


def test_sgd_momentum_and_weight_decay_by_hand() -> None:
    # d_t = g_t + wd * theta_t; b1 = d1, b2 = mu * b1 + d2; the step is tau * lr * b / ||b||
    theta = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    p = torch.nn.Parameter(theta.clone())
    opt = LALR([p], lr=0.1, base="sgd", momentum=0.9, weight_decay=0.1)
    p.grad = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    opt.step()
    b = torch.tensor([[1.0, 0.0]], dtype=torch.float64) + 0.1 * theta
    theta1 = theta - 5.0 * 0.1 * b / b.norm()
    assert torch.allclose(p.detach(), theta1, atol=1e-12)
    p.grad = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    opt.step()
    b = 0.9 * b + torch.tensor([[0.0, 1.0]], dtype=torch.float64) + 0.1 * theta1
    assert torch.allclose(p.detach(), theta1 - theta1.norm() * 0.1 * b / b.norm(), atol=1e-12)


# --- excluded parameters -------------------------------------------------------------------------------

def _twins(seed: int = 0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 3)
    norm = torch.nn.LayerNorm(3)
    return [lin.weight, lin.bias, norm.weight, norm.bias]


def _run(opt_factory, params, steps: int = 3, seed: int = 1) -> list[torch.Tensor]:
    opt = opt_factory(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("nesterov", [False, True])
def test_excluded_parameters_get_exactly_torch_sgd(nesterov: bool) -> None:
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    ours = _run(lambda ps: LALR(ps, base="sgd", **kw), _twins())
    ref = _run(lambda ps: torch.optim.SGD(ps, **kw), _twins())
    # biases and LayerNorm tensors (ndim 1): the plain SGD update; the weight matrix: the LALR update
    for i in (1, 2, 3):
        assert torch.allclose(ours[i], ref[i], atol=1e-6), i
    assert not torch.allclose(ours[0], ref[0], atol=1e-4)


def test_excluded_parameters_get_adamw_with_adam_base() -> None:
    kw = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    ours = _run(lambda ps: LALR(ps, base="adam", eps=1e-8, **kw), _twins())
    ref = _run(lambda ps: torch.optim.AdamW(ps, eps=1e-8, **kw), _twins())
    for i in (1, 2, 3):
        assert torch.allclose(ours[i], ref[i], atol=1e-6), i
    assert not torch.allclose(ours[0], ref[0], atol=1e-4)


def test_exclude_none_adapts_every_tensor_and_callable_decides() -> None:
    none = _run(lambda ps: LALR(ps, base="sgd", lr=0.05, momentum=0.0, c_l=0.1, exclude="none"), _twins())
    ref = _run(lambda ps: torch.optim.SGD(ps, lr=0.05), _twins())
    assert all(not torch.allclose(a, b, atol=1e-5) for a, b in zip(none, ref))
    # the callable excludes only the 2-D weight: the opposite of the default
    ours = _run(lambda ps: LALR(ps, base="sgd", lr=0.05, momentum=0.0, c_l=0.1, exclude=lambda p: p.ndim == 2),
                _twins())
    assert torch.allclose(ours[0], ref[0], atol=1e-6)
    assert all(torch.allclose(ours[i], none[i], atol=1e-6) for i in (1, 2, 3))


def test_per_param_group_exclude() -> None:
    ps = _twins()
    ours = _run(lambda _: LALR([{"params": ps[:2], "exclude": "none"}, {"params": ps[2:]}], base="sgd", lr=0.05,
                               momentum=0.0), ps)
    ref = _run(lambda qs: torch.optim.SGD(qs, lr=0.05), _twins())
    assert not torch.allclose(ours[1], ref[1], atol=1e-5)  # a bias adapted in the first group
    assert torch.allclose(ours[2], ref[2], atol=1e-6) and torch.allclose(ours[3], ref[3], atol=1e-6)


def test_parameters_without_gradient_are_skipped() -> None:
    a, b = _param([[1.0, 2.0]], [[1.0, 0.0]]), torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    LALR([a, b], lr=0.1, base="adam").step()
    assert (torch.equal(b.detach(), torch.ones(2, 2, dtype=torch.float64))
            and not torch.equal(a.detach(), torch.tensor([[1.0, 2.0]], dtype=torch.float64)))


# --- state: exact resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_state_dict_resumes_exactly(base: str) -> None:
    def grads(k: int, params):
        g = torch.Generator().manual_seed(100 + k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)

    full = _twins()
    opt = LALR(full, base=base, lr=0.02, weight_decay=0.01, c_l=0.1)
    for k in range(5):
        grads(k, full)
        opt.step()

    part = _twins()
    opt = LALR(part, base=base, lr=0.02, weight_decay=0.01, c_l=0.1)
    for k in range(3):
        grads(k, part)
        opt.step()
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "params": [p.detach().clone() for p in part]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what a checkpoint resume does
    resumed = _twins()
    with torch.no_grad():
        for p, v in zip(resumed, saved["params"]):
            p.copy_(v)
    opt = LALR(resumed, base=base, lr=0.02, weight_decay=0.01, c_l=0.1)
    opt.load_state_dict(saved["optimizer"])
    for k in range(3, 5):
        grads(k, resumed)
        opt.step()
    for a, b in zip(full, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_state_dict_with_a_callable_exclude_loads_with_weights_only() -> None:
    ps = _twins()
    opt = LALR(ps, lr=0.1, exclude=lambda p: p.ndim == 2)
    _run(lambda _: opt, ps, steps=1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = LALR(_twins(), lr=0.1, exclude=lambda p: False)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert callable(opt2.param_groups[0]["exclude"])


# --- arguments and config -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"base": "rmsprop"}, "base"), ({"lr": 0.0}, "lr"), ({"c_l": 2.0, "c_u": 1.0}, "c_l"),
    ({"exclude": "biases"}, "exclude"), ({"momentum": 1.0}, "momentum"), ({"betas": (0.9, 1.0)}, "betas"),
])
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LALR([torch.nn.Parameter(torch.ones(2, 2))], **kw)


def test_optim_name_lalr_builds_lalr_from_the_config() -> None:
    cfg = load_config(None, ["optim.name=lalr", "optim.lalr_base=sgd", "optim.c_l=0.01", "optim.c_u=5", "optim.lr=0.1",
                             "optim.scale_lr=true", "optim.base_batch_size=64", "train.batch_size=256",
                             "optim.lalr_exclude=none", "optim.weight_decay=1e-4"])
    validate_config(cfg)
    opt = build_optimizer(cfg.optim, _twins(), cfg.train.batch_size)
    g = opt.param_groups[0]
    assert isinstance(opt, LALR)
    assert (g["base"], g["c_l"], g["c_u"], g["exclude"], g["weight_decay"]) == ("sgd", 0.01, 5.0, "none", 1e-4)
    assert g["lr"] == pytest.approx(0.4)  # linear scaling 0.1 * 256 / 64


@pytest.mark.parametrize("override, key, allowed", [
    ("optim.lalr_base=rmsprop", "optim.lalr_base", "adam, sgd"),
    ("optim.lalr_exclude=biases", "optim.lalr_exclude", "bias_and_norm, none"),
    ("optim.c_l=-1", "optim.c_l", ">= 0"),
    ("optim.c_u=0.001", "optim.c_u", ">= optim.c_l"),
])
def test_bad_lalr_config(override: str, key: str, allowed: str) -> None:
    cfg = load_config(None, ["optim.name=lalr", "optim.c_l=0.01", override] if key == "optim.c_u"
                      else ["optim.name=lalr", override])
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    assert f"{key}=" in str(exc.value) and allowed in str(exc.value), str(exc.value)


# --- distributed: the torch backend's DDP and manual-reduction paths --------------------------------------

_DIST_STEPS = ["train.epochs=1", "train.max_steps=3", "train.batch_size=32", "optim.name=lalr", "optim.lalr_base=sgd",
               "optim.lr=0.05", "optim.c_l=0.01"]


@pytest.fixture(scope="module")
def lalr_one_worker(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from helpers.runs import load_checkpoint, train_inprocess

    out = tmp_path_factory.mktemp("lalr_one")
    train_inprocess([*_DIST_STEPS, f"train.output_dir={out}"])
    return load_checkpoint(out)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("ddp", ["true", "false"], ids=["ddp", "manual_allreduce"])
def test_lalr_two_workers_match_one_worker(ddp: str, lalr_one_worker: dict, tmp_path) -> None:
    # LALR steps on the averaged gradient: 2 workers with global batch G take the step of 1 worker with G
    from helpers.runs import TINY, assert_same_weights, describe, load_checkpoint, run_python

    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.train", *TINY,
                       *_DIST_STEPS, f"dist.ddp={ddp}", f"train.output_dir={tmp_path / 'two'}"], cwd=tmp_path,
                      timeout=280)
    assert proc.returncode == 0, describe(proc)
    two = load_checkpoint(tmp_path / "two")
    assert two["world_size"] == 2
    assert_same_weights(two["model"], lalr_one_worker["model"], atol=1e-5)
    assert set(two["optimizer"]["state"][0]) == {"step", "momentum_buffer"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lalr_refused_under_zero_partitioning(stage: int, tmp_path) -> None:
    # preflight refuses it for backend=deepspeed (before DeepSpeed is imported or any worker starts its group) ...
    with pytest.raises(ConfigError, match=f"optim.name=lalr with ZeRO stage {stage}"):
        validate_config(load_config(None, ["optim.name=lalr", "backend=deepspeed", f"deepspeed.zero_stage={stage}"]))
    # ... also when the stage comes from a DeepSpeed JSON file; stage 0 and the other backends are fine
    ds = tmp_path / "ds.json"
    ds.write_text(f'{{"zero_optimization": {{"stage": {stage}}}}}')
    with pytest.raises(ConfigError, match=f"optim.name=lalr with ZeRO stage {stage}"):
        validate_config(load_config(None, ["optim.name=lalr", "backend=deepspeed", f"deepspeed.config_file={ds}"]))
    validate_config(load_config(None, ["optim.name=lalr", "backend=deepspeed", "deepspeed.zero_stage=0"]))
    validate_config(load_config(None, ["optim.name=lalr", "backend=torch", f"deepspeed.zero_stage={stage}"]))


def test_lalr_refused_under_zero_partitioning_by_the_cli(tmp_path) -> None:
    """The command line: exit 2 and the one-line reason, nothing written (preflight: DeepSpeed is not imported)."""
    from helpers.runs import describe, run_python

    proc = run_python(["-m", "datkit.train", "optim.name=lalr", "backend=deepspeed", "deepspeed.zero_stage=2",
                       f"train.output_dir={tmp_path / 'x'}"], cwd=tmp_path, timeout=200)
    assert proc.returncode == 2, describe(proc)
    assert "optim.name=lalr with ZeRO stage 2" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_lalr_as_deepspeed_client_optimizer_matches_torch(lalr_one_worker: dict, tmp_path) -> None:
    # ZeRO-0: DeepSpeed steps datkit's LALR on whole tensors, so 2 DeepSpeed workers = 1 torch worker
    pytest.importorskip("deepspeed", reason="needs DeepSpeed (pip install -e '.[deepspeed]'; the dev extra has it)")
    from helpers.ports import reserve_port
    from helpers.runs import REPO, TINY, assert_same_weights, describe, load_checkpoint, run_python

    port = reserve_port()
    tiny = [a for a in TINY if not a.startswith("backend=")]
    proc = run_python(["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
                       str(REPO / "datkit" / "train.py"), "backend=deepspeed", "deepspeed.zero_stage=0", *tiny,
                       *_DIST_STEPS, f"train.output_dir={tmp_path / 'ds'}"], cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, describe(proc)
    assert_same_weights(load_checkpoint(tmp_path / "ds")["model"], lalr_one_worker["model"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_lalr_under_horovod_matches_one_worker(lalr_one_worker: dict, tmp_path) -> None:
    # hvd.DistributedOptimizer subclasses LALR and steps it on the averaged gradients: 2 Horovod workers = 1 worker
    pytest.importorskip("horovod.torch", reason="needs Horovod (launchers/install_horovod.sh)")
    import sys

    from helpers.runs import REPO, TINY, assert_same_weights, describe, load_checkpoint, run_python

    tiny = [a for a in TINY if not a.startswith("backend=")]
    proc = run_python(["-m", "horovod.runner.launch", "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
                       "datkit.train", "backend=horovod", *tiny, *_DIST_STEPS, f"train.output_dir={tmp_path / 'hvd'}"],
                      cwd=tmp_path, timeout=360, PYTHONPATH=str(REPO / "tests"))
    assert proc.returncode == 0, describe(proc)
    assert_same_weights(load_checkpoint(tmp_path / "hvd")["model"], lalr_one_worker["model"], atol=1e-5)
