"""Emulated hosts (``datkit.netemu``): network namespaces on a switch namespace, ``tc tbf`` links.

- ``up``/``down`` create and remove only namespaces (and their /etc/netns hosts files): the root
  namespace's addresses, routes and links are the same before, during and after; ``down`` is idempotent
  and kills what still runs inside the hosts;
- a 100 Mbit/s link carries 5 MB at no more than 100 Mbit/s (+15%) and at least 60 Mbit/s;
- the ssh shim runs a command inside the addressed host's namespace;
- a 2-host training run per backend, each with its own multi-node launch (torchrun c10d rendezvous,
  horovodrun -H through the ssh shim, deepspeed --no_ssh per node), reports world_size 2; Horovod over MPI
  (``--launcher horovodrun-mpi`` and ``mpirun``: Open MPI's orteds through the shim) ends with the weights of
  the gloo launch (1e-5);
- SIGTERM to ``run`` mid-job tears everything down; one ``bench network`` launch (2 hosts, 100 Mbit/s, none,
  int8-2s, onebit, onebit-adam) writes its files and goal lines, with byte ratios and C orderings that hold on any CPU
  (the goals themselves are the bench's to report, not a test's to assert).

They need root and iproute2 (CI runs as root); elsewhere they are skipped saying so.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from datkit.netemu import hosts as H
from datkit.netemu.hosts import NEEDS, NetemuError, Topology, available, down, existing_namespaces, up
from datkit.netemu.launch import LaunchSpec, host_commands, write_ssh_shim
from datkit.netemu.probe import measure_throughput
from helpers.runs import (
    REPO,
    TINY,
    assert_same_weights,
    child_env,
    describe,
    installed,
    load_checkpoint,
    no_horovod_mpi,
    run_python,
)

REASON = available()
needs_netns = pytest.mark.skipif(REASON is not None, reason=REASON or NEEDS)
FEW = ["train.epochs=1", "train.max_steps=2", "log.progress=false"]


def _prefix(tag: str) -> str:
    """A namespace prefix of this test process (parallel runs and other users' namespaces do not collide)."""
    return f"t{os.getpid() % 100000}{tag}"


def _root_net() -> dict[str, str]:
    return {what: subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
            for what, args in (("addr", ["-o", "addr"]), ("route", ["route", "show", "table", "all"]),
                               ("link", ["-o", "link"]))}


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith("backend=")]


def test_rates_and_refusal_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    assert H.rate_bits("100mbit") == 100_000_000 and H.rate_bits("10Gbit") == 10_000_000_000
    assert H.burst_bytes("10gbit") == 12_500_000 and H.burst_bytes("100mbit") == 125_000
    with pytest.raises(NetemuError, match="bits per second"):
        H.rate_bits("100mb")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert available() is not None and available().startswith(NEEDS)
    # CLI errors exit 2 with a message and no traceback (as root: the bad rate; otherwise: not root)
    proc = run_python(["-m", "datkit.netemu", "up", "--hosts", "2", "--rate", "100mb", "--prefix", _prefix("x")],
                      cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert ("bits per second" if REASON is None else NEEDS) in proc.stderr, describe(proc)


@needs_netns
def test_up_down_touch_only_their_namespaces() -> None:
    prefix = _prefix("a")
    before = _root_net()
    topo = up(Topology(3, "1gbit", prefix))
    try:
        assert sorted(existing_namespaces(prefix)) == sorted(topo.namespaces())
        assert _root_net() == before, "the root namespace's addresses/routes/links changed while hosts were up"
        for i in range(3):
            addr = subprocess.run(["ip", "-n", topo.host_ns(i), "-o", "addr", "show", topo.iface], capture_output=True,
                                  text=True, check=True).stdout
            assert f"{topo.addr(i)}/24" in addr
            for ns, dev in ((topo.host_ns(i), topo.iface), (topo.switch_ns, topo.port(i))):
                qdisc = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True,
                                       text=True).stdout
                assert "tbf" in qdisc and "rate 1Gbit" in qdisc, qdisc
        with pytest.raises(NetemuError, match="exist already"):
            up(Topology(2, "1gbit", prefix))
        sleeper = subprocess.Popen(["ip", "netns", "exec", topo.host_ns(1), "sleep", "300"])
        time.sleep(0.3)
    finally:
        removed = down(prefix, grace=2.0)
    assert sorted(removed) == sorted(topo.namespaces())
    assert sleeper.wait(timeout=10) != 0, "down did not kill a process left in a host"
    assert existing_namespaces(prefix) == [] and down(prefix) == []
    assert not any(Path(H.NETNS_ETC).glob(f"{prefix}h*"))
    assert _root_net() == before


@needs_netns
def test_100mbit_link_throughput_and_ssh_shim(tmp_path: Path) -> None:
    topo = up(Topology(2, "100mbit", _prefix("b")))
    try:
        bps = measure_throughput(topo, src=1, dst=0, nbytes=5_000_000)
        # tbf caps the rate (+15%: its burst and the probe's timing); the floor is generous for a loaded machine
        assert 0.6 <= bps / 100e6 <= 1.15, f"measured {bps / 1e6:.1f} Mbit/s on a 100mbit link"
        shim = write_ssh_shim(topo, tmp_path / "bin")
        out = subprocess.run([str(shim), "-o", "StrictHostKeyChecking=no", topo.addr(1), "-o", "ConnectTimeout=5",
                              "ip -o addr show; getent hosts $(hostname)"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"{topo.addr(1)}/24" in out.stdout and f"{topo.addr(0)}/24" not in out.stdout
        assert out.stdout.strip().splitlines()[-1].startswith(topo.addr(1)), "hostname does not resolve to the host"
        bad = subprocess.run([str(shim), "192.0.2.1", "true"], capture_output=True, text=True)
        assert bad.returncode == 255 and "not an emulated host" in bad.stderr
    finally:
        down(topo.prefix)


NO_HOROVOD = None if installed("horovod.torch") else "needs Horovod (launchers/install_horovod.sh)"
NO_HOROVOD_MPI = no_horovod_mpi()
BACKENDS = [pytest.param("torch", id="torch"),
            pytest.param("horovod", id="horovod", marks=pytest.mark.skipif(
                NO_HOROVOD is not None, reason=str(NO_HOROVOD))),
            pytest.param("deepspeed", id="deepspeed", marks=pytest.mark.skipif(
                not installed("deepspeed"), reason="needs DeepSpeed (pip install -e '.[deepspeed]')"))]


@pytest.fixture(scope="module")
def two_host_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``run(backend, launcher=None)``: the output folder of one 2-host run of the tiny job (each launch once)."""
    done: dict[tuple[str, str | None], Path] = {}

    def run(backend: str, launcher: str | None = None) -> Path:
        if (backend, launcher) not in done:
            tmp = tmp_path_factory.mktemp(f"two_host_{launcher or backend}")
            prefix, out = _prefix("r"), tmp / "out"
            via = ["--launcher", launcher] if launcher else []
            proc = run_python(["-m", "datkit.netemu", "run", "--hosts", "2", "--rate", "1gbit", "--backend", backend,
                               *via, "--prefix", prefix, "--timeout", "300", "--", *_tiny(), *FEW,
                               f"train.output_dir={out}"],
                              cwd=tmp, timeout=360)
            assert proc.returncode == 0, describe(proc)
            assert existing_namespaces(prefix) == []
            done[backend, launcher] = out
        return done[backend, launcher]

    return run


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_host_run_per_backend(backend: str, two_host_run: Callable[..., Path]) -> None:
    final = json.loads((two_host_run(backend) / "results.json").read_text())["final"]
    assert final["world_size"] == 2 and final["backend"] == backend


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(NO_HOROVOD_MPI is not None, reason=str(NO_HOROVOD_MPI))
@pytest.mark.parametrize("launcher", ["horovodrun-mpi", "mpirun"])
def test_horovod_over_mpi_across_hosts_matches_gloo(launcher: str, two_host_run: Callable[..., Path]) -> None:
    """horovodrun --mpi / mpirun across 2 hosts (Open MPI's orted on host 1 through the ssh shim, MPI's TCP transport on
    the emulated interface): the gloo launch's results and weights."""
    out, gloo = two_host_run("horovod", launcher), two_host_run("horovod")
    final, ref = (json.loads((o / "results.json").read_text())["final"] for o in (out, gloo))
    assert final["world_size"] == 2 and final["backend"] == "horovod"
    assert final["TA"] == ref["TA"] and final["RA"] == ref["RA"], (final, ref)
    assert_same_weights(load_checkpoint(out)["model"], load_checkpoint(gloo)["model"], atol=1e-5)


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sigterm_mid_run_tears_down(tmp_path: Path) -> None:
    prefix = _prefix("s")
    before = _root_net()
    proc = subprocess.Popen([sys.executable, "-m", "datkit.netemu", "run", "--hosts", "2", "--rate", "1gbit",
                             "--backend", "torch", "--prefix", prefix, "--", *_tiny(), "train.epochs=50",
                             "log.progress=false", f"train.output_dir={tmp_path / 'out'}"], cwd=tmp_path,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tmp_path / "out" / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    assert len(existing_namespaces(prefix)) == 3, "the job did not start"
    pids = [p for ns in existing_namespaces(prefix) for p in H.ns_pids(ns)]
    assert pids, "no processes in the emulated hosts"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "torn down" in err, err[-3000:]
    assert existing_namespaces(prefix) == []
    assert not [p for p in pids if Path(f"/proc/{p}").exists()], "processes of the job survived the teardown"
    assert _root_net() == before


@pytest.fixture(scope="module")
def bench_network(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """ONE ``bench network`` launch on the bench's own job (cnn_small: 3.4 MB of float32 gradient per step), 2 hosts
    at 100 Mbit/s, none / int8-2s / onebit / onebit-adam (1-bit Adam, compressed from the second epoch), checked many
    ways by the tests below."""
    if REASON is not None:
        pytest.skip(REASON)
    out = tmp_path_factory.mktemp("bench") / "bench"
    proc = run_python(["-m", "datkit.bench", "network", "--hosts", "2", "--rates", "100mbit", "--compressors", "none",
                       "int8-2s", "onebit", "onebit-adam", "--steps", "4", "--epochs", "2", "--prefix", _prefix("n"),
                       "--out", str(out)],
                      cwd=out.parent, timeout=480)
    assert proc.returncode == 0, describe(proc)
    rows = json.loads((out / "bench_network.json").read_text())["rows"]
    assert [(r["hosts"], r["rate"], r["compressor"]) for r in rows] == [(2, "100mbit", c) for c in
                                                                       ("none", "int8-2s", "onebit", "onebit-adam")]
    return out, {r["compressor"]: r for r in rows}


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_bench_network_writes_its_table_plot_and_goals(bench_network: tuple[Path, dict[str, dict]]) -> None:
    out, rows = bench_network
    assert rows["none"]["world_size"] == 2 and rows["none"]["C_ratio"] == 1.0
    table = (out / "bench_network.md").read_text()
    assert "| 2 | 100mbit |" in table and "int8-2s" in table and "onebit" in table
    # the goals are reported, reached or not, next to this machine's plain s/step -- never asserted
    for comp, goal in (("int8-2s", 0.3), ("onebit", 0.06), ("onebit-adam", 0.06)):
        assert f"goal C({comp})/C(none) <= {goal} at 2 hosts x 100mbit: **" in table, table
        assert rows[comp]["goal_reached"] == (rows[comp]["C_ratio"] <= goal)
    assert ("s/step" in table
            and 0.01 < json.loads((out / "bench_network.json").read_text())["setup"]["plain_step_s"] < 30)
    assert (out / "bench_network.png").stat().st_size > 1000


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_bench_network_bytes_and_link(bench_network: tuple[Path, dict[str, dict]]) -> None:
    _, rows = bench_network
    none, int8, onebit = rows["none"], rows["int8-2s"], rows["onebit"]
    assert 0.2 < int8["bytes_ratio"] < 0.35, int8  # int8 two-sided: ~1/4 of float32 plus the scales
    assert 0.02 < onebit["bytes_ratio"] < 0.05, onebit  # signs: 1/32 of float32, plus one scale per 1,024
    # 1-bit Adam after its warm-up (the counted epoch): its momentum through the same codec, the same bytes
    assert rows["onebit-adam"]["bytes_per_iter"] == onebit["bytes_per_iter"], (rows["onebit-adam"], onebit)
    # the probed link: tbf caps it at the rate; the floor is generous (a loaded machine, TCP's slow start)
    assert 50e6 < none["probe_bps"] < 115e6, none


@needs_netns
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_bench_network_c_follows_the_wire_at_100mbit(bench_network: tuple[Path, dict[str, dict]]) -> None:
    """Orderings that hold on any CPU: float32's C is at least its bytes' time on the probed link (the tbf burst is
    4% of a step's 3.4 MB), and the compressors and 1-bit Adam, sending 1/4 and 1/32 of the bytes, take less C than
    none."""
    _, rows = bench_network
    none, int8, onebit = rows["none"], rows["int8-2s"], rows["onebit"]
    assert none["C_s"] >= 0.85 * none["C_wire_s"], none
    assert int8["C_s"] < none["C_s"] and onebit["C_s"] < none["C_s"], (none, int8, onebit)
    assert rows["onebit-adam"]["C_s"] < none["C_s"], (none, rows["onebit-adam"])


def test_launcher_script_help() -> None:
    proc = run_python([str(REPO / "launchers" / "emulated_hosts.py"), "--help"], cwd=REPO)
    assert proc.returncode == 0 and all(w in proc.stdout for w in ("up", "down", "run", "probe")), describe(proc)
    proc = run_python(["-m", "datkit.netemu", "run", "--hosts", "2", "--backend", "mpi"], cwd=REPO)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr, describe(proc)


def test_mpi_launches_and_a_launcher_of_another_backend(tmp_path: Path) -> None:
    """The MPI launches' commands (no hosts needed): mpirun on host 0 only, orteds through the shim, Open MPI's traffic
    on the emulated interface, the workers' environment forwarded, as root; a launcher of another backend is refused."""
    topo = Topology(2, prefix="tq")
    spec = LaunchSpec(topo, 2, ["train.epochs=1"], tmp_path)
    (cmd,) = host_commands("horovod", spec, "mpirun")
    argv = " ".join(cmd.argv)
    assert cmd.host == 0 and argv.startswith("mpirun --allow-run-as-root -np 4 -H 198.18.0.1:2,198.18.0.2:2 ")
    for want in (f"--mca plm_rsh_agent {tmp_path / 'bin' / 'ssh'}", "--mca btl_tcp_if_include tqeth",
                 "--mca oob_tcp_if_include tqeth", "--bind-to none", "-x PATH", "-x GLOO_SOCKET_IFNAME",
                 "-m datkit.train backend=horovod train.epochs=1"):
        assert want in argv, (want, argv)
    (cmd,) = host_commands("horovod", spec, "horovodrun-mpi")
    assert "--mpi" in cmd.argv and "--gloo" not in cmd.argv and cmd.env["PATH"].startswith(str(tmp_path / "bin"))
    assert host_commands("horovod", spec)[0].argv[cmd.argv.index("--mpi")] == "--gloo"  # horovod's own: gloo
    with pytest.raises(ValueError, match="does not launch backend=torch"):
        host_commands("torch", spec, "mpirun")
    proc = run_python(["-m", "datkit.netemu", "run", "--hosts", "2", "--backend", "torch", "--launcher", "mpirun"],
                      cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, describe(proc)
    assert ("does not launch --backend torch" if REASON is None else NEEDS) in proc.stderr, describe(proc)
