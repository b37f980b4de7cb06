"""A real Kubernetes control plane on loopback, for tests.

etcd, kube-apiserver and kube-controller-manager (built by
``scripts/build-controlplane.sh``) run as child processes bound to 127.0.0.1 on
ports picked at start. Everything they need and write (a small PKI, the
service-account signing key, etcd's data, logs, the admin kubeconfig) lives in
the work directory the caller gives; nothing goes to ``~`` or ``/tmp``.

There is no kubelet and no scheduler: Pods are created (by the ReplicaSet
controller) but never run. The apiserver authorizes with RBAC, so tests can
check permissions by impersonation; the admin user is in ``system:masters``.

    with ControlPlane(Binaries.in_dir(bin_dir), workdir) as cp:
        subprocess.run(["kubectl", "--kubeconfig", str(cp.kubeconfig), "get", "ns"])
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Final

logger = logging.getLogger(__name__)

ADMIN_USER: Final = "tandem-admin"
"""The user of the kubeconfig this module writes; a member of ``system:masters``."""

_POLL_INTERVAL: Final = 0.2


class ControlPlaneError(RuntimeError):
    """The control plane could not be prepared, started or reached."""


@dataclasses.dataclass(frozen=True)
class Binaries:
    """Where the three control-plane executables are."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path

    @classmethod
    def in_dir(cls, bin_dir: Path) -> Binaries:
        """The binaries as ``scripts/build-controlplane.sh`` lays them out."""
        binaries = cls(
            etcd=bin_dir / "etcd",
            kube_apiserver=bin_dir / "kube-apiserver",
            kube_controller_manager=bin_dir / "kube-controller-manager",
        )
        missing = [str(p) for p in dataclasses.astuple(binaries) if not os.access(p, os.X_OK)]
        if missing:
            raise ControlPlaneError(f"not executable or missing: {', '.join(missing)}")
        return binaries


@dataclasses.dataclass(frozen=True)
class ControlPlaneSettings:
    """How the control plane is started and stopped."""

    host: str = "127.0.0.1"
    """The loopback address every component binds to."""

    start_timeout: float = 120.0
    """Seconds to wait for each component to report healthy."""

    stop_timeout: float = 15.0
    """Seconds a component gets to exit after SIGTERM before it is killed."""

    service_cluster_ip_range: str = "10.96.0.0/16"
    """Service ClusterIPs are allocated from here (never routed: no kube-proxy)."""

    verbosity: int = 1
    """klog ``-v`` of the apiserver and the controller-manager."""


@dataclasses.dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager as child processes.

    ``start()`` returns once the apiserver's ``/readyz`` and the
    controller-manager's ``/healthz`` answer ``ok``; ``stop()`` terminates the
    processes by PID (SIGTERM, then SIGKILL after ``stop_timeout``). Both are
    idempotent, and the object is a context manager.
    """

    def __init__(
        self,
        binaries: Binaries,
        workdir: Path,
        settings: ControlPlaneSettings | None = None,
    ) -> None:
        self._binaries = binaries
        self._workdir = workdir
        self._settings = settings or ControlPlaneSettings()
        self._components: list[_Component] = []
        self._apiserver_port: int | None = None

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (exists once ``start()`` has returned)."""
        return self._workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        """The apiserver's URL."""
        if self._apiserver_port is None:
            raise ControlPlaneError("the control plane is not started")
        return f"https://{self._settings.host}:{self._apiserver_port}"

    @property
    def pids(self) -> dict[str, int]:
        """PID of each running component, by name."""
        return {c.name: c.process.pid for c in self._components if c.process.poll() is None}

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if self._components:
            return
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every component; the controller-manager and apiserver before etcd."""
        running, self._components = self._components, []
        etcd = [c for c in running if c.name == "etcd"]
        _terminate([c for c in running if c.name != "etcd"], self._settings.stop_timeout)
        _terminate(etcd, self._settings.stop_timeout)

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The last lines a component logged (``etcd``, ``kube-apiserver``, ...)."""
        return _tail(self._workdir / "logs" / f"{name}.log", lines)

    # -- starting -------------------------------------------------------------

    def _start(self) -> None:
        settings = self._settings
        host = settings.host
        self._workdir.mkdir(parents=True, exist_ok=True)
        (self._workdir / "logs").mkdir(exist_ok=True)
        pki = _Pki.create(self._workdir / "pki", host)

        etcd_client, etcd_peer, apiserver, kcm = _free_ports(host, 4)
        self._apiserver_port = apiserver
        self.kubeconfig.write_text(
            _kubeconfig(self.server, pki.ca_cert, pki.admin_cert, pki.admin_key, ADMIN_USER)
        )
        kcm_kubeconfig = self._workdir / "kube-controller-manager.kubeconfig"
        kcm_kubeconfig.write_text(
            _kubeconfig(
                self.server,
                pki.ca_cert,
                pki.kcm_cert,
                pki.kcm_key,
                "system:kube-controller-manager",
            )
        )

        etcd_url = f"http://{host}:{etcd_client}"
        peer_url = f"http://{host}:{etcd_peer}"
        self._spawn(
            "etcd",
            [
                str(self._binaries.etcd),
                "--name=tandem",
                f"--data-dir={self._workdir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=tandem={peer_url}",
                "--initial-cluster-state=new",
                # Test data: losing it on a crash costs nothing, fsync costs seconds.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait_healthy("etcd", f"{etcd_url}/health", None, b'"health":"true"')

        self._spawn(
            "kube-apiserver",
            [
                str(self._binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={apiserver}",
                f"--cert-dir={self._workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_key}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={settings.service_cluster_ip_range}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--v={settings.verbosity}",
            ],
        )
        self._wait_healthy("kube-apiserver", f"{self.server}/readyz", pki.admin_context(), b"ok")

        self._spawn(
            "kube-controller-manager",
            [
                str(self._binaries.kube_controller_manager),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                f"--bind-address={host}",
                f"--secure-port={kcm}",
                f"--cert-dir={self._workdir / 'kcm-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={settings.service_cluster_ip_range}",
                # One instance: no lease to win, the controllers start at once.
                "--leader-elect=false",
                "--controllers=*",
                "--profiling=false",
                f"--v={settings.verbosity}",
            ],
        )
        self._wait_healthy(
            "kube-controller-manager", f"https://{host}:{kcm}/healthz", pki.admin_context(), b"ok"
        )
        logger.info("control plane ready at %s (kubeconfig %s)", self.server, self.kubeconfig)

    def _spawn(self, name: str, args: list[str]) -> None:
        log_path = self._workdir / "logs" / f"{name}.log"
        log_file = log_path.open("ab")
        try:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                # Own session: a Ctrl-C in the terminal reaches pytest, which then
                # stops these in order, instead of killing them all at once.
                start_new_session=True,
            )
        except OSError as exc:
            log_file.close()
            raise ControlPlaneError(f"cannot start {name}: {exc}") from exc
        self._components.append(_Component(name, process, log_path, log_file))
        logger.debug("started %s (pid %d)", name, process.pid)

    def _wait_healthy(
        self, name: str, url: str, context: ssl.SSLContext | None, expect: bytes
    ) -> None:
        component = next(c for c in self._components if c.name == name)
        deadline = time.monotonic() + self._settings.start_timeout
        last_error = "no answer yet"
        # An empty ProxyHandler: an http(s)_proxy in the environment must not see loopback.
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        while True:
            code = component.process.poll()
            if code is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {code} while starting; its log ends:\n"
                    + _tail(component.log_path, 40)
                )
            try:
                with opener.open(url, timeout=5) as response:
                    body: bytes = response.read()
                if expect in body:
                    return
                last_error = f"answered {body[:200]!r}"
            except OSError as exc:  # URLError, HTTPError and ssl errors among them
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{name} not healthy after {self._settings.start_timeout:.0f} s at {url} "
                    f"({last_error}); its log ends:\n" + _tail(component.log_path, 40)
                )
            time.sleep(_POLL_INTERVAL)


def _terminate(components: list[_Component], timeout: float) -> None:
    for c in components:
        if c.process.poll() is None:
            c.process.terminate()
    deadline = time.monotonic() + timeout
    for c in components:
        try:
            c.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM; killing it", c.name, c.process.pid)
            c.process.kill()
            c.process.wait()
        finally:
            c.log_file.close()


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _free_ports(host: str, count: int) -> list[int]:
    """Ports free right now, all distinct (held open together while picking)."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> str:
    """A kubeconfig with its credentials inline (JSON is valid YAML)."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode("ascii")

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "tandem",
                "cluster": {"server": server, "certificate-authority-data": b64(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)},
            }
        ],
        "contexts": [
            {
                "name": "tandem",
                "context": {"cluster": "tandem", "user": user, "namespace": "default"},
            }
        ],
        "current-context": "tandem",
        "preferences": {},
    }
    return json.dumps(config, indent=2) + "\n"


@dataclasses.dataclass(frozen=True)
class _Pki:
    """A throwaway CA and the certificates and keys signed by it (ECDSA P-256)."""

    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    kcm_cert: Path
    kcm_key: Path
    sa_key: Path

    @classmethod
    def create(cls, directory: Path, host: str) -> _Pki:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise ControlPlaneError("the openssl command is needed to make the test PKI")
        directory.mkdir(parents=True, exist_ok=True)
        d = directory

        def run(*args: str) -> None:
            result = subprocess.run(
                [openssl, *args], cwd=d, capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise ControlPlaneError(f"openssl {args[0]} failed: {result.stderr.strip()}")

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        run(
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-subj", "/CN=tandem-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )  # fmt: skip

        def leaf(name: str, subject: str, extensions: str) -> None:
            (d / f"{name}.ext").write_text(extensions)
            run(
                "req",
                "-new",
                *ec,
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.csr",
                "-subj",
                subject,
            )
            run(
                "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "365", "-out", f"{name}.crt",
                "-extfile", f"{name}.ext",
            )  # fmt: skip

        usage = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        sans = [f"IP:{host}", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]  # fmt: skip
        leaf(
            "serving",
            "/CN=kube-apiserver",
            usage + "extendedKeyUsage=serverAuth\nsubjectAltName=" + ",".join(sans) + "\n",
        )
        client = usage + "extendedKeyUsage=clientAuth\n"
        leaf("admin", f"/O=system:masters/CN={ADMIN_USER}", client)
        leaf("kcm", "/O=system:masters/CN=system:kube-controller-manager", client)
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key")
        for path in d.iterdir():
            if path.suffix in {".key"}:
                path.chmod(0o600)
        return cls(
            ca_cert=d / "ca.crt",
            serving_cert=d / "serving.crt",
            serving_key=d / "serving.key",
            admin_cert=d / "admin.crt",
            admin_key=d / "admin.key",
            kcm_cert=d / "kcm.crt",
            kcm_key=d / "kcm.key",
            sa_key=d / "sa.key",
        )

    def admin_context(self) -> ssl.SSLContext:
        """TLS for health checks: trust only the test CA, present the admin cert."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return context


def main(argv: list[str] | None = None) -> int:
    """Run a control plane until Ctrl-C: ``python -m e2e.k8s.controlplane BIN_DIR WORKDIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m e2e.k8s.controlplane", description=main.__doc__
    )
    parser.add_argument("bin_dir", type=Path, help="output of scripts/build-controlplane.sh")
    parser.add_argument("workdir", type=Path, help="where certs, data and logs go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM stops as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ControlPlane(Binaries.in_dir(args.bin_dir), args.workdir) as plane:
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
