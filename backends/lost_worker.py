"""The peer watch as a part of a backend: start it, turn a lost peer into exit code 3, stop it.

``LostWorkerWatch`` owns the backend's ``peer_watch.PeerWatch`` (heart-beats in a TCPStore; see that module): ``start``
with the store's address (``env_store_address`` for torch.distributed's env:// rendezvous; Horovod hosts its own),
``fault_guard`` around training, ``expect_exit`` when every worker agreed to stop, ``stop`` at the end.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

StoreAddress = tuple[str, int, "int | None"]  # (host, port, rank whose process hosts it -- None: the launcher's agent)


def env_store_address(world_size: int) -> StoreAddress | None:
    """The store of torch.distributed's env:// rendezvous (``MASTER_ADDR``/``MASTER_PORT``; torchrun's agent store,
    or rank 0's); None with one worker or without those variables."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world_size == 1 or not addr or not port:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return addr, int(port), None if agent else 0


class LostWorkerWatch:
    """The lost-worker watch of one backend (see module docstring); does nothing until started."""

    def __init__(self) -> None:
        self.watch: Any = None  # peer_watch.PeerWatch while started
        self.failed = False

    def start(self, where: Callable[[], StoreAddress | None], rank: int, world_size: int, peer_timeout_s: float,
              startup_timeout_s: float) -> None:
        """Collective: start the heart-beats (``dist.peer_timeout_s``; 0 = off, as with one worker) in the store
        ``where()`` names (called only when the watch is on: it may be collective itself)."""
        address = where() if peer_timeout_s > 0 and world_size > 1 else None
        if address is None:
            return
        from .elastic_group import restart_attempt
        from .peer_watch import PeerWatch, next_generation, store_client

        host, port, host_rank = address
        prefix = f"datkit/watch/{restart_attempt()}/{next_generation()}"
        self.watch = PeerWatch(lambda: store_client(host, port, prefix, max(peer_timeout_s, 5.0)), (host, port),
                               rank, world_size, peer_timeout_s, startup_timeout_s, host_rank)
        self.watch.install_sigterm_handler()

    @contextlib.contextmanager
    def fault_guard(self) -> Iterator[None]:
        """Around training: an exception that comes from a lost peer becomes the lost-worker message and
        exit code 3 (``peer_watch``); any other exception propagates."""
        try:
            yield
        except Exception as err:
            self.failed = True
            if self.watch is not None:
                self.watch.handle_failure(err, max_wait_s=5.0)
            raise
        self.stop()  # a clean finish

    def expect_exit(self) -> None:
        """Every worker agreed to stop: a peer that exits, or a launcher store that goes away, is no lost worker."""
        if self.watch is not None:
            self.watch.expect_exit()

    def stop(self) -> None:
        """Stop the heart-beats; after a clean run the peers are told this exit is not a loss."""
        if self.watch is not None:
            self.watch.stop(clean=not self.failed)
            self.watch = None
