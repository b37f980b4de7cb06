"""The generated CRD: no drift, structural, described, and valid Kubernetes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tandem.operator import crd

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "crds" / crd.CRD_FILENAME


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == crd.render_yaml(), (
        "crds/ drifted from operator/api.py: run `tandem crd`"
    )


def test_helm_chart_ships_the_same_crd() -> None:
    chart_crd = ROOT / "helm" / "tandem" / "crds" / crd.CRD_FILENAME
    if chart_crd.exists():
        assert chart_crd.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, child in node.get("properties", {}).items():
            out += _walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    schema = crd.openapi_schema()
    text = yaml.safe_dump(schema)
    assert "$ref" not in text
    assert "$defs" not in text
    assert "const:" not in text
    for path, node in _walk(schema):
        if node.get("x-kubernetes-int-or-string"):
            continue
        assert "type" in node, f"{path} has no type"
        assert "anyOf" not in node, f"{path} uses anyOf"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not isinstance(node.get("exclusiveMinimum"), (int, float)) or isinstance(
            node.get("exclusiveMinimum"), bool
        ), path


def test_every_spec_field_is_described() -> None:
    spec = crd.openapi_schema()["properties"]["spec"]
    for path, node in _walk(spec):
        if path and not path.endswith(("[]", "{}")):  # named fields, not list items or map values
            assert node.get("description"), f"spec{path} has no description"


def test_rules_and_defaults_are_present() -> None:
    spec = crd.openapi_schema()["properties"]["spec"]
    replicas = spec["properties"]["prefill"]["properties"]["replicas"]
    assert replicas["x-kubernetes-validations"][0]["rule"] == "self.min <= self.max"
    assert spec["properties"]["prefill"]["default"] == {}
    assert spec["properties"]["mode"]["enum"] == ["disaggregated", "aggregated", "auto"]
    ttft = spec["properties"]["slo"]["properties"]["ttft"]
    assert ttft["pattern"]
    assert ttft["x-kubernetes-validations"]
    assert {r["rule"] for r in spec["x-kubernetes-validations"]} >= {
        "self.decode.replicas.min >= 1"
    }


def test_printer_columns_show_both_pools_and_latencies() -> None:
    version = crd.crd()["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Mode", "Prefill", "Decode", "TTFT", "TPOT", "SLO", "Ready", "Age"]
    assert version["subresources"] == {"status": {}}


def test_crd_object_validates_against_kubernetes_openapi() -> None:
    kubernetes_validate.validate(crd.crd(), kubernetes_validate.latest_version(), strict=True)


def test_short_name_does_not_clash_with_gateway_api() -> None:
    names = crd.crd()["spec"]["names"]
    assert "inferencepool" not in names["shortNames"]
    assert "infpool" not in names["shortNames"]
