"""`tandem validate`: the examples pass, each invalid manifest fails naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.operator import validation

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))


def expectation(path: Path) -> tuple[str, str]:
    """The ``# expect: FIELD | MESSAGE PART`` header of an invalid manifest."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path} lacks its expect header"
    field, _, message = first.removeprefix("# expect: ").partition(" | ")
    return field.strip(), message.strip()


def test_there_are_examples_and_invalid_cases() -> None:
    assert len(EXAMPLES) >= 2
    assert len(INVALID) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    assert validation.validate_files([path]) == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_manifest_names_its_field(path: Path) -> None:
    field, message = expectation(path)
    problems = validation.validate_files([path])
    assert len(problems) == 1, problems
    assert problems[0].path == field
    assert message in problems[0].message
    assert str(problems[0]).startswith(f"{path}: {field}: ")


def test_every_problem_in_a_file_is_reported(tmp_path: Path) -> None:
    doc = tmp_path / "two.yaml"
    doc.write_text(
        "apiVersion: tandem.dev/v1alpha1\nkind: InferencePool\nmetadata: {name: a}\n"
        "spec: {model: {name: m}, mode: nope, slo: {ttft: soon}}\n"
        "---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ignored}\n"
    )
    problems = validation.validate_files([doc])
    assert sorted(p.path for p in problems) == ["spec.mode", "spec.slo.ttft"]
    assert all(p.source == f"{doc}#0" for p in problems)


def test_a_file_without_pools_is_a_problem(tmp_path: Path) -> None:
    doc = tmp_path / "none.yaml"
    doc.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    (problem,) = validation.validate_files([doc])
    assert "no InferencePool" in problem.message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    problems = validation.validate_files([tmp_path / "missing.yaml", broken])
    assert [p.source for p in problems] == [str(tmp_path / "missing.yaml"), str(broken)]
    assert all("cannot read" in p.message for p in problems)


def test_wrong_api_version_is_named(tmp_path: Path) -> None:
    doc = tmp_path / "v2.yaml"
    doc.write_text(
        "apiVersion: tandem.dev/v2\nkind: InferencePool\nmetadata: {name: a}\nspec: {}\n"
    )
    (problem,) = validation.validate_files([doc])
    assert "expected tandem.dev/v1alpha1 InferencePool" in problem.message
