"""Generates the InferencePool CRD from the pydantic models in :mod:`.api`.

The API server wants a *structural* OpenAPI v3 schema: every node typed, no
``$ref``, no ``const``, ``nullable`` instead of ``anyOf [X, null]``,
``exclusiveMinimum`` as a boolean, no ``additionalProperties`` beside
``properties``. :func:`structural` rewrites pydantic's JSON Schema into that
shape; cross-field :class:`~.api.Rule` objects become ``x-kubernetes-validations``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from . import api

JsonSchema = dict[str, Any]

CRD_FILENAME = f"{api.PLURAL}.{api.GROUP}.yaml"

_DROP = frozenset({"title"})


def _rule_owners() -> dict[str, type[api._Model]]:
    owners: dict[str, type[api._Model]] = {}
    stack: list[type[api._Model]] = [api._Model]
    while stack:
        cls = stack.pop()
        owners[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return owners


def structural(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Rewrite one pydantic JSON Schema node (and its children) structurally."""
    owners = _rule_owners()

    def walk(n: JsonSchema) -> JsonSchema:
        n = dict(n)
        rules: list[dict[str, str]] = []
        if "$ref" in n:
            name = n.pop("$ref").rsplit("/", 1)[-1]
            target = dict(defs[name])
            target.update(n)  # the use site's description/default win
            owner = owners.get(name)
            if owner is not None:
                rules = [r.schema() for r in owner.rules]
            n = target
        if "allOf" in n and len(n["allOf"]) == 1:
            inner = n.pop("allOf")[0]
            n = {**walk(inner), **n}
        if "anyOf" in n and not n.get("x-kubernetes-int-or-string"):
            options = [o for o in n.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express a union structurally: {options}")
            n = {**walk(options[0]), **n, "nullable": True}
        out: JsonSchema = {}
        for key, value in n.items():
            if key in _DROP:
                continue
            if key == "default" and value is None:
                continue
            if key == "const":
                out["enum"] = [value]
                out.setdefault("type", "string")
            elif key == "properties":
                out[key] = {k: walk(v) for k, v in value.items()}
            elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
                out[key] = walk(value)
            elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[bound] = value
                out[key] = True
            elif key == "additionalProperties" and value is False:
                continue
            else:
                out[key] = copy.deepcopy(value)
        if "properties" in out:
            out.setdefault("type", "object")
            required = set(out.get("required", ()))
            for prop_name, prop in out["properties"].items():
                # An optional sub-object whose fields all have defaults defaults to {}
                # so the API server fills in the nested defaults. Where the object has
                # CEL rules, the nested defaults are spelled out: the API server checks
                # a default against them, and `self.min <= self.max` fails on {}.
                if (
                    prop_name not in required
                    and prop.get("type") == "object"
                    and "properties" in prop
                    and not prop.get("required")
                    and "default" not in prop
                    and not prop.get("nullable")
                ):
                    prop["default"] = {
                        k: copy.deepcopy(v["default"])
                        for k, v in prop["properties"].items()
                        if "default" in v and "x-kubernetes-validations" in prop
                    }
        if rules:
            out["x-kubernetes-validations"] = out.get("x-kubernetes-validations", []) + rules
        return out

    return walk(node)


def _model_schema(model: type[api._Model]) -> JsonSchema:
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    schema = structural(raw, defs)
    schema["x-kubernetes-validations"] = schema.get("x-kubernetes-validations", []) + [
        r.schema() for r in model.rules
    ]
    if not schema["x-kubernetes-validations"]:
        del schema["x-kubernetes-validations"]
    return schema


def openapi_schema() -> JsonSchema:
    """The whole ``openAPIV3Schema`` of the InferencePool CRD."""
    spec = _model_schema(api.InferencePoolSpec)
    status = _model_schema(api.InferencePoolStatus)
    return {
        "type": "object",
        "description": api.InferencePoolSpec.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "tandem.dev/v1alpha1"},
            "kind": {"type": "string", "description": "InferencePool"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {api.MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters: "
                "it prefixes the names of the pool's Deployments and Services",
            }
        ],
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
    {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.summary",
     "description": "Prefill workers ready/desired"},
    {"name": "Decode", "type": "string", "jsonPath": ".status.decode.summary",
     "description": "Decode workers ready/desired"},
    {"name": "TTFT", "type": "string", "jsonPath": ".status.observed.ttft",
     "description": "Observed time to first token at the SLO percentile"},
    {"name": "TPOT", "type": "string", "jsonPath": ".status.observed.tpot",
     "description": "Observed time per output token at the SLO percentile"},
    {"name": "SLO", "type": "string", "jsonPath": ".status.slo.summary",
     "description": "Share of the recent requests that met both objectives"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]  # fmt: skip


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "tandem"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": list(api.CATEGORIES),
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `tandem crd` from operator/api.py. Do not edit by hand.\n"


def render_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


def write(directory: Path) -> Path:
    path = directory / CRD_FILENAME
    path.write_text(render_yaml(), encoding="utf-8")
    return path
