"""RouterSettings loads what the operator writes, and what local mode builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tandem.operator import api, planning
from tandem.router import settings


def _pool(mode: str) -> api.InferencePool:
    return api.InferencePool.model_validate(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"model": {"name": "m", "servedName": "served"}, "mode": mode,
                     "router": {"policy": "prefix-aware", "autoThresholdTokens": 100}},
        }
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated", "auto"])
def test_loads_the_operators_config_unchanged(mode: str, tmp_path: Path) -> None:
    file = tmp_path / "router.json"
    file.write_text(json.dumps(planning.router_config(_pool(mode))))
    config = settings.load(file)
    assert config.served_model_name == "served"
    assert config.mode == mode
    assert config.policy == "prefix-aware"
    assert config.auto_threshold_tokens == 100
    assert isinstance(config.discovery, settings.KubernetesDiscovery)
    assert config.discovery.namespace == "ns"
    assert config.discovery.decode_service.endswith("decode")
    assert (config.discovery.prefill_service is None) == (mode == "aggregated")
    assert config.pool_label == "p"  # the pool's name, not its served model name


def test_static_settings_and_defaults() -> None:
    config = settings.static_settings(
        "m", prefill=["http://127.0.0.1:1"], decode=["http://127.0.0.1:2"], mode="auto"
    )
    assert isinstance(config.discovery, settings.StaticDiscovery)
    assert config.discovery.decode == ["http://127.0.0.1:2"]
    assert config.limits.max_body_bytes == 8 * 1024 * 1024
    assert config.limits.max_prompt_tokens is None
    assert config.retries.prefill == 1
    assert config.timeouts.first_byte > 0


def test_snake_case_overrides_work_in_static_settings() -> None:
    config = settings.static_settings("m", decode=["http://a:1"], max_queued_requests=3)
    assert config.max_queued_requests == 3


def test_unknown_fields_and_bad_urls_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        settings.RouterSettings.model_validate(
            {"servedModelName": "m", "discovery": {"kind": "static"}, "surprise": 1}
        )
    with pytest.raises(ValidationError, match="base URL"):
        settings.static_settings("m", decode=["127.0.0.1:8000"])


def test_api_keys_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "keys"
    file.write_text("# comment\nk1\n\n  k2  \n")
    monkeypatch.setenv("ROUTER_KEYS", "k3, k4,")
    auth = settings.AuthSettings(api_key_file=str(file), api_key_env="ROUTER_KEYS")
    assert auth.load_keys() == {"k1", "k2", "k3", "k4"}
    assert settings.AuthSettings().load_keys() == frozenset()
