"""The Compressor interface and the sharded parameter-server exchange every compressor runs on.

Gradient compression as in the DAT paper (Table 4: 32 -> 16 -> 8 bits, "8-bit 2-sided") and in
1-bit Adam / EF-SignSGD (sign + scale with error feedback). A narrow payload is never summed in its
narrow type: with M workers, a flat gradient ``g`` of n elements is padded and cut into M chunks;

1. worker i compresses chunk j and sends it to worker j (``all_to_all``: (M-1)/M of the payload);
2. worker j decompresses the M versions of its chunk and averages them in float32, in rank order;
3. worker j sends the average back to everyone (``all_gather``: (M-1)/M again), re-compressed when the
   compressor is two-sided, in float32 otherwise.

Error feedback (``worker_feedback`` / ``server_feedback``) keeps, per bucket, what compression dropped
(``e <- v - decompress(compress(v))``) and adds it to the next step's value, on the worker side
(before step 1) and on the server side (before the re-compression in step 3).

Compressors depend only on the small ``Collectives`` protocol; every backend provides it.
"""
from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

Payload = tuple[torch.Tensor, ...]


@runtime_checkable
class Collectives(Protocol):
    """What a compressor needs from a backend (``datkit.backends.Backend`` satisfies it).

    ``all_reduce(t, op)`` in place, ``all_gather(t)`` -> ``(world_size, *t.shape)``, ``all_to_all(t)``:
    row block j of dim 0 goes to rank j (and row block i of the result came from rank i).
    """

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor: ...


def _to_bytes(t: torch.Tensor) -> torch.Tensor:
    """View a (R, c) tensor of any dtype as (R, c * itemsize) uint8: every backend can move bytes."""
    return t.contiguous().view(torch.uint8)


def _from_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.contiguous().view(dtype)


class Compressor(ABC):
    """Reduces (averages) a flat float32 gradient across workers with a compressed payload.

    Subclasses define ``compress(rows) -> payload`` and ``decompress(payload) -> rows`` on a 2-D float32
    tensor (one row per destination) and the class flags ``two_sided``, ``worker_feedback``,
    ``server_feedback`` and ``align`` (elements per scale block; chunks are padded to a multiple of it).
    """

    name: str = "base"
    two_sided: bool = True
    worker_feedback: bool = False
    server_feedback: bool = False
    align: int = 1
    options: Sequence[str] = ()  # option names a user may set (besides ``seed``), for error messages

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.residuals: dict[str, dict[str, torch.Tensor]] = {"worker": {}, "server": {}}
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        self._rank = 0
        self._lock = threading.Lock()

    # --- the codec ---------------------------------------------------------------------------------
    @abstractmethod
    def compress(self, rows: torch.Tensor) -> Payload:
        """Encode a (R, c) float32 tensor; every payload tensor has R rows."""

    @abstractmethod
    def decompress(self, payload: Payload) -> torch.Tensor:
        """Decode a payload back to a (R, c) float32 tensor."""

    def encode(self, rows: torch.Tensor, keep_error: bool) -> tuple[Payload, torch.Tensor | None]:
        """``compress(rows)`` and, when ``keep_error``, what it dropped: ``rows - decompress(payload)``.

        A subclass may fuse the two (one pass instead of a full decode) and may overwrite ``rows`` with the
        error; the result must equal this default exactly."""
        payload = self.compress(rows)
        return payload, (rows - self.decompress(payload) if keep_error else None)

    def decode_sum(self, payload: Payload) -> torch.Tensor:
        """Sum over the payload's rows of their decoded values, in row (= rank) order: ``(R, c) -> (c,)`` float32.
        A subclass may fuse decoding and summing; the result must equal this default exactly."""
        decoded = self.decompress(payload)
        agg = decoded[0].clone()
        for i in range(1, decoded.shape[0]):
            agg += decoded[i]
        return agg

    # --- the exchange ------------------------------------------------------------------------------
    def reduce_mean(self, flat: torch.Tensor, coll: Collectives, key: str = "0") -> torch.Tensor:
        """Mean of ``flat`` (1-D float32, same length on every worker) over all workers.

        ``key`` names the bucket, so that error-feedback residuals follow the right gradients.
        With one worker this is a no-op and returns ``flat`` itself.
        """
        m = coll.world_size
        if m == 1:
            return flat
        with self._lock:
            return self._reduce(flat, coll, key)

    def _reduce(self, flat: torch.Tensor, coll: Collectives, key: str) -> torch.Tensor:
        m, n = coll.world_size, flat.numel()
        self._rank = coll.rank
        chunk = math.ceil(n / (m * self.align)) * self.align
        padded = torch.zeros(m * chunk, dtype=torch.float32, device=flat.device)
        padded[:n] = flat.reshape(-1)
        rows = padded.view(m, chunk)
        # elements of this rank's chunk that are real gradient (the rest is padding, kept at 0)
        mine = min(chunk, max(0, n - coll.rank * chunk))

        # 1. worker: (error feedback +) compress, one row per destination, send with all_to_all
        if self.worker_feedback:
            rows.add_(self._residual("worker", key, rows))
        payload, error = self.encode(rows, keep_error=self.worker_feedback)
        if error is not None:
            error.view(-1)[n:] = 0.0
            self.residuals["worker"][key] = error
        received = self._exchange(payload, coll.all_to_all)

        # 2. server (this rank owns chunk `rank`): average the M decoded versions in float32, rank order
        agg = self.decode_sum(received)
        agg /= m
        agg[mine:] = 0.0

        # 3. back to every worker: re-compressed (two-sided) or float32 (one-sided), all_gather
        if self.two_sided:
            one = agg.unsqueeze(0)
            if self.server_feedback:
                one = one.add_(self._residual("server", key, one))
            back, error = self.encode(one, keep_error=self.server_feedback)
            if error is not None:
                error[:, mine:] = 0.0
                self.residuals["server"][key] = error
            gathered = self._exchange(back, coll.all_gather, squeeze=True)
            out = self.decompress(gathered)
        else:
            out = coll.all_gather(agg)
        return out.reshape(-1)[:n].reshape(flat.shape)

    @staticmethod
    def _exchange(payload: Payload, op, squeeze: bool = False) -> Payload:
        """Send the payload with ONE ``op`` (all_to_all or all_gather) per phase: its tensors' bytes side by side
        in one (R, total bytes) uint8 tensor (codes and scales in one message), viewed back after."""
        views = [_to_bytes(t) for t in payload]  # (R, bytes_i) each
        packed = views[0] if len(views) == 1 else torch.cat(views, dim=1)
        got = op(packed[0] if squeeze else packed)
        got = got.reshape(got.shape[0], -1)
        out, start = [], 0
        for t, v in zip(payload, views):
            out.append(_from_bytes(got[:, start:start + v.shape[1]], t.dtype))
            start += v.shape[1]
        return tuple(out)

    def _residual(self, side: str, key: str, like: torch.Tensor) -> torch.Tensor:
        r = self.residuals[side].get(key)
        if r is None or r.shape != like.shape:
            r = torch.zeros_like(like)
        return r

    def generator(self, device: torch.device) -> torch.Generator:
        """The stochastic-rounding generator of this worker: seeded from (seed, rank), or a restored state."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self._pending_generator_state is not None:
                self._generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
            else:
                self._generator.manual_seed(self.seed * 1_000_003 + self._rank)
        return self._generator

    # --- state (error-feedback residuals, rounding generator) -------------------------------------
    def local_state(self) -> dict[str, Any]:
        """This worker's state: residuals per side and bucket, and the generator state."""
        return {"worker": dict(self.residuals["worker"]), "server": dict(self.residuals["server"]),
                "generator": None if self._generator is None else self._generator.get_state()}

    def load_local_state(self, state: dict[str, Any]) -> None:
        """Restore what ``local_state`` returned."""
        self.residuals = {"worker": dict(state.get("worker", {})), "server": dict(state.get("server", {}))}
        self._generator, self._pending_generator_state = None, state.get("generator")

    def reset(self) -> None:
        """Back to the state of a fresh compressor (no residuals, the rounding generator re-seeded): a new run on
        the same backend (the semi-supervised teacher, then the student) starts like a separate job."""
        self.residuals = {"worker": {}, "server": {}}
        self._generator, self._pending_generator_state = None, None

    def describe(self) -> str:
        """One line for logs and tables, e.g. ``int8 (two-sided, nearest, block 256)``."""
        return self.name
