"""Checkpoint files: atomic writes (temp file + fsync + rename), and every load of a file a user names.

Loads (the second half of this file) treat checkpoints as untrusted input, in one place for every entry point
(``datkit.evaluate``/``datkit.certify`` ``checkpoint=``, ``train.init_from``, ``semisup.teacher``, resume on every
backend): ``torch.load(weights_only=True)`` only; then "is a datkit checkpoint (of this kind, with these keys)" and
"fits this model" (tensor names and shapes). What depends on the backend -- "of this backend's format", and for
DeepSpeed a plain shard-folder name inside ``train.output_dir`` and shards that unpickle only the classes of
``DEEPSPEED_SHARD_GLOBALS`` -- is the backend's checkpoint IO (``datkit.backends.checkpoint_io``,
``datkit.backends.deepspeed_checkpoint``), built on ``read_untrusted`` here. Every failure is a ``CheckpointError`` (a
``ConfigError``: one line ``<key>=<path>: <cause>``, exit code 2, no traceback).

A job killed during a write leaves the previous checkpoint intact: the new file only replaces it
with ``os.replace`` once it is completely on disk (the rename is atomic within one file system, hence
the temp file in the same folder; the folder is fsynced after the rename so the new name is durable).
A killed write can leave a ``.tmp-*.pt`` file behind; the next successful save of the same checkpoint
removes such leftovers.

TEST-ONLY: ``DATKIT_TEST_CHECKPOINT_WRITE_DELAY_S=X`` sleeps ``X`` seconds between the fsynced temp file
and the rename (after printing ``datkit-test: checkpoint temp file written``), so that a test can kill
the job inside the write window.
"""
from __future__ import annotations

import glob
import importlib
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from datkit.config.errors import ConfigError


def atomic_save(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        delay = float(os.environ.get("DATKIT_TEST_CHECKPOINT_WRITE_DELAY_S", "0") or 0)
        if delay > 0:  # test-only: widen the write window
            print(f"datkit-test: checkpoint temp file written ({tmp}); renaming in {delay} s", file=sys.stderr,
                  flush=True)
            time.sleep(delay)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for stale in glob.glob(os.path.join(folder, ".tmp-*.pt")):  # left by a write that was killed
        if stale != tmp:
            try:
                if time.time() - os.path.getmtime(stale) > 1.0:
                    os.unlink(stale)
            except OSError:
                pass


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint_file(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs on load)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


# --- checkpoints as untrusted input ---------------------------------------------------------------
# Every file a user names as a checkpoint (datkit.evaluate / datkit.certify checkpoint=, train.init_from,
# semisup.teacher, a resumed run's checkpoint_last.pt and its DeepSpeed shards) is read through the
# functions below: nothing is unpickled except tensors, plain containers and numbers (weights_only=True),
# plus, for DeepSpeed's own shard files only, the few DeepSpeed classes of DEEPSPEED_SHARD_GLOBALS. Any
# problem is a CheckpointError (a ConfigError: the entry points print one line and exit with code 2).

RESUME_KEY = "train.resume"

# What DeepSpeed 0.19.8 pickles into its shard files besides tensors and plain values (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0..3 checkpoints): the optimizer shards
# (zero_pp_rank_*_optim_states.pt) hold the loss scaler object, ZeRO's stage enum and, at ZeRO-1/2, a
# dataclass of (numel, start) per parameter. The model shards (mp_rank_*_model_states.pt) need none.
DEEPSPEED_SHARD_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # plain attributes: cur_scale, dynamic
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs; plain numbers and a torch.dtype
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an int Enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints
)


class CheckpointError(ConfigError):
    """A file named as a checkpoint cannot be used; the message is ``<key>=<value>: <cause>``, one line."""

    def __init__(self, key: str, path: str, cause: str, shown: str | None = None) -> None:
        self.key, self.path, self.cause = key, path, cause
        value = shown if shown is not None else path
        super().__init__(" ".join(f"{key}={value}: {cause}".split()))


def _shown(key: str, path: str) -> str | None:
    """How the value is shown in a message: a resumed run names ``train.resume=true`` and the file it found."""
    return f"true ({path})" if key == RESUME_KEY else None


def _fail(key: str, path: str, cause: str) -> CheckpointError:
    return CheckpointError(key, path, cause, _shown(key, path))


def is_zip(path: str) -> bool:
    """True when ``path`` starts like a zip file (``torch.save``'s format)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def read_untrusted(path: str, key: str, allowed_globals: Sequence[str] = (),
                   map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (the classes named in ``allowed_globals`` allowed too); every
    failure becomes a one-line ``CheckpointError`` naming ``key`` and ``path``: no such file, empty, a pickled
    Python object (refused: it would run code), truncated or damaged, not written by ``torch.save``."""
    if not os.path.exists(path):
        raise _fail(key, path, "no such checkpoint file (does not exist)")
    if not os.path.isfile(path):
        raise _fail(key, path, "is not a file (a datkit checkpoint is one file, e.g. checkpoint_last.pt)")
    if os.path.getsize(path) == 0:
        raise _fail(key, path, "the file is empty (a checkpoint whose write did not finish?)")
    safe = [_import_global(name) for name in allowed_globals]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise _fail(key, path, f"refused: the file holds a pickled Python object ({found.group(1)}), which "
                                   "loading would construct by running code; datkit checkpoints hold only tensors and "
                                   "plain values (torch.load(weights_only=True))") from None
        raise _fail(key, path, unreadable(path, err)) from None
    except Exception as err:  # noqa: BLE001 -- zip / pickle stream errors: RuntimeError, OSError, EOFError, KeyError, ...
        raise _fail(key, path, unreadable(path, err)) from None


def unreadable(path: str, err: BaseException) -> str:
    """Why the file at ``path`` could not be loaded (``err``), in words: damaged, or not written by ``torch.save``."""
    first = (str(err).strip().splitlines() or [""])[0][:160]
    detail = f"{type(err).__name__}{': ' + first if first else ''}"
    if is_zip(path):
        return f"cannot be loaded: the file is truncated or damaged ({detail})"
    return f"cannot be loaded: not a file written by torch.save, so not a datkit checkpoint ({detail})"


def _import_global(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def load_datkit_checkpoint(path: str, key: str, training: bool = False) -> dict[str, Any]:
    """The datkit checkpoint at ``path`` (``read_untrusted``), checked to be one: a dict with ``model`` (a
    state dict: names -> tensors) and ``config`` (the run's YAML, a mapping); with ``training``, also what a
    resumed run restores (``epoch``, ``records``, ``scheduler``, and ``optimizer`` or a DeepSpeed folder).
    A ``CheckpointError`` names ``key``, ``path`` and what is missing or wrong."""
    state = read_untrusted(path, key)
    if not isinstance(state, dict):
        raise _fail(key, path, f"not a datkit checkpoint (it holds a {type(state).__name__}, not a dict with "
                               "'model' and 'config')")
    missing = [k for k in ("model", "config") if k not in state]
    if missing:
        have = ", ".join(repr(k) for k in list(state)[:6]) or "none"
        raise _fail(key, path, f"not a datkit checkpoint (no {' and no '.join(map(repr, missing))} entry; its keys: "
                               f"{have})")
    model = state["model"]
    if not isinstance(model, dict) or not model or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in model.items()):
        raise _fail(key, path, "not a datkit checkpoint ('model' is not a state dict of named tensors)")
    if not isinstance(state["config"], str) or not isinstance(_yaml(state["config"]), dict):
        raise _fail(key, path, "not a datkit checkpoint ('config' is not the run's configuration as YAML)")
    if training:
        _check_training_entries(state, key, path)
    return state


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def _check_training_entries(state: dict[str, Any], key: str, path: str) -> None:
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise _fail(key, path, f"not a training checkpoint: 'epoch' is {epoch!r}, not an epoch number")
    records = state.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise _fail(key, path, "not a training checkpoint: 'records' (the per-epoch results) is missing or not a list")
    if not isinstance(state.get("scheduler"), dict):
        raise _fail(key, path, "not a training checkpoint: 'scheduler' (the learning-rate schedule's state) is missing")
    compression = state.get("compression")
    if compression is not None and not isinstance(compression, dict):
        raise _fail(key, path, "not a training checkpoint: 'compression' is not the compressors' state")


def state_dict_mismatch(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                        skip: Sequence[str] = ()) -> str | None:
    """None when ``saved`` has exactly the tensor names and shapes of ``own`` (names in ``skip`` aside), else
    one line naming the first tensors that differ."""
    wrong = [f"{k} {_shape(saved[k])} vs {_shape(own[k])}" for k in own
             if k in saved and k not in skip and _shape(saved[k]) != _shape(own[k])]
    missing = [k for k in own if k not in saved and k not in skip]
    unexpected = [k for k in saved if k not in own and k not in skip]
    if not (wrong or missing or unexpected):
        return None
    return "; ".join(filter(None, [
        f"shapes differ (checkpoint vs this run): {', '.join(wrong[:4])}" if wrong else "",
        f"not in the checkpoint: {', '.join(missing[:4])}" if missing else "",
        f"only in the checkpoint: {', '.join(unexpected[:4])}" if unexpected else ""]))


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))  # a ZeRO-3 partitioned parameter keeps its full shape in ds_shape


def check_model_fits(saved: dict[str, torch.Tensor], model: torch.nn.Module, key: str, path: str,
                     what: str = "this run's model") -> None:
    """``CheckpointError`` unless the checkpoint's weights have the names and shapes of ``model``'s;
    ``what`` describes the model it must fit (e.g. "model 'cnn_small' (kwargs {...})")."""
    details = state_dict_mismatch(saved, model.state_dict(keep_vars=True))
    if details:
        raise _fail(key, path, f"a checkpoint of another model: its weights do not fit {what}: {details}")


_PER_PARAMETER = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # same shape as their parameter


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, key: str, path: str) -> None:
    """``optimizer.load_state_dict(saved)``, checked first: the same parameter groups and sizes, and the
    per-parameter buffers of the known optimizers (Adam's moments, momentum) shaped like their parameters."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        raise _fail(key, path, "not a training checkpoint: 'optimizer' is not an optimizer's state_dict")
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in optimizer.param_groups]:
        raise _fail(key, path, f"its optimizer state has parameter groups of sizes {sizes}, this run's optimizer "
                               f"{[len(g['params']) for g in optimizer.param_groups]} (another model or optimizer)")
    index = {pid: p for g, own in zip(groups, optimizer.param_groups) for pid, p in zip(g["params"], own["params"])}
    for pid, entry in saved["state"].items():
        p = index.get(pid)
        for name, v in (entry.items() if isinstance(entry, dict) else []):
            if p is not None and name in _PER_PARAMETER and isinstance(v, torch.Tensor) and v.shape != p.shape:
                raise _fail(key, path, f"its optimizer state '{name}' of parameter {pid} has shape {tuple(v.shape)}, "
                                       f"the parameter {tuple(p.shape)} (another model)")
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise _fail(key, path, f"its optimizer state does not fit this run's optimizer ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
