"""The device runner for real: a small compiled encoder timed by its canao-run locally and through a
real sshd on 127.0.0.1 (started here), and the adb client's errors with no phone attached."""

import json
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from canao.device import device_runner as runner
from canao.device.transport import ADBTransport, SSHTransport, open_transport, parse_cpuinfo
from canao.errors import CanaoError

SSHD = "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from canao.compiler import compile_model
    from canao.models.bert import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, layer_heads=[2, 2], layer_ffn=[96, 96], head_dim=16,
                     max_position_embeddings=64)
    out = tmp_path_factory.mktemp("device") / "artifact"
    compile_model(BertForQuestionAnswering(cfg).eval(), out, max_seq=48, tune=False)
    yield out
    runner.close()


def check_bench(r, seq, runs, threads=1, arch=platform.machine()):
    assert (r["seq"], r["runs"], r["threads"]) == (seq, runs, threads)
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p95_ms"]
    assert r["min_ms"] <= r["mean_ms"] < 1000
    assert r["device"]["arch"] == arch
    assert r["target"] and r["precision"] == "fp32"


def test_local_measure_and_cli(artifact, capsys):
    from canao.cli import main

    r = runner.measure(artifact, "local", seq=32, runs=7, warmup=2)
    check_bench(r, 32, 7)
    assert r["device"]["transport"] == "local" and r["device"]["cores"] >= 1
    t, remote = runner.stage(artifact, "local")
    assert (Path(remote) / "canao-run").is_file()
    # the same artifact is copied to a device once per process
    assert runner.stage(artifact, "local") == (t, remote)
    assert main(["device", "measure", "--artifact", str(artifact), "--seq", "16", "--runs", "3", "--json"]) == 0
    check_bench(json.loads(capsys.readouterr().out), 16, 3)
    runner.close()
    assert not Path(remote).exists(), "close() leaves the copied files behind"


def test_local_errors(artifact, tmp_path):
    with pytest.raises(CanaoError, match="outside the artifact's 1..48"):
        runner.measure(artifact, "local", seq=64)
    with pytest.raises(CanaoError, match="unknown device 'usb'"):
        runner.measure(artifact, "usb", seq=8)
    # the runner's own failure comes back with its stderr line and exit code
    t, remote = runner.stage(artifact, "local")
    with pytest.raises(CanaoError, match=r"canao-run on local failed \(exit 2\): canao-run: .*seq"):
        runner.run_runner(t, remote, ["weights.bin", "--bench", "--seq", "0"])
    with pytest.raises(CanaoError, match="did not finish within 1 s; ask for fewer --runs"):
        t.run(["sleep", "5"], timeout=1)

    def copy(name):
        d = tmp_path / name
        shutil.copytree(artifact, d)
        return d, json.loads((d / "manifest.json").read_text())

    old, _ = copy("old")
    (old / "canao-run").unlink()
    with pytest.raises(CanaoError, match="has no canao-run .* recompile it"):
        runner.measure(old, "local", seq=8)

    isa, manifest = copy("isa")  # an ISA flag no CPU has
    manifest["target"]["features"].append("canao_no_such_flag")
    (isa / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CanaoError, match="lacks canao_no_such_flag; recompile it with --target avx"):
        runner.measure(isa, "local", seq=8)

    bad, _ = copy("bad")
    with open(bad / "weights.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CanaoError, match="weights.bin does not match its checksum"):
        runner.measure(bad, "local", seq=8)


def test_aarch64_artifact_under_qemu_and_refused_here(tmp_path):
    """A cross-compiled ARM artifact: refused by this x86 machine before it is copied, timed under qemu-aarch64."""
    from canao.compiler import compile_model
    from canao.models.bert import BertConfig, BertForQuestionAnswering

    if platform.machine() != "x86_64":
        pytest.skip("checks an aarch64 artifact on an x86_64 host")
    if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
        if os.environ.get("CI"):
            pytest.fail("aarch64 cross gcc / qemu-user missing in CI: scripts/setup.sh installs them")
        pytest.skip("no aarch64 cross compiler or qemu-user")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, layer_heads=[2], layer_ffn=[64], head_dim=16,
                     max_position_embeddings=32)
    art = tmp_path / "arm"
    compile_model(BertForQuestionAnswering(cfg).eval(), art, max_seq=16, target="aarch64")
    assert runner.elf_arch(art / "canao-run") == "aarch64"
    with pytest.raises(CanaoError, match=r"built for aarch64 \(aarch64\), but local is x86_64; recompile it for x86"):
        runner.measure(art, "local", seq=8)
    r = runner.measure(art, "qemu-aarch64", seq=16, runs=3, warmup=1)
    check_bench(r, 16, 3, arch="aarch64")
    assert r["target"] == "aarch64" and "emulated" in r["device"]["cpu_model"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1 that accepts one temporary key for root (or the current user)."""
    if not Path(SSHD).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SSHD} missing in CI: scripts/setup.sh installs openssh-server")
        pytest.skip(f"{SSHD} not installed (apt install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copyfile(d / "client.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
""")
    try:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    except PermissionError:
        pass  # not root: sshd runs unprivileged without it
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if proc.poll() is not None:
                pytest.fail(f"sshd exited: {(d / 'sshd.log').read_text()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        user = os.environ.get("USER") or ("root" if os.getuid() == 0 else None) or __import__("getpass").getuser()
        yield {"dir": d, "port": port, "user": user,
               "spec": f"ssh://{user}@127.0.0.1:{port}?key={d / 'client'}&known_hosts={d / 'known_hosts'}"}
    finally:
        runner.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_ssh_measure(artifact, sshd):
    local = runner.measure(artifact, "local", seq=32, runs=7, warmup=2)
    r = runner.measure(artifact, sshd["spec"], seq=32, runs=7, warmup=2)
    check_bench(r, 32, 7)
    assert r["device"]["transport"] == "ssh" and r["device"]["spec"] == sshd["spec"]
    assert r["device"]["cpu_model"] == local["device"]["cpu_model"]  # the same machine, seen through sshd
    t, remote = runner.stage(artifact, sshd["spec"])
    assert remote.startswith("/tmp/canao-") and Path(remote, "canao-run").is_file()
    assert os.access(Path(remote, "canao-run"), os.X_OK)
    assert Path(remote, "weights.bin").read_bytes() == (artifact / "weights.bin").read_bytes()
    # the generic layer: any argv, its exit code and output
    assert t.run(["sh", "-c", "echo out; echo err >&2; exit 3"]) == (3, "out\n", "err\n")
    runner.close()
    assert not Path(remote).parent.exists(), "the remote work folder outlives cleanup()"


def test_latency_oracle_on_device(sshd, tmp_path):
    """The search's latency oracle compiles for the device's target and times there, keyed by device."""
    from canao.compress.oracle import LatencyOracle
    from canao.compress.space import Arch
    from canao.models.bert import BertConfig

    small = BertConfig(vocab_size=200, hidden_size=64, layer_heads=[4] * 2, layer_ffn=[128] * 2, head_dim=16)
    oracle = LatencyOracle(small, threads=1, db_path=tmp_path / "db.json", runs=5, warmup=1, rounds=2,
                           device=sshd["spec"])
    assert oracle.host.startswith(f"device:{sshd['spec']}|") and oracle.target in ("avx2", "avx512", "avx512_vnni")
    a = Arch((2,), (64,), 32)
    m = oracle.measure(a)
    assert m["runs"] == 5 and 0 < m["min_ms"] <= m["median_ms"] <= m["p95_ms"] and m["compile_s"] > 0
    assert LatencyOracle(small, db_path=tmp_path / "db.json", device=sshd["spec"]).cached(a) == m
    assert LatencyOracle(small, db_path=tmp_path / "db.json", backend="canao").cached(a) is None  # host != device
    with pytest.raises(CanaoError, match="needs the canao latency backend"):
        LatencyOracle(small, backend="torch", device=sshd["spec"])


def test_ssh_errors(sshd):
    d = sshd["dir"]
    refused = f"ssh://{sshd['user']}@127.0.0.1:{free_port()}?key={d / 'client'}&known_hosts={d / 'known_hosts'}"
    with pytest.raises(CanaoError, match=r"connection to 127.0.0.1:\d+ refused; is sshd running there"):
        open_transport(refused).probe()
    stranger = sshd["spec"].replace(f"key={d / 'client'}", f"key={d / 'stranger'}")
    with pytest.raises(CanaoError, match="authentication as .* failed with the key .*stranger; add its public key"):
        open_transport(stranger).probe()
    with pytest.raises(CanaoError, match="ssh key /nonexistent/key does not exist"):
        SSHTransport("ssh://root@127.0.0.1?key=/nonexistent/key")
    with pytest.raises(CanaoError, match="unknown option password"):
        SSHTransport("ssh://root@127.0.0.1?password=x")
    # a user or host that ssh would read as an option (-oProxyCommand=... runs a local command)
    with pytest.raises(CanaoError, match="is not a user name"):
        SSHTransport("ssh://-oProxyCommand=touch%20pwned@127.0.0.1")
    with pytest.raises(CanaoError, match="is not a host name"):
        SSHTransport("ssh://root@-oproxycommand=x")


def test_a_remote_run_past_its_time_is_stopped_on_the_device_too(sshd):
    t = open_transport(sshd["spec"])
    marker = f"sleep {4242 + os.getpid() % 1000}"
    try:
        with pytest.raises(CanaoError, match="did not finish within 2 s"):
            t.run(["sh", "-c", marker], timeout=2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(marker):
            time.sleep(0.5)
        assert not _running(marker), "the command outlived its time limit on the device"
    finally:
        t.cleanup()


def _running(pattern: str) -> bool:
    """A process whose command line contains `pattern` (the sshd here is on this machine)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if pattern in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                return True
        except OSError:  # it ended meanwhile
            pass
    return False


@pytest.fixture
def adb_server():
    """Stops the adb server afterwards if this test started it."""
    adb = shutil.which("adb")
    if adb is None:
        yield None
        return
    with socket.socket() as s:
        running = s.connect_ex(("127.0.0.1", 5037)) == 0
    yield adb
    if not running:
        subprocess.run([adb, "kill-server"], capture_output=True, timeout=30)


def test_adb_no_device(adb_server):
    if adb_server is None:
        if os.environ.get("CI"):
            pytest.fail("adb missing in CI: scripts/setup.sh installs it")
        pytest.skip("adb not installed")
    out = subprocess.run([adb_server, "devices"], capture_output=True, text=True, timeout=60).stdout
    if len(out.strip().splitlines()) > 1:
        pytest.skip("an Android device is attached: the no-device errors cannot be shown")
    with pytest.raises(CanaoError, match="no Android device attached: connect a phone with USB debugging"):
        ADBTransport("adb")
    with pytest.raises(CanaoError, match=r"Android device emulator-5554 is not attached \(no device is attached\)"):
        open_transport("adb://emulator-5554")


def test_missing_clients(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither adb nor ssh on it
    monkeypatch.delenv("ADB", raising=False)
    with pytest.raises(CanaoError, match="adb is not installed .*apt install adb"):
        open_transport("adb")
    with pytest.raises(CanaoError, match="the `ssh` client is not installed"):
        open_transport("ssh://root@127.0.0.1")


def test_cpuinfo_names():
    arm = "".join(f"processor\t: {i}\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\nCPU part\t: {p}\n\n"
                  for i, p in enumerate(["0xd05"] * 4 + ["0xd0b"] * 4))
    info = parse_cpuinfo(arm)
    assert info == {"flags": ["fp", "asimd", "asimddp"], "cpu_model": "Cortex-A55 + Cortex-A76", "cores": 8}
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n"
    assert parse_cpuinfo(x86) == {"flags": ["fpu", "avx2", "fma"], "cpu_model": "AMD EPYC", "cores": 1}
