"""Run under a launcher with M workers (``$DATKIT_TEST_WORLD``, default 2): the Backend collectives do
what the interface says.

The backend is ``$DATKIT_TEST_BACKEND`` (default ``torch``), built by ``create_backend`` like a training
run. Each rank writes ``result<rank>`` into the folder ``argv[1]``: ``ok``, or one line per failed
check (a failure is recorded, not raised, so that the other collectives still run and every rank
reaches the same collectives).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

from datkit.backends import create_backend
from datkit.config import load_config


def read_results(out: Path, world_size: int) -> dict[int, str]:
    """rank -> what that rank wrote into ``out/result<rank>`` (``ok``, its failures, or ``no result file``)."""
    return {r: (out / f"result{r}").read_text() if (out / f"result{r}").exists() else "no result file"
            for r in range(world_size)}


def main(out: Path) -> None:
    cfg = load_config(None, [f"backend={os.environ.get('DATKIT_TEST_BACKEND', 'torch')}", "device=cpu"])
    be = create_backend(cfg)
    r, w = be.rank, be.world_size
    failures: list[str] = []

    def check(name, fn) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 -- every failing check is collected, one line each
            failures.append(f"{name}: {traceback.format_exc(limit=2).strip().splitlines()[-1]}")

    def identity() -> None:
        assert w == int(os.environ.get("DATKIT_TEST_WORLD", "2")), f"world_size {w}"
        assert (be.local_rank, be.local_world_size) == (r, w), (be.local_rank, be.local_world_size)
        assert be.device == torch.device("cpu") and be.is_main == (r == 0)

    ranks = range(w)
    tri = w * (w + 1) // 2  # 1 + 2 + ... + w

    def all_reduce() -> None:
        t = torch.tensor([1.0, 2.0]) * (r + 1)
        assert be.all_reduce(t, op="sum").tolist() == [tri, 2.0 * tri], t
        assert t.tolist() == [tri, 2.0 * tri], "all_reduce is not in place"
        t = torch.tensor([1.0, 2.0]) * (r + 1)
        assert be.all_reduce(t, op="mean").tolist() == [tri / w, 2.0 * tri / w], t
        t = torch.tensor([float(r), 10.0 - r])
        assert be.all_reduce(t, op="max").tolist() == [w - 1.0, 10.0], t
        t = torch.tensor([float(r), 10.0 - r])
        assert be.all_reduce(t, op="min").tolist() == [0.0, 11.0 - w], t
        t = torch.tensor([r + 5], dtype=torch.int64)
        assert be.all_reduce(t, op="sum").tolist() == [tri + 4 * w], t
        t = torch.tensor([0.25, 1.0], dtype=torch.float64) * (r + 1)
        assert be.all_reduce(t, op="sum").tolist() == [0.25 * tri, 1.0 * tri] and t.dtype == torch.float64, t

    def all_gather() -> None:
        g = be.all_gather(torch.full((3, 2), float(r)))
        assert g.shape == (w, 3, 2), g.shape
        assert all(torch.equal(g[i], torch.full((3, 2), float(i))) for i in ranks), g
        g = be.all_gather(torch.tensor([float(r), 5.0]))
        assert g.tolist() == [[float(i), 5.0] for i in ranks], g
        g = be.all_gather(torch.tensor([250 + r, 7], dtype=torch.uint8))  # compressors send bytes
        assert g.dtype == torch.uint8 and g.tolist() == [[250 + i, 7] for i in ranks], g
        g = be.all_gather(torch.tensor(float(r)))
        assert g.tolist() == [float(i) for i in ranks], g
        big = torch.arange(300_000, dtype=torch.float32) + r  # larger than a socket buffer
        g = be.all_gather(big)
        assert all(torch.equal(g[i], big - r + i) for i in ranks), "all_gather of 1.2 MB"

    def all_to_all() -> None:
        # chunk j of dim 0 goes to rank j: rank r receives chunk r of every rank, in rank order
        send = torch.tensor([[10 * r + j, 100 + 10 * r + j] for j in range(w)], dtype=torch.float32)
        recv = be.all_to_all(send)
        assert recv.shape == send.shape, recv.shape
        assert recv.tolist() == [[10 * j + r, 100 + 10 * j + r] for j in range(w)], recv
        send = torch.tensor([[-100 + r, j] for j in range(w)], dtype=torch.int8).repeat_interleave(3, dim=0)
        recv = be.all_to_all(send)
        want = torch.tensor([[-100 + j, r] for j in range(w)], dtype=torch.int8).repeat_interleave(3, dim=0)
        assert recv.dtype == torch.int8 and torch.equal(recv, want), recv
        send = (torch.arange(w * 150_000, dtype=torch.float32) + 1e6 * r).view(w, -1)  # 0.6 MB per block
        recv = be.all_to_all(send)
        want = torch.stack([torch.arange(150_000, dtype=torch.float32) + 150_000 * r + 1e6 * i for i in ranks])
        assert torch.equal(recv, want), "all_to_all of 0.6 MB blocks"

    def broadcast() -> None:
        b = torch.full((4,), float(r + 7))
        assert be.broadcast(b, src=w - 1).tolist() == [6.0 + w] * 4, b
        b = torch.full((4,), float(r + 7))
        assert be.broadcast(b).tolist() == [7.0] * 4, b

    def checkpoint() -> None:  # rank 0 writes, every rank reads it after the barrier
        path = out / "ckpt.pt"
        be.save_checkpoint(str(path), {"rank_that_wrote": torch.tensor(r), "w": torch.arange(3.0)})
        state = be.load_checkpoint(str(path))
        assert int(state["rank_that_wrote"]) == 0 and state["w"].tolist() == [0.0, 1.0, 2.0], state

    for name, fn in [("identity", identity), ("all_reduce", all_reduce), ("all_gather", all_gather),
                     ("all_to_all", all_to_all), ("broadcast", broadcast), ("barrier", be.barrier),
                     ("checkpoint", checkpoint)]:
        check(name, fn)
    (out / f"result{r}").write_text("ok" if not failures else "\n".join(failures))
    (out / f"describe{r}").write_text(json.dumps(be.describe()))
    be.barrier()
    be.close()
    be.close()  # idempotent


if __name__ == "__main__":
    main(Path(sys.argv[1]))
