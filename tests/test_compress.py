"""datkit.compress on one process: codecs, registry, options, byte model, buckets, configuration.

The exchange itself (2 and 3 real workers) is tested in ``test_compress_dist.py``.
"""
from __future__ import annotations

import pytest
import torch

from datkit.compress import (
    COMPRESSORS,
    ByteCounter,
    CountingCollectives,
    GradientBuckets,
    allreduce_bytes,
    compressor_from_config,
    get_compressor,
)
from datkit.compress.onebit import pack_signs, unpack_signs
from datkit.config import ConfigError, load_config
from datkit.preflight import validate_config


class OneWorker:
    """The Collectives protocol for a single process (what every backend does at world size 1)."""

    rank, world_size = 0, 1

    def all_reduce(self, t, op="sum"):
        return t

    def all_gather(self, t):
        return t.unsqueeze(0)

    def all_to_all(self, t):
        return t


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_every_compressor_is_a_no_op_with_one_worker(name: str) -> None:
    g = torch.randn(1000)
    counter = ByteCounter()
    out = get_compressor(name).reduce_mean(g, CountingCollectives(OneWorker(), counter))
    assert out is g
    assert counter.reset() == 0.0


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_every_codec_round_trips_within_its_resolution(name: str) -> None:
    comp = get_compressor(name)
    rows = torch.randn(3, 2048)
    payload = comp.compress(rows)
    assert all(t.shape[0] == 3 for t in payload), "every payload tensor has one row per destination"
    back = comp.decompress(payload)
    assert back.shape == rows.shape and back.dtype == torch.float32
    rel = ((back - rows).norm() / rows.norm()).item()
    limit = {"none": 0.0, "fp16": 1e-3, "bf16": 5e-3, "int8": 0.02, "onebit": 0.7}[name]
    assert rel <= limit, f"{name}: relative round-trip error {rel:.3g} > {limit}"


class TwoEchoWorkers:
    """Collectives of 2 workers that hold the same data: a real exchange's shapes on one process."""

    rank, world_size = 0, 2

    def all_reduce(self, t, op="sum"):
        return t * 2 if op == "sum" else t

    def all_gather(self, t):
        return torch.stack([t, t])

    def all_to_all(self, t):
        return t


STATEFUL = [("onebit", {}), ("onebit", {"block_size": 64}), ("int8", {"rounding": "stochastic", "two_sided": True}),
            ("int8", {"rounding": "stochastic"})]


@pytest.mark.parametrize("name, opts", [*STATEFUL, ("int8", {}), ("fp16", {}), ("bf16", {}), ("none", {})],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "-")
def test_every_compressor_has_state_that_round_trips(name: str, opts: dict, tmp_path) -> None:
    """After a few exchanges, the state (error-feedback residuals per side and bucket, the rounding generator)
    goes through a checkpoint file into a NEW compressor: the same values, and the same next outputs bit for bit;
    for the stateful ones the state matters (a fresh compressor's next output differs)."""
    torch.manual_seed(0)
    grads = [{k: torch.randn(n) for k, n in (("b0", 1000), ("b1", 333))} for _ in range(4)]
    coll = TwoEchoWorkers()
    comp = get_compressor(name, seed=7, **opts)
    for step in grads[:3]:
        for key, g in step.items():
            comp.reduce_mean(g.clone(), coll, key)
    state = comp.local_state()
    assert set(state) == {"worker", "server", "generator"}
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    other = get_compressor(name, seed=7, **opts)
    other.load_local_state(loaded)
    # by value: every residual of every side and bucket, and the generator's state
    for side in ("worker", "server"):
        assert sorted(other.residuals[side]) == sorted(comp.residuals[side]), side
        for key, r in comp.residuals[side].items():
            assert torch.equal(other.residuals[side][key], r), f"{side} residual {key}"
    if (name, opts) in STATEFUL:
        assert any(r.abs().sum() > 0 for side in ("worker", "server") for r in comp.residuals[side].values()) or \
            state["generator"] is not None, "nothing to round-trip"
    # ... and by behaviour: the next exchange is the same, bit for bit
    fresh = get_compressor(name, seed=7, **opts)
    for key, g in grads[3].items():
        a, b = comp.reduce_mean(g.clone(), coll, key), other.reduce_mean(g.clone(), coll, key)
        assert torch.equal(a, b), f"{name} {opts}: bucket {key} differs after the round trip"
        if (name, opts) in STATEFUL:
            assert not torch.equal(a, fresh.reduce_mean(g.clone(), coll, key)), "the state made no difference"


def test_unknown_compressor_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="known: bf16, fp16, int8, none, onebit"):
        get_compressor("int4")


@pytest.mark.parametrize("name, option", [("fp16", {"two_sided": True}), ("bf16", {"rounding": "stochastic"}),
                                          ("none", {"block_size": 64}), ("onebit", {"two_sided": True}),
                                          ("int8", {"error_feedback": False})])
def test_options_that_do_not_apply_are_refused(name: str, option: dict) -> None:
    with pytest.raises(ValueError, match=f"do not apply to compressor '{name}'"):
        get_compressor(name, **option)


@pytest.mark.parametrize("name, option, match", [("int8", {"rounding": "up"}, "nearest, stochastic"),
                                                 ("int8", {"block_size": 0}, "positive integer"),
                                                 ("onebit", {"block_size": 12}, "multiple of 8")])
def test_bad_option_values_are_refused(name: str, option: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_compressor(name, **option)


def test_sign_bits_pack_eight_per_byte_and_unpack() -> None:
    x = torch.randn(2, 64)
    x[0, :3] = 0.0  # zero counts as +1
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 8)
    expect = torch.where(x >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed), expect)


def test_int8_scale_is_max_over_127_and_codes_use_the_full_range() -> None:
    comp = get_compressor("int8", block_size=4)
    rows = torch.tensor([[1.0, -2.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0]])
    codes, scale = comp.compress(rows)
    assert codes.dtype == torch.int8
    assert torch.allclose(scale, torch.tensor([[4.0 / 127, 0.0]]))
    assert codes[0, 3].item() == 127 and codes[0, 4:].abs().sum().item() == 0
    assert torch.allclose(comp.decompress((codes, scale)), rows, atol=4.0 / 127 / 2)


def test_byte_model_of_the_collectives() -> None:
    class Two(OneWorker):
        world_size = 2

    counter = ByteCounter()
    coll = CountingCollectives(Two(), counter)
    t = torch.zeros(1000)
    coll.all_reduce(t)
    assert counter.reset() == allreduce_bytes(4000, 2) == 4000  # 2 (M-1)/M b
    coll.all_to_all(torch.zeros(2, 500))
    assert counter.reset() == 2000  # (M-1)/M b
    coll.all_gather(torch.zeros(500))
    assert counter.reset() == 2000  # (M-1) b


def test_buckets_group_last_layers_first_under_the_cap() -> None:
    params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(4)]  # 256 KiB each
    buckets = GradientBuckets(params, cap_mb=0.6)
    assert buckets.buckets == [[3, 2], [1, 0]]
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad = None
    seen = []
    buckets.reduce(lambda flat, key: (seen.append((key, flat.numel())), flat * 2)[1])
    assert seen == [("3,2", 2 * 65536), ("1,0", 2 * 65536)]
    assert torch.equal(params[1].grad, torch.full_like(params[1], 2.0))
    assert torch.equal(params[0].grad, torch.zeros_like(params[0])), "a missing gradient counts as zero"


# --- configuration -------------------------------------------------------------------------------

def _err(*overrides: str) -> str:
    cfg = load_config(None, list(overrides))
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    return str(exc.value)


def test_config_unknown_compressor_names_key_and_choices() -> None:
    msg = _err("compression.name=int4")
    assert "compression.name" in msg and "onebit" in msg and "int8" in msg


@pytest.mark.parametrize("overrides, words", [
    (["compression.name=fp16", "compression.two_sided=true"], ["two_sided", "fp16"]),
    (["compression.name=onebit", "compression.rounding=stochastic"], ["rounding", "onebit"]),
    (["compression.name=int8", "compression.error_feedback=false"], ["error_feedback", "int8"]),
    (["compression.two_sided=true"], ["two_sided", "none"]),
    (["compression.name=int8", "compression.rounding=up"], ["rounding", "stochastic"]),
])
def test_config_options_that_do_not_apply_fail_at_start_up(overrides: list[str], words: list[str]) -> None:
    msg = _err(*overrides)
    assert all(w in msg for w in words), msg


def test_config_builds_the_compressor_with_its_options() -> None:
    cfg = load_config(None, ["compression.name=int8", "compression.two_sided=true", "compression.rounding=stochastic",
                             "compression.block_size=128"])
    validate_config(cfg)
    comp = compressor_from_config(cfg.compression, seed=5)
    assert ((comp.name, comp.two_sided, comp.rounding, comp.block_size, comp.seed)
            == ("int8", True, "stochastic", 128, 5))
    assert compressor_from_config(load_config(None, []).compression) is None
