"""Local mode: the pure planning of workers and status, and `tandem up` against emulator processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tandem.autoscaling import signals
from tandem.local import planning, status
from tandem.operator import api

ROOT = Path(__file__).resolve().parents[2]


def _pool(mode: str = "disaggregated", **spec: object) -> api.InferencePool:
    return api.InferencePool.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "p"},
         "spec": {"model": {"name": "tandem/tiny-llama"}, "mode": mode, **spec}}
    )  # fmt: skip


def test_workers_follow_replicas_min_per_role() -> None:
    pool = _pool(
        prefill={"replicas": {"min": 2, "max": 3}}, decode={"replicas": {"min": 1, "max": 2}}
    )
    plans = planning.plan_workers(pool, [9001, 9002, 9003], cores=2)
    assert [(p.role, p.name, p.port, p.cpus) for p in plans] == [
        ("prefill", "prefill-0", 9001, "0"),
        ("prefill", "prefill-1", 9002, "1"),
        ("decode", "decode-0", 9003, "0"),
    ]


def test_aggregated_pool_starts_decode_workers_only() -> None:
    plans = planning.plan_workers(_pool("aggregated"), [9001], cores=2)
    assert [p.role for p in plans] == ["decode"]


def test_replicas_override_and_port_shortage() -> None:
    plans = planning.plan_workers(_pool(), [1, 2, 3], cores=0, replicas={"decode": 2})
    assert [p.role for p in plans] == ["prefill", "decode", "decode"]
    assert all(p.cpus is None for p in plans)
    with pytest.raises(ValueError, match="need 3 ports"):
        planning.plan_workers(_pool(), [1, 2], cores=2, replicas={"decode": 2})


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([(0.1, 5.0), (0.2, 10.0), (float("inf"), 10.0)], 0.5, 0.1),
        ([(0.1, 0.0), (0.2, 10.0), (float("inf"), 10.0)], 0.5, 0.15),
        ([(0.1, 0.0), (float("inf"), 4.0)], 0.9, 0.1),
        ([(0.1, 0.0), (float("inf"), 0.0)], 0.9, None),
        ([], 0.9, None),
    ],
)
def test_histogram_quantile_matches_promql(
    buckets: list[tuple[float, float]], q: float, expected: float | None
) -> None:
    got = signals.histogram_quantile(buckets, q)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_status_line() -> None:
    snap = status.Snapshot(
        ready={"prefill": 1, "decode": 2}, total={"prefill": 1, "decode": 2},
        queue=3, ttft=0.42, tpot=0.012, requests=17,
    )  # fmt: skip
    assert (
        snap.line(90)
        == "prefill 1/1 · decode 2/2 · queue 3 · TTFT p90 420ms · TPOT p90 12ms · requests 17"
    )
    empty = status.Snapshot(
        ready={"decode": 0}, total={"decode": 1}, queue=0, ttft=None, tpot=None, requests=0
    )
    assert "TTFT p99.9 -" in empty.line(99.9)


def test_local_mode_never_downloads(tmp_path: Path) -> None:
    pool = api.InferencePool.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "p"},
         "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}}}
    )  # fmt: skip
    with pytest.raises(planning.LocalModeError, match="never downloads"):
        planning.resolve_model(pool, planning.LocalSettings(run_dir=tmp_path / "run"))
    weights = tmp_path / "weights"
    weights.mkdir()
    pool = pool.model_copy(
        update={
            "spec": pool.spec.model_copy(
                update={"model": api.ModelSpec(name="x", path=str(weights))}
            )
        }
    )
    assert planning.resolve_model(pool, planning.LocalSettings(run_dir=tmp_path / "run")) == str(
        weights
    )


def test_tandem_up_with_the_emulator_streams_a_disaggregated_request(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "up", "examples/tiny.yaml", "--engine", "emulator",
         "--exit-after-demo", "--port", "0", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("ready in ") for line in lines)
    demo = lines[lines.index(next(x for x in lines if x.startswith("demo:"))) + 1]
    assert demo.split()
    assert all(word.startswith("tok") for word in demo.split())
    evidence = next(x for x in lines if x.startswith("decode workers:"))
    tokens = float(evidence.split()[2])
    assert tokens > 0, evidence
    assert evidence.endswith("(emulated: no KV moved)"), evidence
    assert any("emulator makes up its tokens" in x for x in lines)
    # Not a terminal: one progress line per phase change, no control characters.
    progress = [x for x in lines if x.lstrip().startswith(("prefill-0", "decode-0"))]
    assert any(x.split()[3:4] == ["ready"] for x in progress), progress
    assert any(" started in " in x for x in progress), progress
    assert not any("\x1b" in x for x in lines)
    assert (tmp_path / "run" / "prefill-0" / "worker.log").exists()


def test_tandem_up_rejects_an_invalid_pool() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "up", "tests/manifests/invalid/bad-mode.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "spec.mode" in result.stderr
