"""Run under a launcher with 2 workers: the Backend collectives do what the interface says.

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


def main(out: Path) -> None:
    cfg = load_config(None, [f"backend={os.environ.get('DATKIT_TEST_BACKEND', 'torch')}", "device=cpu"])
    be = create_backend(cfg)
    r, w = be.rank, be.world_size
    failures: list[str] = []

    def check(name, fn) -> None:
        try:
            fn()
        except Exception:
            failures.append(f"{name}: {traceback.format_exc(limit=2).strip().splitlines()[-1]}")

    def identity() -> None:
        assert w == 2, f"world_size {w}"
        assert (be.local_rank, be.local_world_size) == (r, 2), (be.local_rank, be.local_world_size)
        assert be.device == torch.device("cpu") and be.is_main == (r == 0)

    def all_reduce() -> None:
        t = torch.tensor([1.0, 2.0]) * (r + 1)
        assert be.all_reduce(t, op="sum").tolist() == [3.0, 6.0], t
        assert t.tolist() == [3.0, 6.0], "all_reduce is not in place"
        t = torch.tensor([1.0, 2.0]) * (r + 1)
        assert be.all_reduce(t, op="mean").tolist() == [1.5, 3.0], t
        t = torch.tensor([float(r), 10.0 - r])
        assert be.all_reduce(t, op="max").tolist() == [1.0, 10.0], t
        t = torch.tensor([float(r), 10.0 - r])
        assert be.all_reduce(t, op="min").tolist() == [0.0, 9.0], t
        t = torch.tensor([r + 5], dtype=torch.int64)
        assert be.all_reduce(t, op="sum").tolist() == [11], t
        t = torch.tensor([0.25, 1.0], dtype=torch.float64) * (r + 1)
        assert be.all_reduce(t, op="sum").tolist() == [0.75, 3.0] and t.dtype == torch.float64, t

    def all_gather() -> None:
        g = be.all_gather(torch.full((3, 2), float(r)))
        assert g.shape == (w, 3, 2), g.shape
        assert torch.equal(g[0], torch.zeros(3, 2)) and torch.equal(g[1], torch.ones(3, 2)), g
        g = be.all_gather(torch.tensor([float(r), 5.0]))
        assert g.tolist() == [[0.0, 5.0], [1.0, 5.0]], g
        g = be.all_gather(torch.tensor([250 + r, 7], dtype=torch.uint8))  # compressors send bytes
        assert g.dtype == torch.uint8 and g.tolist() == [[250, 7], [251, 7]], g
        g = be.all_gather(torch.tensor(float(r)))
        assert g.tolist() == [0.0, 1.0], g

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

    def broadcast() -> None:
        b = torch.full((4,), float(r + 7))
        assert be.broadcast(b, src=1).tolist() == [8.0] * 4, b
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
