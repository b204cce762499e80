"""Your own model and data (``examples/own_model_and_data.py``): trained by import path under torchrun, horovodrun and
the deepspeed launcher (switched by the one key ``backend``), and through ``datkit.fit``, with datkit's tree unchanged;
``datkit.fit`` ends with the command line's weights; every bad plug-in stops with exit code 2 and one line naming
the key, before any worker trains, without a traceback from a worker.

Launches: torchrun x 2 (command line, ``datkit.fit``), horovodrun x 1, deepspeed x 1, each a good run; the bad
plug-ins run in one process (``datkit.train.main`` per case, as the command line calls it) and once under each
launcher.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.ports import reserve_port
from helpers.runs import REPO, describe, load_checkpoint, run_python

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLE = "examples.own_model_and_data"
ARGS = [f"model.name={EXAMPLE}:make_model", f"data.name={EXAMPLE}:make_data", "device=cpu", "method.name=pgd",
        "attack.steps=2", "train.batch_size=32", "train.epochs=2", "train.max_steps=4", "train.seed=1",
        "eval.num_samples=64", "eval.final_num_samples=128", "eval.batch_size=64", "eval.pgd_steps=2",
        "eval.aa_samples=64",  # AA sharded over the workers under every launcher, on a few images
        "log.progress=false", "log.tensorboard=false", "log.plot=false"]
ENV = {"PYTHONPATH": str(REPO / "tests")}  # helpers.bad_plugins; the example is found from the working directory


def _tree_state() -> str:
    """Modified and untracked files of the repository (git status), ignored build outputs excluded."""
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


def torchrun(args: list[str], *, script: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    target = [script] if script else ["-m", "datkit.train"]
    return run_python(["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{reserve_port()}", *target, *args], cwd=REPO, timeout=timeout, **ENV)


def horovodrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run_python(["-m", "horovod.runner.launch", "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
                       "datkit.train", *args], cwd=REPO, timeout=timeout, **ENV)


def deepspeed(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return run_python(["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(reserve_port()),
                       str(REPO / "datkit" / "train.py"), *args], cwd=REPO, timeout=timeout, **ENV)


def _horovod_usable() -> bool:
    proc = run_python(["-c", "import horovod.torch"], cwd=REPO, timeout=120)
    return proc.returncode == 0


def _final(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["final"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example trained four ways; each output folder, and the repository's git status before and after."""
    tmp = tmp_path_factory.mktemp("examples")
    before = _tree_state()
    outs = {}
    launches = {
        "torchrun": lambda out: torchrun([*ARGS, "backend=auto", f"train.output_dir={out}"]),
        "fit": lambda out: torchrun([*ARGS, f"train.output_dir={out}"], script=f"examples/{EXAMPLE.split('.')[1]}.py"),
        "deepspeed": lambda out: deepspeed([*ARGS, "backend=auto", f"train.output_dir={out}"]),
    }
    if _horovod_usable():
        launches["horovodrun"] = lambda out: horovodrun([*ARGS, "backend=auto", f"train.output_dir={out}"])
    for name, launch in launches.items():
        out = tmp / name
        proc = launch(out)
        assert proc.returncode == 0, f"{name}: {describe(proc)}"
        outs[name] = out
    outs["tree_before"], outs["tree_after"] = before, _tree_state()  # type: ignore[assignment]
    return outs


@pytest.mark.parametrize("launcher,backend", [("torchrun", "torch"), ("horovodrun", "horovod"),
                                              ("deepspeed", "deepspeed"), ("fit", "torch")])
def test_the_example_trains_under_each_launcher(runs: dict, launcher: str, backend: str) -> None:
    if launcher not in runs:
        pytest.skip("needs Horovod (launchers/install_horovod.sh)")
    final = _final(runs[launcher])
    assert final["backend"] == backend and final["world_size"] == 2
    assert final["n"] == 128 and "test set (297)" in final["test_set"]  # the example's own held-out split
    assert final["n_aa"] == 64 and 0 <= final["AA"] <= final["n_aa_attacked"] / 64  # AA after the PGD filter
    weights = load_checkpoint(runs[launcher])["model"] if backend != "deepspeed" else None
    if weights is not None:  # the example's own layers, behind datkit's (identity) normalization
        assert weights["net.0.weight"].shape == (16, 1, 3, 3) and weights["net.7.weight"].shape == (10, 64)


def test_the_tree_is_unchanged(runs: dict) -> None:
    assert runs["tree_after"] == runs["tree_before"], "training the example wrote into datkit's tree"


def test_fit_ends_with_the_command_lines_weights(runs: dict) -> None:
    cli, fit = load_checkpoint(runs["torchrun"])["model"], load_checkpoint(runs["fit"])["model"]
    assert set(cli) == set(fit)
    worst = max(float((cli[k].double() - fit[k].double()).abs().max()) for k in cli)
    assert worst <= 1e-6, f"datkit.fit differs from the command line by {worst}"
    a, b = _final(runs["torchrun"]), _final(runs["fit"])
    assert (a["TA"], a["RA"]) == (b["TA"], b["RA"])


# --- bad plug-ins ----------------------------------------------------------------------------------------------
BAD = {  # case: (override, key named, cause in the message)
    "model_module_missing": ("model.name=no_such_module:make", "model.name", "cannot import module 'no_such_module'"),
    "model_attribute_missing": (f"model.name={EXAMPLE}:no_such_factory", "model.name",
                                "has no attribute 'no_such_factory'"),
    "model_not_a_module": ("model.name=helpers.bad_plugins:not_a_model", "model.name", "not a torch.nn.Module"),
    "data_import_fails": ("data.name=helpers.broken_module:make", "data.name", "RuntimeError: this module is broken"),
    "data_not_a_pair": ("data.name=helpers.bad_plugins:not_a_pair", "data.name",
                        "expected a pair (train_set, test_set)"),
    "data_wrong_shape": ("data.name=helpers.bad_plugins:wrong_shape", "data.name", "expected a float tensor C x H x W"),
    "data_out_of_range": ("data.name=helpers.bad_plugins:out_of_range", "data.name", "expected [0, 1]"),
    "method_not_a_method": ("method.name=helpers.bad_plugins:not_a_method", "method.name",
                            "not a datkit.methods.Method"),
    "optim_not_an_optimizer": ("optim.name=helpers.bad_plugins:not_an_optimizer", "optim.name",
                               "not a torch.optim.Optimizer"),
    "compressor_not_a_compressor": ("compression.name=helpers.bad_plugins:NotACompressor", "compression.name",
                                    "not a datkit.compress.Compressor subclass"),
}
_CASES = """
import contextlib, io, json, sys, traceback
from datkit.train import main
results = {}
for name, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def _no_worker_traceback(text: str) -> bool:
    """No traceback frame in datkit, the example or the plug-in (a launcher's own report of a failed worker may
    carry the launcher's frames: torchrun's agent raises ChildFailedError)."""
    return not re.search(r'File ".*(datkit|examples|helpers)/', text)


@pytest.fixture(scope="module")
def bad_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("bad")
    cases = {name: [*ARGS, "backend=torch", override, f"train.output_dir={tmp / name}"]
             for name, (override, _, _) in BAD.items()}
    proc = run_python(["-c", _CASES, json.dumps(cases)], cwd=REPO, timeout=300, **ENV)
    assert proc.returncode == 0, describe(proc)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["_tmp"] = [str(tmp)]
    return res


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_plugin_exits_2_naming_the_key(bad_results: dict, case: str) -> None:
    override, key, cause = BAD[case]
    code, stderr = bad_results[case]
    assert code == 2, f"{case}: exit {code}\n{stderr}"
    line = next((ln for ln in stderr.splitlines() if ln.startswith("datkit: error:") or ln.lstrip().startswith("- ")),
                "")
    assert key in stderr and cause in stderr, f"{case}: {stderr}"
    assert line, stderr
    assert "Traceback" not in stderr, f"{case}: {stderr}"
    assert not (Path(bad_results["_tmp"][0]) / case / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("launcher", ["torchrun", "horovodrun", "deepspeed"])
def test_a_bad_plugin_under_each_launcher(launcher: str, tmp_path: Path) -> None:
    # checked when the run is built (the model factory is called): the process group is up, every worker stops
    override, key, cause = BAD["model_not_a_module"] if launcher != "torchrun" else BAD["data_out_of_range"]
    if launcher == "horovodrun" and not _horovod_usable():
        pytest.skip("needs Horovod (launchers/install_horovod.sh)")
    launch = {"torchrun": torchrun, "horovodrun": horovodrun, "deepspeed": deepspeed}[launcher]
    proc = launch([*ARGS, "backend=auto", override, f"train.output_dir={tmp_path / 'out'}"])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, describe(proc)
    assert f"datkit: error: {key}=" in text and cause in text, describe(proc)
    assert text.count("datkit: error:") == 1, describe(proc)  # rank 0 alone prints it
    assert _no_worker_traceback(text), describe(proc)
    assert "epoch 1" not in text, describe(proc)
    # torchrun and horovodrun exit 1 themselves and report each worker's exit code; the deepspeed launcher passes it on
    worker_code = {"torchrun": r"exitcode\s*:\s*2\b", "horovodrun": r"exit with status code 2\b"}.get(launcher)
    if worker_code:
        assert re.search(worker_code, text), describe(proc)
    else:
        assert proc.returncode == 2, describe(proc)


# --- bad configuration under each launcher (2 workers): the start-up error once, from rank 0 -------------------
BAD_CONFIGS = {  # name -> (arguments, what the error line says)
    "bad_key": (["train.epochz=3"], "unknown config key 'train.epochz'"),
    "bad_type": (["train.epochs=many"], "bad value for config key 'train.epochs'"),
    "bad_value": (["train.nonfinite=continue"], "train.nonfinite='continue' is not one of: stop, skip, ignore"),
    "malformed_yaml": (["--config", "{yaml}"],
                       "is not valid YAML at line 3, column 1: did not find expected ',' or ']'"),
}
LAUNCHES = {"torchrun": torchrun, "horovodrun": horovodrun, "deepspeed": deepspeed}


@pytest.fixture(scope="module")
def bad_config_launches(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """(launcher, case) -> finished launcher process, for the selected tests; they fail at start-up, so 4 run at a
    time."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("bad_config")
    (tmp / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")  # the flow sequence is never closed
    launchers = [n for n in LAUNCHES if n != "horovodrun" or _horovod_usable()]
    selected = {(p.get("launcher"), p.get("case")) for item in request.session.items
                if getattr(item, "module", None) is request.module
                for p in [getattr(getattr(item, "callspec", None), "params", {})]}
    jobs = [(launcher, case) for launcher in launchers for case in BAD_CONFIGS if (launcher, case) in selected]

    def launch(job: tuple[str, str]) -> subprocess.CompletedProcess:
        launcher, case = job
        args = [a.format(yaml=tmp / "bad.yaml") for a in BAD_CONFIGS[case][0]]
        return LAUNCHES[launcher]([*ARGS, "backend=auto", *args, f"train.output_dir={tmp / launcher / case}"])

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(jobs, pool.map(launch, jobs)))


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
@pytest.mark.parametrize("launcher", list(LAUNCHES))
def test_a_bad_config_under_each_launcher_is_one_line_from_rank_0(bad_config_launches: dict, launcher: str,
                                                                  case: str) -> None:
    if (launcher, case) not in bad_config_launches:
        pytest.skip("needs Horovod (launchers/install_horovod.sh)")
    proc = bad_config_launches[launcher, case]
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, describe(proc)
    assert text.count("datkit: error:") == 1 and BAD_CONFIGS[case][1] in text, describe(proc)  # once: rank 0 alone
    assert _no_worker_traceback(text) and "Traceback" not in proc.stdout, describe(proc)
    # rank 0 exits 2; rank 1 waits for it (up to datkit.cli.PEER_FAIL_GRACE_S) and exits 2 on the launcher's SIGTERM,
    # or is SIGTERMed before it found the error: torchrun's summary reports each one; horovodrun the ones that ended
    # before it stopped the rest; the deepspeed launcher passes the first one on
    if launcher == "torchrun":
        codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", text))
        assert codes.get("0") == "2" and codes.get("1") in ("2", "-15"), describe(proc)
    elif launcher == "horovodrun":
        assert re.search(r"Process \d exit with status code 2\.", text), describe(proc)
    else:
        assert proc.returncode == 2, describe(proc)


def test_only_rank_0_prints_a_start_up_error_and_the_others_wait_for_it(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """The launches above can miss a second line by chance (the launcher kills the slower worker); this cannot."""
    import signal
    import time

    from datkit import cli

    previous = signal.getsignal(signal.SIGTERM)  # fail() installs an exit-on-SIGTERM handler on ranks other than 0
    monkeypatch.setattr(signal, "signal", lambda signum, handler: previous)
    monkeypatch.setattr(cli, "PEER_FAIL_GRACE_S", 0.3)
    for var in ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "1")
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        cli.fail(ValueError("train.epochz"))
    assert exit_.value.code == 2 and time.monotonic() - start >= 0.3  # it waited for rank 0 to print first
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("HOROVOD_RANK", "0")
    with pytest.raises(SystemExit) as exit_:
        cli.fail(ValueError("train.epochz"))
    assert exit_.value.code == 2 and capsys.readouterr().err == "datkit: error: train.epochz\n"
