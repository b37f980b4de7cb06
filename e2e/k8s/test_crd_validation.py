"""The CRD on a real API server: installs, explains itself, rejects nonsense.

Every manifest in tests/manifests/invalid/ starts with ``# expect: FIELD | MESSAGE``
(the verdict ``tandem validate`` gives offline). The API server words its errors
its own way, so the test asserts that the field path appears in its answer, and,
where the rule is one of the CRD's CEL rules, that its message does too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.operator import crd, validation

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / crd.CRD_FILENAME
INVALID = sorted((ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
KUBECTL = "kubectl"


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBECTL, f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _cel_messages(node: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", []):
            out.add(rule["message"])
        for value in node.values():
            out |= _cel_messages(value)
    elif isinstance(node, list):
        for value in node:
            out |= _cel_messages(value)
    return out


CEL_MESSAGES = _cel_messages(crd.crd())


def expectation(path: Path) -> tuple[str, str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect:"), f"{path.name}: first line must be '# expect: ...'"
    field, _, message = first.removeprefix("# expect:").partition("|")
    return field.strip(), message.strip()


@pytest.fixture(scope="module")
def crd_installed(kubeconfig: Path) -> Path:
    applied = kubectl(
        kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE)
    )
    assert applied.returncode == 0, applied.stderr
    established = kubectl(
        kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
        f"crd/{crd.crd()['metadata']['name']}",
    )  # fmt: skip
    assert established.returncode == 0, established.stderr
    return kubeconfig


@pytest.mark.parametrize("manifest", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(crd_installed: Path, manifest: Path) -> None:
    field, message = expectation(manifest)
    result = kubectl(
        crd_installed, "apply", "--server-side", "--dry-run=server", "-f", str(manifest)
    )
    assert result.returncode != 0, f"the API server accepted {manifest.name}"
    answer = result.stderr
    assert field in answer, f"{field!r} not named in: {answer}"
    if any(message in cel for cel in CEL_MESSAGES):
        assert message in answer, f"CEL message {message!r} not in: {answer}"


@pytest.mark.parametrize("manifest", INVALID, ids=[p.stem for p in INVALID])
def test_offline_validation_agrees(manifest: Path) -> None:
    field, message = expectation(manifest)
    problems = validation.validate_files([manifest])
    assert problems, f"tandem validate accepted {manifest.name}"
    assert any(p.path == field and message in p.message for p in problems), problems


@pytest.mark.parametrize("manifest", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_accepted(crd_installed: Path, manifest: Path) -> None:
    doc = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    doc["metadata"]["namespace"] = "default"  # dry run: the example's namespace need not exist
    result = kubectl(
        crd_installed, "apply", "--server-side", "--dry-run=server", "-o", "yaml", "-f", "-",
        stdin=yaml.safe_dump(doc),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    stored = yaml.safe_load(result.stdout)
    # The API server's defaults are the models' defaults.
    parsed = validation.parse_pool(stored)
    assert parsed.spec == validation.parse_pool(doc).spec


def test_defaults_fill_an_almost_empty_pool(crd_installed: Path) -> None:
    doc = {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "bare", "namespace": "default"},
        "spec": {"model": {"name": "m"}},
    }
    result = kubectl(
        crd_installed, "apply", "--server-side", "--dry-run=server", "-o", "yaml", "-f", "-",
        stdin=yaml.safe_dump(doc),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    spec = yaml.safe_load(result.stdout)["spec"]
    assert spec["prefill"]["replicas"] == {"min": 1, "max": 1}
    assert spec["mode"] == "disaggregated"
    assert spec["slo"] == {
        "ttft": "1s",
        "tpot": "100ms",
        "percentile": 90,
        "attainmentWindow": "5m",
    }
    assert validation.parse_pool({**doc, "spec": spec}).spec == validation.parse_pool(doc).spec


def test_explain_shows_the_field_descriptions(crd_installed: Path) -> None:
    result = kubectl(crd_installed, "explain", "inferencepool.spec.slo.ttft")
    assert result.returncode == 0, result.stderr
    assert "Time to first token objective" in result.stdout


def test_short_name_and_category(crd_installed: Path) -> None:
    for name in ("tpool", "tandem"):
        result = kubectl(crd_installed, "get", name, "--all-namespaces")
        assert result.returncode == 0, result.stderr
