"""DeepSpeed's checkpoint IO: ZeRO shards in a folder next to datkit's file, and their checks as untrusted input.

``DeepSpeedCheckpointIO`` writes the "deepspeed" format: ``engine.save_checkpoint`` puts the ZeRO shards into
``<path>.deepspeed/<tag>``, then rank 0 writes ``path`` (full weights + run state + the tag) atomically, as every
backend does. A resume reads ``path`` as on every backend (``datkit.checkpoint``), then its shard folder:
``deepspeed_dir``/``deepspeed_tag`` plain names inside ``train.output_dir`` (``deepspeed_folder``), every shard file
pickling only DeepSpeed's allow-listed classes (``check_deepspeed_shards``, ``DEEPSPEED_SHARD_GLOBALS``); DeepSpeed's
own loads of the shards then run with ``weights_only=True`` too (``load_deepspeed_shard``).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from datkit.checkpoint import (
    DEEPSPEED_SHARD_GLOBALS,
    RESUME_KEY,
    CheckpointError,
    is_zip,
    read_untrusted,
    unreadable,
)

from .checkpoint_io import CheckpointIO, resume_error
from .collectives import Collectives


def _fail(key: str, path: str, cause: str) -> CheckpointError:
    return CheckpointError(key, path, cause, f"true ({path})" if key == RESUME_KEY else None)


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and os.sep not in name and (os.altsep is None or os.altsep not in name) and "\x00" not in name
            and not os.path.isabs(name))


def deepspeed_folder(state: dict[str, Any], path: str, key: str = RESUME_KEY) -> tuple[str, str]:
    """(folder, tag) of a DeepSpeed checkpoint's ZeRO shards, checked: ``deepspeed_dir`` and ``deepspeed_tag``
    are plain names (no separator, not '..', not absolute), the folder is inside the checkpoint's own folder
    (``train.output_dir``; symbolic links resolved) and ``folder/tag`` is a directory."""
    name, tag = state.get("deepspeed_dir"), state.get("deepspeed_tag")
    for k, v in (("deepspeed_dir", name), ("deepspeed_tag", tag)):
        if not _plain_name(v):
            raise _fail(key, path, f"refused: its {k} {v!r} is not a plain folder name inside train.output_dir "
                                   "(no path separators, no '..', not absolute)")
    out = os.path.dirname(os.path.abspath(path))
    folder = os.path.join(out, name)
    real_out = os.path.realpath(out)
    if os.path.commonpath([real_out, os.path.realpath(folder)]) != real_out:
        raise _fail(key, path, f"refused: its deepspeed_dir {name!r} leads outside train.output_dir (a symbolic link?)")
    if not os.path.isdir(os.path.join(folder, tag)):
        raise _fail(key, path, f"the DeepSpeed shard folder {name}/{tag} next to it does not exist "
                               "(copied without it?)")
    return folder, tag


def load_deepspeed_shard(path: str, map_location: Any = None, key: str = RESUME_KEY) -> Any:
    """One of DeepSpeed's shard files, unpickled with ``weights_only=True`` and only DEEPSPEED_SHARD_GLOBALS
    allowed (DeepSpeed itself would load it with ``weights_only=False``)."""
    return read_untrusted(path, key, DEEPSPEED_SHARD_GLOBALS, map_location=map_location)


def check_deepspeed_shards(folder: str, tag: str, path: str, key: str = RESUME_KEY) -> list[str]:
    """Every ``.pt`` file of the shard folder ``folder/tag``, checked before DeepSpeed sees the folder: a regular file
    inside ``train.output_dir`` (no symbolic link out of it), readable, and pickling no global outside
    DEEPSPEED_SHARD_GLOBALS (zip files: the pickle is scanned without loading the tensors; others: a
    weights-only load). Returns the files. DeepSpeed's own loads then go through ``load_deepspeed_shard``."""
    shard_dir = os.path.join(folder, tag)
    real_out = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    files = []
    for name in sorted(n for n in os.listdir(shard_dir) if n.endswith(".pt")):  # DeepSpeed loads only *.pt files
        f = os.path.join(shard_dir, name)
        if os.path.commonpath([real_out, os.path.realpath(f)]) != real_out or not os.path.isfile(f):
            raise _fail(key, f, "refused: a DeepSpeed shard must be a regular file inside train.output_dir")
        files.append(f)
        if os.path.getsize(f) == 0 or not is_zip(f):
            load_deepspeed_shard(f, "cpu", key)
            continue
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception as err:  # noqa: BLE001 -- any failure to read the shard is one 'unreadable' line
            raise _fail(key, f, unreadable(f, err)) from None
        refused = sorted(set(found) - set(DEEPSPEED_SHARD_GLOBALS))
        if refused:
            raise _fail(key, f, f"refused: the DeepSpeed shard holds pickled Python objects ({', '.join(refused[:3])}) "
                                "outside datkit's allow-list of DeepSpeed classes "
                                "(datkit.checkpoint.DEEPSPEED_SHARD_GLOBALS)")
    if not files:
        raise _fail(key, path, f"the DeepSpeed shard folder {os.path.basename(folder)}/{tag} is empty")
    return files


class DeepSpeedCheckpointIO(CheckpointIO):
    """The "deepspeed" format (see module docstring). ``engine()``: the DeepSpeed engine once the backend's
    ``setup`` built it; ``deepspeed``: the imported module (``deepspeed.zero.GatheredParameters`` at ZeRO-3)."""

    format = "deepspeed"

    def __init__(self, collectives: Collectives, deepspeed: Any, zero_stage: int, engine: Callable[[], Any]) -> None:
        super().__init__(collectives)
        self.deepspeed, self.zero_stage, self.engine = deepspeed, zero_stage, engine

    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Full weights; at ZeRO-3 the partitioned parameters are gathered first (collective)."""
        if self.zero_stage == 3:
            with self.deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def save_training_state(self, path: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                            run_state: dict[str, Any]) -> None:
        """ZeRO shards via ``engine.save_checkpoint`` into ``<path>.deepspeed/<tag>``, then rank 0 writes
        ``path`` (full weights + run state + the tag) atomically, then older tags are removed."""
        mid = run_state.get("mid_epoch")  # a mid-epoch checkpoint: a tag of its own, the epoch's stays until replaced
        ds_dir, tag = path + ".deepspeed", (f"epoch{run_state['epoch']}" if mid is None else
                                             f"epoch{mid['epoch']}_step{mid['next_step']}")
        self.engine().save_checkpoint(ds_dir, tag=tag)
        state = {**run_state, "model": self.model_state_dict(module), "deepspeed_dir": os.path.basename(ds_dir),
                 "deepspeed_tag": tag, "zero_stage": self.zero_stage}
        self.save_checkpoint(path, state)
        if self.collectives.rank == 0:
            for old in os.listdir(ds_dir):
                if old != tag and old.startswith("epoch") and os.path.isdir(os.path.join(ds_dir, old)):
                    shutil.rmtree(os.path.join(ds_dir, old), ignore_errors=True)

    def load_training_state(self, path: str, backend: str, module: nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The datkit file as on every backend, then its shard folder (module docstring). At ZeRO >= 1 the
        optimizer state is partitioned per worker, so a checkpoint of another worker count is refused (ZeRO-0's
        state is whole: it resumes on any number of workers, like the torch and Horovod backends)."""
        state = self.load_checked(path, backend, module)
        saved_world, world = state.get("world_size"), self.collectives.world_size
        if self.zero_stage >= 1 and isinstance(saved_world, int) and saved_world != world:
            raise resume_error(path, f"written by {saved_world} workers at ZeRO-{self.zero_stage}, "
                                     "whose optimizer state is sharded per worker: resume it with "
                                     f"{saved_world} workers (this run has {world}), or start a new train.output_dir")
        ds_dir, tag = deepspeed_folder(state, path)
        check_deepspeed_shards(ds_dir, tag, path)
        engine = self.engine()
        ckpt_engine = engine.checkpoint_engine
        ckpt_engine.load = lambda f, map_location=None: load_deepspeed_shard(f, map_location)  # this instance only
        try:
            loaded, _ = engine.load_checkpoint(ds_dir, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        except (KeyError, ValueError, TypeError, AssertionError) as err:  # shards that do not fit this engine
            first = str(err).splitlines()[0][:300] if str(err) else ""
            raise resume_error(path, f"DeepSpeed cannot resume from {state['deepspeed_dir']}/{tag}: "
                                     f"{type(err).__name__}: {first}") from None
        finally:
            del ckpt_engine.load  # back to the class's method (used by save_checkpoint's engine too)
        if loaded is None:
            raise resume_error(path, f"DeepSpeed could not load its shards {state['deepspeed_dir']}/{tag}")
        return state
