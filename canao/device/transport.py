"""Transports: copy files to a device, run an argv there, get (exit code, stdout, stderr) back, clean up.

Device specs:
    local                           this machine (a temporary folder, subprocess)
    ssh://[user@]host[:port][?key=PATH&known_hosts=PATH]
                                    the system `ssh` client, BatchMode (never a password prompt),
                                    StrictHostKeyChecking=accept-new; the key may also come from
                                    $CANAO_SSH_KEY and the known_hosts file from $CANAO_SSH_KNOWN_HOSTS
    adb | adb://SERIAL              an Android device through the system `adb` (files in /data/local/tmp/canao)
    qemu-aarch64                    this machine emulating another architecture (user-mode qemu): checks that
                                    an artifact runs; its timings are the emulator's

Nothing here knows about models; every failure is a CanaoError that names the problem and the fix.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..cpuinfo import host_cpuinfo, parse_cpuinfo
from ..errors import CanaoError

DEFAULT_TIMEOUT = 600.0
# One call collects everything `measure` records about a device (one round trip over ssh/adb).
_PROBE = ("echo @uname; uname -m; echo @cpuinfo; cat /proc/cpuinfo 2>/dev/null; "
          "echo @model; getprop ro.product.model 2>/dev/null; echo @soc; getprop ro.soc.model 2>/dev/null; true")

class Transport:
    """push(files, remote_dir) -> remote_dir; run(argv, timeout, cwd) -> (rc, stdout, stderr); cleanup()."""

    kind = "abstract"

    def __init__(self, spec: str):
        self.spec = spec
        self._workdir: str | None = None
        self._probe: dict | None = None

    # -- what each transport implements
    def _make_workdir(self) -> str:
        raise NotImplementedError

    def _copy(self, files: list[Path], remote_dir: str) -> None:
        raise NotImplementedError

    def run(self, argv: list[str], timeout: float | None = DEFAULT_TIMEOUT, cwd: str | None = None
            ) -> tuple[int, str, str]:
        raise NotImplementedError

    def _remove(self, path: str) -> None:
        raise NotImplementedError

    # -- shared
    def workdir(self) -> str:
        """A private folder on the device, created on first use and removed by cleanup()."""
        if self._workdir is None:
            self._workdir = self._make_workdir()
        return self._workdir

    def push(self, files, remote_dir: str | None = None) -> str:
        """Copy local files (keeping their names and executable bits) into remote_dir, by default the
        work folder; a relative remote_dir is taken inside the work folder. Returns the folder."""
        files = [Path(f) for f in files]
        for f in files:
            if not f.is_file():
                raise CanaoError(f"cannot copy {f} to {self.spec}: no such file")
        base = self.workdir()
        if remote_dir is None:
            remote_dir = base
        elif not remote_dir.startswith("/"):
            remote_dir = f"{base}/{remote_dir}"
        self._copy(files, remote_dir)
        return remote_dir

    def remove(self, remote_dir: str) -> None:
        """Delete a folder pushed to earlier (only ever inside the work folder)."""
        if self._workdir and remote_dir.startswith(self._workdir + "/"):
            self._remove(remote_dir)

    def cleanup(self) -> None:
        if self._workdir is not None:
            try:
                self._remove(self._workdir)
            finally:
                self._workdir = None

    def probe(self) -> dict:
        """{"arch": uname -m, "cpu_model", "flags", "cores", "product"}: what runs there."""
        if self._probe is None:
            rc, out, err = self.run(["sh", "-c", _PROBE], timeout=60)
            if rc != 0:
                raise CanaoError(f"cannot inspect {self.spec} (`uname -m` failed: {_last_line(err) or rc}); "
                                 f"the device needs a POSIX shell")
            sections, current = {}, None
            for line in out.splitlines():
                if line in ("@uname", "@cpuinfo", "@model", "@soc"):
                    current = line[1:]
                    sections[current] = []
                elif current:
                    sections[current].append(line)
            arch = " ".join(sections.get("uname", [])).strip()
            if not arch:
                raise CanaoError(f"cannot inspect {self.spec}: `uname -m` printed nothing; the device needs a POSIX shell")
            cpu = parse_cpuinfo("\n".join(sections.get("cpuinfo", [])))
            product = " ".join(sections.get("model", [])).strip() or None
            soc = " ".join(sections.get("soc", [])).strip()
            if soc:  # Android: the SoC name (e.g. SM8550) says more than the core list
                cpu["cpu_model"] = f"{soc} ({cpu['cpu_model']})" if cpu["cpu_model"] else soc
            self._probe = {"spec": self.spec, "transport": self.kind, "arch": arch, **cpu, "product": product}
        return self._probe

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def remote_limited(command: str, timeout: float | None) -> str:
    """`command` under the device's own `timeout` (coreutils, busybox, toybox) where it has one: stopping
    the local ssh/adb client when the time is up does not stop what it started on the device. The
    device's limit is 2 s longer, so the local time-out, with its message, comes first."""
    if timeout is None:
        return command
    q = shlex.quote(command)
    return (f"if command -v timeout >/dev/null 2>&1; then exec timeout {math.ceil(timeout) + 2} sh -c {q}; "
            f"else exec sh -c {q}; fi")


def _timeout_error(spec: str, what, timeout: float) -> CanaoError:
    what = what if isinstance(what, str) else " ".join(what[:2])
    if len(what) > 60:
        what = what[:57] + "..."
    return CanaoError(f"`{what}` on {spec} did not finish within {timeout:.0f} s; "
                      f"ask for fewer --runs or a shorter --seq, or check the device is not overloaded")


class LocalTransport(Transport):
    """This machine: a temporary folder and subprocess (the reference the remote transports are compared with)."""

    kind = "local"

    def _make_workdir(self) -> str:
        return tempfile.mkdtemp(prefix="canao-")

    def _copy(self, files, remote_dir):
        Path(remote_dir).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, Path(remote_dir) / f.name)  # copy2 keeps the executable bit

    def run(self, argv, timeout=DEFAULT_TIMEOUT, cwd=None):
        try:
            p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise _timeout_error(self.spec, argv, timeout) from None
        except FileNotFoundError as exc:
            return 127, "", f"{argv[0]}: not found ({exc.strerror})"
        except PermissionError as exc:
            return 126, "", f"{argv[0]}: cannot execute ({exc.strerror})"
        except OSError as exc:  # ENOEXEC: a binary for another architecture
            return 126, "", f"{argv[0]}: cannot execute ({exc.strerror})"
        return p.returncode, p.stdout, p.stderr

    def _remove(self, path):
        shutil.rmtree(path, ignore_errors=True)


class QemuTransport(LocalTransport):
    """qemu-ARCH: this machine running another architecture's binaries under user-mode qemu (-cpu max).
    It proves an artifact runs before a real device is at hand; its timings measure the emulator."""

    kind = "qemu"

    def __init__(self, spec: str):
        super().__init__(spec)
        self.arch = spec[len("qemu-"):]
        self.qemu = shutil.which(spec)
        if not self.qemu:
            raise CanaoError(f"{spec} is not installed: install user-mode qemu (Debian: apt install qemu-user)")

    def run(self, argv, timeout=DEFAULT_TIMEOUT, cwd=None):
        return super().run([self.qemu, "-cpu", "max", *argv], timeout=timeout, cwd=cwd)

    def probe(self) -> dict:
        if self._probe is None:
            host = host_cpuinfo()
            # no flags: -cpu max emulates every extension, so no ISA check applies
            self._probe = {"spec": self.spec, "transport": self.kind, "arch": self.arch, "flags": [],
                           "cpu_model": f"qemu-{self.arch} -cpu max on {host['cpu_model'] or 'this machine'} (emulated)",
                           "cores": host["cores"], "product": None}
        return self._probe


class SSHTransport(Transport):
    """A Linux machine reachable with key-based ssh. One multiplexed connection (ControlMaster) carries
    every command; files go through `cat` on that connection, which any sshd with a shell accepts
    (dropbear and busybox boards have no sftp server for a modern scp)."""

    kind = "ssh"

    def __init__(self, spec: str):
        super().__init__(spec)
        url = urlsplit(spec)
        if not url.hostname:
            raise CanaoError(f"device '{spec}' has no host; write ssh://user@host[:port]")
        try:
            self.port = url.port or 22
        except ValueError:
            raise CanaoError(f"device '{spec}': the port is not a number; write ssh://user@host[:port]") from None
        self.user = unquote(url.username) if url.username else None
        self.host = url.hostname
        # ssh parses a destination that starts with '-' as an option (-oProxyCommand=... runs a command)
        if not re.fullmatch(r"[A-Za-z0-9_.:%\[\]][A-Za-z0-9_.:%\[\]-]*", self.host):
            raise CanaoError(f"device '{spec}': '{self.host}' is not a host name or address")
        if self.user is not None and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*", self.user):
            raise CanaoError(f"device '{spec}': '{self.user}' is not a user name (letters, digits, . _ -, "
                             "not starting with -)")
        self.dest = f"{self.user}@{self.host}" if self.user else self.host
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        unknown = sorted(set(query) - {"key", "known_hosts"})
        if unknown:
            raise CanaoError(f"device '{spec}': unknown option {', '.join(unknown)}; ssh specs take ?key=PATH&known_hosts=PATH")
        self.key = query.get("key") or os.environ.get("CANAO_SSH_KEY")
        if self.key and not Path(self.key).expanduser().is_file():
            raise CanaoError(f"ssh key {self.key} does not exist; pass the private key file as ?key=PATH")
        self.known_hosts = query.get("known_hosts") or os.environ.get("CANAO_SSH_KNOWN_HOSTS")
        self.ssh = shutil.which("ssh")
        if not self.ssh:
            raise CanaoError("the `ssh` client is not installed: install OpenSSH (Debian: apt install openssh-client)")
        self._ctl_dir = tempfile.mkdtemp(prefix="canao-ssh-")  # short path: a unix socket name is limited to 108 bytes
        self._master = False

    def _options(self) -> list[str]:
        opts = ["-p", str(self.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15", "-o", "LogLevel=ERROR",
                "-o", f"ControlPath={self._ctl_dir}/cm"]
        if self.key:
            opts += ["-i", str(Path(self.key).expanduser()), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={Path(self.known_hosts).expanduser()}"]
        return opts

    def _connect(self) -> None:
        """Open the shared connection: ssh -f -N -M forks once authenticated. Its stderr goes to a file,
        not a pipe (the background master would hold a pipe open forever)."""
        if self._master:
            return
        Path(self._ctl_dir).mkdir(exist_ok=True)
        log = Path(self._ctl_dir) / "connect.log"
        with open(log, "w") as err:
            try:
                rc = subprocess.run([self.ssh, *self._options(), "-o", "ControlMaster=yes", "-o", "ControlPersist=120",
                                     "-f", "-N", self.dest], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, timeout=60).returncode
            except subprocess.TimeoutExpired:
                raise CanaoError(f"ssh to {self.host}:{self.port} did not connect within 60 s; "
                                 f"check the address and that the host is up") from None
        if rc != 0:
            message = log.read_text()
            shutil.rmtree(self._ctl_dir, ignore_errors=True)  # a failed transport is not cleaned up by its caller
            raise self._error(message)
        self._master = True

    def _error(self, stderr: str) -> CanaoError:
        """ssh's own failure (exit 255) as one line with the fix."""
        where = f"{self.host}:{self.port}"
        s = stderr or ""
        if "Could not resolve hostname" in s or "Name or service not known" in s:
            return CanaoError(f"ssh: unknown host '{self.host}'; check the name in --device (ssh://user@host[:port])")
        if "Connection refused" in s:
            return CanaoError(f"ssh: connection to {where} refused; is sshd running there and is {self.port} its port?")
        if "timed out" in s or "No route to host" in s or "Network is unreachable" in s:
            return CanaoError(f"ssh: {where} is unreachable ({_last_line(s)}); check the address, network and firewall")
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in s or "Host key verification failed" in s:
            kh = self.known_hosts or "~/.ssh/known_hosts"
            return CanaoError(f"ssh: the host key of {where} differs from the one in {kh}; if the device was reinstalled, "
                              f"remove the old key with `ssh-keygen -R '[{self.host}]:{self.port}' -f {kh}`")
        if "Permission denied" in s or "Too many authentication failures" in s:
            how = f"the key {self.key}" if self.key else "your default keys (pass one as ?key=PATH or $CANAO_SSH_KEY)"
            return CanaoError(f"ssh: authentication as {self.user or 'the current user'} on {where} failed with {how}; "
                              f"add its public key to ~/.ssh/authorized_keys there (passwords are not used: BatchMode)")
        return CanaoError(f"ssh to {where} failed: {_last_line(s) or 'no message'}")

    def _ssh(self, command: str, timeout: float | None, stdin=None) -> tuple[int, str, str]:
        self._connect()
        argv = [self.ssh, *self._options(), "-o", "ControlMaster=no", self.dest, command]
        try:
            p = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise _timeout_error(self.spec, command, timeout) from None
        if p.returncode == 255 and not p.stdout:
            raise self._error(p.stderr)
        return p.returncode, p.stdout, p.stderr

    def _make_workdir(self) -> str:
        rc, out, err = self._ssh("mktemp -d /tmp/canao-XXXXXX", timeout=60)
        path = _last_line(out)
        if rc != 0 or not path.startswith("/tmp/canao-"):
            raise CanaoError(f"cannot create a folder under /tmp on {self.spec} ({_last_line(err) or rc}); "
                             f"the device needs a writable /tmp and mktemp")
        return path

    def _copy(self, files, remote_dir):
        rc, _, err = self._ssh(f"mkdir -p {shlex.quote(remote_dir)}", timeout=60)
        if rc != 0:
            raise CanaoError(f"cannot create {remote_dir} on {self.spec}: {_last_line(err)}")
        for f in files:
            dest = shlex.quote(f"{remote_dir}/{f.name}")
            mode = " && chmod 755 " + dest if os.access(f, os.X_OK) else ""
            with open(f, "rb") as src:
                rc, _, err = self._ssh(f"cat > {dest}{mode}", timeout=max(60.0, f.stat().st_size / 1e6), stdin=src)
            if rc != 0:
                raise CanaoError(f"copying {f.name} to {self.spec}:{remote_dir} failed: {_last_line(err)} "
                                 f"(is the disk full?)")

    def run(self, argv, timeout=DEFAULT_TIMEOUT, cwd=None):
        command = " ".join(shlex.quote(a) for a in argv)
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return self._ssh(remote_limited(command, timeout), timeout)

    def _remove(self, path):
        try:
            self._ssh(f"rm -rf {shlex.quote(path)}", timeout=60)
        except CanaoError:
            pass  # the device went away; its /tmp is cleaned on reboot

    def cleanup(self):
        try:
            super().cleanup()
        finally:
            if self._master:
                subprocess.run([self.ssh, *self._options(), "-O", "exit", self.dest], capture_output=True, timeout=30)
                self._master = False
            shutil.rmtree(self._ctl_dir, ignore_errors=True)


class ADBTransport(Transport):
    """An Android device through `adb` (USB or adb over TCP). Files live in /data/local/tmp/canao/<id>,
    the one place an unrooted phone lets a shell user execute binaries."""

    kind = "adb"
    BASE = "/data/local/tmp/canao"

    def __init__(self, spec: str):
        super().__init__(spec)
        self.serial = spec[len("adb://"):] if spec.startswith("adb://") else None
        if spec.startswith("adb://") and not self.serial:
            raise CanaoError("device 'adb://' names no serial; write adb (the one attached device) or adb://SERIAL")
        self.adb = os.environ.get("ADB") or shutil.which("adb")
        if not self.adb or not Path(self.adb).exists():
            raise CanaoError("adb is not installed (not on PATH): install Android platform-tools "
                             "(Debian: apt install adb) or set $ADB to its path")
        self.serial = self._pick_device()

    def _adb(self, *args, timeout: float | None = 120) -> subprocess.CompletedProcess:
        base = [self.adb] + (["-s", self.serial] if self.serial else [])
        try:
            return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise _timeout_error(self.spec, ["adb", *args], timeout) from None

    def _pick_device(self) -> str:
        p = self._adb("devices", timeout=60)  # starts the adb server when none runs
        if p.returncode != 0:
            raise CanaoError(f"`adb devices` failed: {_last_line(p.stderr)}; try `adb kill-server` and again")
        devices = {}
        for line in p.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 2 and not line.startswith(("List of devices", "*")):
                devices[fields[0]] = fields[1]
        if self.serial is None:
            if not devices:
                raise CanaoError("no Android device attached: connect a phone with USB debugging enabled "
                                 "(Settings > Developer options) until `adb devices` lists it")
            if len(devices) > 1:
                raise CanaoError(f"{len(devices)} Android devices attached ({', '.join(sorted(devices))}); "
                                 f"choose one with --device adb://SERIAL")
            serial = next(iter(devices))
        else:
            serial = self.serial
            if serial not in devices:
                listed = f"attached: {', '.join(sorted(devices))}" if devices else "no device is attached"
                raise CanaoError(f"Android device {serial} is not attached ({listed}); check `adb devices`, "
                                 f"or `adb connect {serial}` for a device over TCP")
        state = devices[serial]
        if state == "unauthorized":
            raise CanaoError(f"Android device {serial} has not authorized this computer; accept the "
                             f"'Allow USB debugging?' prompt on the phone")
        if state != "device":
            raise CanaoError(f"Android device {serial} is {state}; reconnect it (or `adb reconnect`) until "
                             f"`adb devices` shows it as 'device'")
        return serial

    def _shell(self, command: str, timeout: float | None) -> tuple[int, str, str]:
        # Old adbd (before Android 7) drops the exit code: the command prints it as its last line.
        p = self._adb("shell", f"{command}; echo __canao_rc=$?", timeout=timeout)
        if p.returncode != 0 and "__canao_rc=" not in p.stdout:
            raise CanaoError(f"adb shell on {self.serial} failed: {_last_line(p.stderr) or p.returncode}; "
                             f"check the device is still attached (`adb devices`)")
        out = p.stdout.replace("\r\n", "\n")
        m = re.search(r"__canao_rc=(\d+)\s*$", out)
        rc = int(m.group(1)) if m else p.returncode
        return rc, out[:m.start()] if m else out, p.stderr

    def _make_workdir(self) -> str:
        path = f"{self.BASE}/{uuid.uuid4().hex[:8]}"
        rc, _, err = self._shell(f"mkdir -p {path}", timeout=60)
        if rc != 0:
            raise CanaoError(f"cannot create {path} on {self.serial}: {_last_line(err)}")
        return path

    def _copy(self, files, remote_dir):
        self._shell(f"mkdir -p {shlex.quote(remote_dir)}", timeout=60)
        size = sum(f.stat().st_size for f in files)
        p = self._adb("push", *map(str, files), remote_dir + "/", timeout=max(120.0, size / 2e6))
        if p.returncode != 0:
            raise CanaoError(f"adb push to {self.serial}:{remote_dir} failed: {_last_line(p.stderr or p.stdout)}")
        execs = [shlex.quote(f"{remote_dir}/{f.name}") for f in files if os.access(f, os.X_OK)]
        if execs:
            self._shell("chmod 755 " + " ".join(execs), timeout=60)

    def run(self, argv, timeout=DEFAULT_TIMEOUT, cwd=None):
        command = " ".join(shlex.quote(a) for a in argv)
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return self._shell(remote_limited(command, timeout), timeout)

    def _remove(self, path):
        try:
            self._shell(f"rm -rf {shlex.quote(path)}", timeout=60)
        except CanaoError:
            pass


def open_transport(spec: str) -> Transport:
    """The transport for a --device spec (see the module docstring)."""
    spec = (spec or "local").strip()
    if spec == "local":
        return LocalTransport(spec)
    if spec.startswith("ssh://"):
        return SSHTransport(spec)
    if spec == "adb" or spec.startswith("adb://"):
        return ADBTransport(spec)
    if re.fullmatch(r"qemu-[a-z0-9_]+", spec):
        return QemuTransport(spec)
    raise CanaoError(f"unknown device '{spec}'; use local, ssh://user@host[:port], adb[://SERIAL] or qemu-aarch64")
