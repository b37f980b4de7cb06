"""Offline validation of InferencePool manifests: the verdicts the CRD gives.

``tandem validate`` and the planner both parse pools through here, so a
manifest that passes offline is one the API server accepts, and the other way
round (the ``k8s`` test tier applies the same invalid manifests to a real API
server and compares).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from . import api


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, at a field path."""

    source: str
    """File name, and the document's index when the file holds several."""
    path: str
    """Dotted field path, e.g. ``spec.prefill.replicas``."""
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.message}"


class InvalidPoolError(ValueError):
    """A manifest that is not a valid InferencePool."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


_MESSAGES = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
}


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(error: Mapping[str, Any]) -> str:
    kind = str(error["type"])
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind != "value_error" and "input" in error and not isinstance(error["input"], dict):
        message += f" (got {error['input']!r})"
    return message


def problems_from(exc: ValidationError, source: str) -> list[Problem]:
    out = []
    for error in exc.errors(include_url=False):
        loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
        out.append(Problem(source, _path(loc), _message(error)))
    return out


def parse_pool(doc: Mapping[str, Any], source: str = "<input>") -> api.InferencePool:
    """A validated pool, or :class:`InvalidPoolError` listing every problem."""
    if not isinstance(doc, Mapping):
        raise InvalidPoolError([Problem(source, "", "a manifest must be a YAML mapping")])
    if doc.get("apiVersion") != api.API_VERSION or doc.get("kind") != api.KIND:
        raise InvalidPoolError(
            [
                Problem(
                    source,
                    "",
                    f"not an InferencePool (apiVersion {doc.get('apiVersion')!r}, "
                    f"kind {doc.get('kind')!r}); expected {api.API_VERSION} {api.KIND}",
                )
            ]
        )
    try:
        return api.InferencePool.model_validate(dict(doc))
    except ValidationError as exc:
        raise InvalidPoolError(problems_from(exc, source)) from exc


@dataclass(frozen=True)
class Document:
    source: str
    body: Any


def read_documents(path: Path) -> Iterator[Document]:
    """Every non-empty YAML document in a file, labelled ``file`` or ``file#N``."""
    text = path.read_text(encoding="utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for index, body in enumerate(docs):
        source = str(path) if len(docs) == 1 else f"{path}#{index}"
        yield Document(source, body)


def is_pool(doc: Any) -> bool:
    return isinstance(doc, Mapping) and doc.get("kind") == api.KIND


def load_pools(path: Path) -> list[api.InferencePool]:
    """The pools in a file; :class:`InvalidPoolError` if any is invalid or none is there."""
    pools: list[api.InferencePool] = []
    problems: list[Problem] = []
    for doc in read_documents(path):
        if not is_pool(doc.body):
            continue
        try:
            pools.append(parse_pool(doc.body, doc.source))
        except InvalidPoolError as exc:
            problems.extend(exc.problems)
    if not pools and not problems:
        problems.append(Problem(str(path), "", f"no {api.KIND} found in the file"))
    if problems:
        raise InvalidPoolError(problems)
    return pools


def validate_files(paths: list[Path]) -> list[Problem]:
    """Every problem in every file; empty when all are valid pools."""
    problems: list[Problem] = []
    for path in paths:
        try:
            load_pools(path)
        except InvalidPoolError as exc:
            problems.extend(exc.problems)
        except (OSError, yaml.YAMLError) as exc:
            problems.append(Problem(str(path), "", f"cannot read: {exc}"))
    return problems
