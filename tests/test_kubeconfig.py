"""tandem.kubeconfig: the one loader of kubeconfig files and service accounts."""

from __future__ import annotations

import base64
import json
import stat
import sys
from pathlib import Path

import pytest

from tandem import kubeconfig


def _write(tmp_path: Path, user: dict[str, object], cluster: dict[str, object]) -> Path:
    config = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "team"}}],
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


def test_inline_data_lands_in_private_files(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n"
    data = base64.b64encode(pem).decode()
    path = _write(
        tmp_path,
        {"client-certificate-data": data, "client-key-data": data},
        {"server": "https://h:6443/", "certificate-authority-data": data},
    )
    creds = kubeconfig.load(path)
    assert (creds.server, creds.namespace) == ("https://h:6443", "team")
    for file in (creds.ca_file, creds.cert_file, creds.key_file):
        assert file is not None
        assert Path(file).read_bytes() == pem
        assert stat.S_IMODE(Path(file).stat().st_mode) == 0o600


def test_a_token_file_is_read_on_every_request(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    creds = kubeconfig.load(_write(tmp_path, {"tokenFile": str(token)}, {"server": "http://h"}))
    assert creds.authorization() == "Bearer one"
    token.write_text("two\n")
    assert creds.authorization() == "Bearer two"
    assert creds.ssl_context() is None


def test_an_exec_plugin_gives_the_token(tmp_path: Path) -> None:
    script = tmp_path / "plugin.py"
    script.write_text(
        "import json, os\n"
        "print(json.dumps({'kind': 'ExecCredential', 'status': {'token': os.environ['T']}}))\n"
    )
    user = {"exec": {"command": sys.executable, "args": [str(script)],
                     "env": [{"name": "T", "value": "from-plugin"}]}}  # fmt: skip
    creds = kubeconfig.load(_write(tmp_path, user, {"server": "http://h"}))
    assert creds.authorization() == "Bearer from-plugin"


def test_a_missing_context_says_which(tmp_path: Path) -> None:
    path = _write(tmp_path, {"token": "t"}, {"server": "http://h"})
    with pytest.raises(kubeconfig.KubeconfigError, match="no context named 'other'"):
        kubeconfig.load(path, context="other")


def test_in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("tandem-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    creds = kubeconfig.in_cluster(tmp_path)
    assert creds.server == "https://10.0.0.1:443"
    assert creds.namespace == "tandem-system"
    assert creds.authorization() == "Bearer sa-token"
    assert creds.ca_file == str(tmp_path / "ca.crt")
