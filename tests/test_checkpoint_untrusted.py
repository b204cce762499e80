"""Checkpoints as untrusted input: every entry point that loads a file a user names (``datkit.evaluate``,
``datkit.certify``, ``train.init_from``, ``semisup.teacher``, resume on the torch and the deepspeed backend)
answers a pickle payload, a truncated file, a file that is not a datkit checkpoint and a checkpoint of another
model or backend with one line ``datkit: error: <key>=<value>: <cause>``, exit code 2 and no traceback; the
DeepSpeed shard folder must be a plain name inside ``train.output_dir`` and its shards are read weights-only.

One tiny torch run and one tiny in-process DeepSpeed run (ZeRO-1, 1 worker) make the good checkpoints; the bad
ones are made from them. The entry points run in-process (their ``main``); one subprocess shows the CLI's exit
code end to end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from datkit import checkpoint as ckpt
from helpers.runs import TINY, describe, one_thread, run_python

FAST = ["train.max_steps=1", "train.epochs=1", "eval.num_samples=10", "eval.final_num_samples=10"]
SEMI = ["data.num_labeled=100", "semisup.enabled=true"]
CERTIFY = ["smoothing.n0=10", "smoothing.n=20", "smoothing.num_samples=1", "log.progress=false"]


class Payload:
    """Unpickled, it would create the file ``marker`` (what a malicious checkpoint would do instead)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@contextlib.contextmanager
def _same_environ() -> Iterator[None]:
    """The deepspeed backend sets launcher variables (RANK, MASTER_PORT, ...) for a 1-worker run: undo them."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith("backend=")]


def _train(args: list[str]) -> dict:
    from datkit.train import main

    with one_thread(), _same_environ():
        return main([*_tiny(), *FAST, *args])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> file: the good checkpoints (torch, deepspeed) and the bad inputs made from them."""
    d = tmp_path_factory.mktemp("untrusted")
    _train(["backend=torch", f"train.output_dir={d / 'torch'}"])
    good = d / "torch" / "checkpoint_last.pt"
    f: dict[str, Path] = {"torch": good, "marker": d / "payload-ran"}
    torch.save(Payload(str(f["marker"])), d / "payload.pt")
    data = good.read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"foo": torch.zeros(3)}, d / "foreign.pt")
    (d / "text.pt").write_text("hello, not a checkpoint\n")
    state = torch.load(good, weights_only=True)
    from datkit.models import create_model

    state["model"] = create_model("cnn_small", 10, in_channels=1, image_size=8, mean=(0.5,), std=(0.5,),
                                  channels=[4, 8], hidden=32).state_dict()
    torch.save(state, d / "other_model.pt")
    f.update({k: d / f"{k}.pt" for k in ("payload", "truncated", "foreign", "text", "other_model")})
    return f


@pytest.fixture(scope="module")
def ds_files(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A DeepSpeed ZeRO-1 run of 1 worker in this process, resumed once from its own checkpoint (the shards'
    allow-list suffices), and the output folders that break it."""
    pytest.importorskip("deepspeed", reason="needs DeepSpeed (the dev extra has it)")
    d = tmp_path_factory.mktemp("ds")
    args = ["backend=deepspeed", "deepspeed.zero_stage=1", f"train.output_dir={d / 'good'}"]
    _train(args)
    from datkit.backends import deepspeed_checkpoint

    loaded: list[str] = []
    load_shard = deepspeed_checkpoint.load_deepspeed_shard

    def weights_only(f: str, map_location=None):
        loaded.append(os.path.basename(f))
        return load_shard(f, map_location)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deepspeed_checkpoint, "load_deepspeed_shard", weights_only)
        resumed = _train([*args, "train.epochs=2", "train.resume=true"])
    assert resumed["epochs"] == 2
    # DeepSpeed read both of its shard files through datkit's weights-only loader (with the allow-list)
    assert sorted(set(loaded)) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], loaded
    good = d / "good" / "checkpoint_last.pt"
    (d / "ds_only").mkdir()
    shutil.copyfile(good, d / "ds_only" / "checkpoint_last.pt")
    out: dict[str, Path] = {"ds": d / "ds_only" / "checkpoint_last.pt"}

    def variant(name: str, edit: Callable[[dict, Path], None] | None = None) -> None:
        shutil.copytree(d / "good", d / name)
        state = torch.load(good, weights_only=True)
        if edit is not None:
            edit(state, d / name)
        torch.save(state, d / name / "checkpoint_last.pt")
        out[name] = d / name / "checkpoint_last.pt"

    def shard(folder: Path) -> Path:
        return next((folder / "checkpoint_last.pt.deepspeed" / "epoch2").glob("*optim_states.pt"))

    def payload_shard(state: dict, folder: Path) -> None:
        torch.save({"optimizer_state_dict": Payload(str(files["marker"]))}, shard(folder))

    def truncated_shard(state: dict, folder: Path) -> None:
        data = shard(folder).read_bytes()
        shard(folder).write_bytes(data[: len(data) // 2])

    outside = d / "outside"
    shutil.copytree(d / "good" / "checkpoint_last.pt.deepspeed", outside)
    variant("dir_parent", lambda s, _: s.update(deepspeed_dir="../outside"))
    variant("dir_absolute", lambda s, _: s.update(deepspeed_dir=str(outside)))
    variant("ds_other_model", lambda s, _: s.update(model=torch.load(files["other_model"], weights_only=True)["model"]))
    variant("other_world", lambda s, _: s.update(world_size=3))
    variant("payload_shard", payload_shard)
    variant("truncated_shard", truncated_shard)
    return out


def _evaluate(path: Path) -> None:
    from datkit.evaluate import main

    main([f"checkpoint={path}", "attacks=[pgd]", "num_samples=10", "batch_size=10"])


def _certify(path: Path) -> None:
    from datkit.certify.__main__ import main

    main([f"checkpoint={path}", *CERTIFY])


def _init_from(path: Path) -> None:
    _train(["backend=torch", f"train.init_from={path}", f"train.output_dir={path.parent / 'finetune'}"])


def _teacher(path: Path) -> None:
    _train(["backend=torch", *SEMI, f"semisup.teacher={path}", f"train.output_dir={path.parent / 'student'}"])


def _resume_from(path: Path, backend: str) -> Path:
    """The output folder's checkpoint a resumed run reads: a copy of ``path`` in a folder of its own, or ``path``
    itself for the DeepSpeed variants (their shard folder next to it is part of the case)."""
    if path.parent.name.startswith(("dir_", "other_world", "payload_shard", "truncated_shard")):
        return path
    out = path.parent / f"resume_{backend}_{path.stem}"
    out.mkdir()
    shutil.copyfile(path, out / "checkpoint_last.pt")
    return out / "checkpoint_last.pt"


def _resume(backend: str) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        extra = ["deepspeed.zero_stage=1", "train.epochs=3"] if backend == "deepspeed" else ["train.epochs=2"]
        _train([f"backend={backend}", *extra, "train.resume=true", f"train.output_dir={path.parent}"])
    return run


ENTRY: dict[str, tuple[Callable[[Path], None], str]] = {  # entry point -> (call, the key its message names)
    "evaluate": (_evaluate, "checkpoint"),
    "certify": (_certify, "checkpoint"),
    "init_from": (_init_from, "train.init_from"),
    "teacher": (_teacher, "semisup.teacher"),
    "resume-torch": (_resume("torch"), "train.resume"),
    "resume-deepspeed": (_resume("deepspeed"), "train.resume"),
}
SHAPES = "shapes differ (checkpoint vs this run): net.0.weight (4, 1, 4, 4) vs (8, 1, 4, 4)"
CAUSE = {  # case -> what the one line must say
    "payload": "refused: the file holds a pickled Python object (io.open)",
    "truncated": "cannot be loaded: the file is truncated or damaged",
    "foreign": "not a datkit checkpoint (no 'model' and no 'config' entry; its keys: 'foo')",
    "text": "cannot be loaded: not a file written by torch.save",
    "other_model": "a checkpoint of another model: ",
    "ds_other_model": "a checkpoint of another model: its weights do not fit this run's model: " + SHAPES,
    "torch": "a checkpoint of another backend: written by the torch backend, this run uses backend=deepspeed",
    "ds": "a checkpoint of another backend: written by the deepspeed backend, this run uses backend=torch",
    "dir_parent": "refused: its deepspeed_dir '../outside' is not a plain folder name inside train.output_dir",
    "dir_absolute": "refused: its deepspeed_dir '/",
    "other_world": "written by 3 workers at ZeRO-1, whose optimizer state is sharded per worker: resume it with 3 "
                   "workers (this run has 1)",
    "payload_shard": "refused: the DeepSpeed shard holds pickled Python objects (io.open) outside datkit's allow-list",
    "truncated_shard": "cannot be loaded: the file is truncated or damaged",
}
DS_CASES = ("ds", "ds_other_model", "dir_parent", "dir_absolute", "other_world", "payload_shard", "truncated_shard")
FILE_CASES = ["payload", "truncated", "foreign", "text", "other_model"]
TABLE = ([(case, entry) for entry in ENTRY if entry != "resume-deepspeed" for case in FILE_CASES]
         + [("ds", "resume-torch")]
         + [(case, "resume-deepspeed") for case in ("payload", "ds_other_model", "torch", "dir_parent", "dir_absolute",
                                                    "other_world", "payload_shard", "truncated_shard")])


@pytest.mark.parametrize("case,entry", TABLE, ids=[f"{c}-{e}" for c, e in TABLE])
def test_bad_checkpoint_is_one_line_exit_2(case: str, entry: str, files: dict[str, Path],
                                           request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> None:
    call, key = ENTRY[entry]
    if case in DS_CASES or entry == "resume-deepspeed":
        path = {**files, **request.getfixturevalue("ds_files")}[case]
    else:
        path = files[case]
    if entry.startswith("resume-"):
        path = _resume_from(path, entry.split("-")[1])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        call(path)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("datkit: error: ")]
    assert exc.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"datkit: error: {key}="), line
    if case.endswith("_shard"):  # the message names the shard file DeepSpeed would have unpickled
        assert "checkpoint_last.pt.deepspeed/epoch2/" in line and "optim_states.pt" in line, line
    else:
        assert f"={path}:" in line or f"=true ({path}):" in line, line
    assert CAUSE[case] in line, line
    if case == "other_model":
        assert SHAPES in line, line
    assert not files["marker"].exists(), "the pickle payload ran"


def test_cli_exit_code_and_one_line_end_to_end(files: dict[str, Path], tmp_path: Path) -> None:
    proc = run_python(["-m", "datkit.evaluate", f"checkpoint={files['payload']}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert proc.stderr.strip().splitlines() == [
        f"datkit: error: checkpoint={files['payload']}: {CAUSE['payload']}, which loading would construct by running "
        "code; datkit checkpoints hold only tensors and plain values (torch.load(weights_only=True))"], describe(proc)
    assert not files["marker"].exists()


def test_deepspeed_names_must_be_plain(tmp_path: Path) -> None:
    from datkit.backends.deepspeed_checkpoint import deepspeed_folder

    (tmp_path / "ck.pt.deepspeed" / "epoch1").mkdir(parents=True)
    path = str(tmp_path / "ck.pt")
    assert deepspeed_folder({"deepspeed_dir": "ck.pt.deepspeed", "deepspeed_tag": "epoch1"}, path) == (
        str(tmp_path / "ck.pt.deepspeed"), "epoch1")
    for name, tag in (("..", "epoch1"), ("a/b", "epoch1"), ("", "epoch1"), ("ck.pt.deepspeed", "../epoch1"),
                      ("ck.pt.deepspeed", "/etc"), (None, "epoch1"), ("ck.pt.deepspeed", 3)):
        with pytest.raises(ckpt.CheckpointError, match="is not a plain folder name"):
            deepspeed_folder({"deepspeed_dir": name, "deepspeed_tag": tag}, path)
    os.symlink(tmp_path.parent, tmp_path / "link")
    with pytest.raises(ckpt.CheckpointError, match="leads outside train.output_dir"):
        deepspeed_folder({"deepspeed_dir": "link", "deepspeed_tag": "epoch1"}, path)


def test_optimizer_state_must_fit(tmp_path: Path) -> None:
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)  # same parameter count per group, other shapes
    opt_b = torch.optim.Adam(b.parameters())
    b(torch.ones(1, 4)).sum().backward()
    opt_b.step()
    with pytest.raises(ckpt.CheckpointError,
                       match=r"'exp_avg' of parameter 0 has shape \(2, 4\), the parameter \(2, 3\)"):
        ckpt.load_optimizer_state(torch.optim.Adam(a.parameters()), opt_b.state_dict(), "train.resume", "x.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"parameter groups of sizes \[1\], this run's optimizer \[2\]"):
        ckpt.load_optimizer_state(torch.optim.Adam(a.parameters()), torch.optim.Adam([a.bias]).state_dict(),
                                  "train.resume", "x.pt")
