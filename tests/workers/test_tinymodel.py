"""The tiny model builder: deterministic, local, loadable shape."""

from __future__ import annotations

import json
from pathlib import Path

from tandem.workers import tinymodel


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = tinymodel.build_tiny_model(tmp_path / "a", seed=3)
    b = tinymodel.build_tiny_model(tmp_path / "b", seed=3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_other_seed_gives_other_weights(tmp_path: Path) -> None:
    a = tinymodel.build_tiny_model(tmp_path / "a", seed=0)
    b = tinymodel.build_tiny_model(tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_hf_layout_with_a_chat_template(tmp_path: Path) -> None:
    path = tinymodel.build_tiny_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] >= 32  # vLLM's CPU attention needs head sizes of 32 and up
    assert (path / "tokenizer.json").exists()
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config or (path / "chat_template.jinja").exists()


def test_cache_builds_once(tmp_path: Path) -> None:
    first = tinymodel.cached_tiny_model(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = tinymodel.cached_tiny_model(tmp_path)
    assert again == first
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
