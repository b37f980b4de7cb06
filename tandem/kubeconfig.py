"""Where the Kubernetes API server is and how to authenticate to it: the one loader of
kubeconfig files and in-cluster service accounts, for the operator and the router.

It reads what the clusters this project meets write: a server URL; a CA as a file or
inline (``certificate-authority-data``) or ``insecure-skip-tls-verify``; a client
certificate and key as files or inline; a bearer token, a ``tokenFile`` (re-read on
every request: in-cluster tokens rotate) or an ``exec`` credential plugin (EKS, GKE,
OIDC helpers: run again when the token it gave expires); the context's namespace.
``KUBECONFIG`` may list several files; the first one that exists is read.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SERVICE_ACCOUNT", "Credentials", "KubeconfigError", "auto", "in_cluster", "load"]

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeconfigError(ValueError):
    """The kubeconfig cannot be used as it is; the message says what is wrong."""


@dataclass(frozen=True)
class ExecPlugin:
    """A ``users[].user.exec`` credential plugin."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def token(self) -> str | None:
        with self._lock:
            expires = self._cache.get("expires")
            if "token" in self._cache and (expires is None or expires > _now()):
                token: str | None = self._cache["token"]
                return token
            env = {**os.environ, **dict(self.env)}
            done = subprocess.run(
                [self.command, *self.args], capture_output=True, text=True, env=env,
                timeout=60, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise KubeconfigError(
                    f"credential plugin {self.command} exited {done.returncode}: "
                    f"{done.stderr.strip()[-300:]}"
                )
            status = json.loads(done.stdout).get("status") or {}
            stamp = status.get("expirationTimestamp")
            self._cache["token"] = status.get("token")
            self._cache["expires"] = (
                datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
            )
            return self._cache["token"]  # type: ignore[no-any-return]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Credentials:
    """The API server and how to authenticate to it."""

    server: str
    ca_file: str | None = None
    """The CA bundle (inline ``*-data`` is written to a private file when loaded)."""
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    token: str | None = None
    token_file: Path | None = None
    exec_plugin: ExecPlugin | None = None
    namespace: str | None = None
    """The context's namespace, or the pod's service account namespace."""

    def authorization(self) -> str | None:
        """The ``Authorization`` header value now (tokens rotate: ask per request)."""
        token = self.token
        if self.token_file is not None:
            token = self.token_file.read_text(encoding="utf-8").strip()
        elif self.exec_plugin is not None:
            token = self.exec_plugin.token()
        return f"Bearer {token}" if token else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS settings for an ``https://`` server; None for plain HTTP."""
        if not self.server.startswith("https://"):
            return None
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file and self.key_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def in_cluster(root: Path = SERVICE_ACCOUNT) -> Credentials:
    """The pod's service account (``KUBERNETES_SERVICE_HOST`` and its token)."""
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    namespace_file = root / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else None
    return Credentials(
        server=f"https://{host}:{port}",
        ca_file=str(root / "ca.crt"),
        token_file=root / "token",
        namespace=namespace or None,
    )


def default_path() -> Path:
    """``$KUBECONFIG`` (its first existing file) or ``~/.kube/config``."""
    for entry in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if entry and Path(entry).exists():
            return Path(entry)
    return Path.home() / ".kube" / "config"


def load(path: str | Path | None = None, context: str | None = None) -> Credentials:
    """The current (or named) context of a kubeconfig file."""
    file = Path(path) if path is not None else default_path()
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise KubeconfigError(f"cannot read kubeconfig {file}: {exc}") from exc
    name = context or config.get("current-context")
    ctx = _named(config.get("contexts"), name, "context")["context"]
    cluster = _named(config.get("clusters"), ctx.get("cluster"), "cluster")["cluster"]
    user = _named(config.get("users"), ctx["user"], "user")["user"] if ctx.get("user") else {}
    base = file.parent
    secret_dir: list[Path] = []

    def inline(data: str, filename: str) -> str:
        # ssl loads key pairs from files only: write them where only we can read.
        if not secret_dir:
            secret_dir.append(Path(tempfile.mkdtemp(prefix="tandem-kubeconfig-")))
        target = secret_dir[0] / filename
        target.write_bytes(base64.b64decode(data))
        target.chmod(0o600)
        return str(target)

    def relative(value: str | None) -> str | None:
        return None if value is None else str(base / value)

    cert = key = None
    if "client-certificate-data" in user:
        cert = inline(user["client-certificate-data"], "client.crt")
        key = inline(user["client-key-data"], "client.key")
    elif "client-certificate" in user:
        cert, key = relative(user["client-certificate"]), relative(user.get("client-key"))
    plugin = None
    if user.get("exec"):
        spec = user["exec"]
        plugin = ExecPlugin(
            command=spec["command"],
            args=tuple(spec.get("args") or ()),
            env=tuple((e["name"], e["value"]) for e in spec.get("env") or ()),
        )
    ca = relative(cluster.get("certificate-authority"))
    if "certificate-authority-data" in cluster:
        ca = inline(cluster["certificate-authority-data"], "ca.crt")
    token_file = user.get("tokenFile")
    return Credentials(
        server=str(cluster["server"]).rstrip("/"),
        ca_file=ca,
        cert_file=cert,
        key_file=key,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=user.get("token"),
        token_file=Path(token_file) if token_file else None,
        exec_plugin=plugin,
        namespace=ctx.get("namespace"),
    )


def auto(path: str | Path | None = None, context: str | None = None) -> Credentials:
    """In a pod (and no kubeconfig named): the service account; else the kubeconfig."""
    if path is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster()
    return load(path, context)


def _named(items: Any, name: str | None, what: str) -> Mapping[str, Any]:
    for item in items or []:
        if item.get("name") == name:
            found: Mapping[str, Any] = item
            return found
    raise KubeconfigError(f"kubeconfig has no {what} named {name!r}")
