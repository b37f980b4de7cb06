"""The InferencePool models: defaults, rules, durations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tandem.operator import api


def _pool(**spec: object) -> api.InferencePool:
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "p"},
        "spec": {"model": {"name": "m"}, **spec},
    }
    return api.InferencePool.model_validate(body)


def test_defaults_fill_every_section() -> None:
    pool = _pool()
    assert pool.spec.mode == "disaggregated"
    assert pool.spec.prefill.replicas.min == 1
    assert pool.spec.decode.replicas.max == 1
    assert pool.spec.slo.ttft == "1s"
    assert pool.spec.autoscaling.policy == "slo"
    assert pool.spec.router.policy == "least-load"
    assert pool.spec.model.effective_served_name == "m"
    assert pool.namespace == "default"


def test_aggregated_pool_has_no_prefill_role() -> None:
    assert _pool(mode="aggregated").roles() == ("decode",)
    assert _pool(mode="auto").roles() == ("prefill", "decode")


def test_pvc_sets_the_model_path() -> None:
    pool = _pool(model={"name": "org/m", "pvc": "weights"})
    assert pool.spec.model.effective_path == "/models"
    assert _pool(model={"name": "org/m", "path": "/w"}).spec.model.effective_path == "/w"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert api.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 s", "-1s", "1d", "ms"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        api.parse_duration(text)


def test_format_duration_round_trips_for_display() -> None:
    assert api.format_duration(0.42) == "420ms"
    assert api.format_duration(2.5) == "2.5s"
    assert api.parse_duration(api.format_duration(0.05)) == pytest.approx(0.05)


def test_replica_rule_reports_the_range() -> None:
    with pytest.raises(ValidationError) as info:
        _pool(prefill={"replicas": {"min": 4, "max": 2}})
    (error,) = info.value.errors()
    assert error["loc"] == ("spec", "prefill", "replicas")
    assert "replicas.min must be less than or equal to replicas.max" in error["msg"]


def test_gpu_budget_counts_tensor_parallel_gpus() -> None:
    spec = {
        "prefill": {"replicas": {"min": 1, "max": 2}, "tensorParallelSize": 2},
        "decode": {"replicas": {"min": 2, "max": 4}},
    }
    assert _pool(**spec, autoscaling={"gpuBudget": 4}).spec.autoscaling.gpu_budget == 4
    with pytest.raises(ValidationError, match="gpuBudget is smaller"):
        _pool(**spec, autoscaling={"gpuBudget": 3})


def test_every_rule_has_a_cel_twin_and_a_message() -> None:
    models: list[type[api._Model]] = [api.ReplicaRange, api.InferencePoolSpec]
    rules = [rule for model in models for rule in model.rules]
    assert len(rules) == 3
    for rule in rules:
        assert rule.cel
        assert rule.message
        assert rule.schema() == {"rule": rule.cel, "message": rule.message}


def test_quantities_accept_ints_and_suffixes() -> None:
    pool = _pool(
        decode={"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi", "cpu": "500m"}}}
    )
    assert pool.spec.decode.resources.limits["memory"] == "16Gi"
