"""The roofline: step times against the formulas, written out again here."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from tandem.workers.emulator import timing

SHAPES = [
    # name, layers, hidden, heads, kv_heads, intermediate, vocab
    ("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256),
    ("tiny", 2, 128, 4, 2, 256, 1024),
    ("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256),
]


def _shape(row: tuple[str, int, int, int, int, int, int]) -> timing.ModelShape:
    name, layers, hidden, heads, kv_heads, inter, vocab = row
    return timing.ModelShape(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
    )


def _by_hand(row: tuple[str, int, int, int, int, int, int]) -> tuple[int, int, int]:
    """(layer params incl. final norm, LM head params, KV bytes per token) by hand."""
    _, layers, d, heads, kv_heads, inter, vocab = row
    head_dim = d // heads
    q = d * d
    kv = 2 * d * kv_heads * head_dim
    o = d * d
    mlp = 3 * d * inter
    norms = 2 * d
    return layers * (q + kv + o + mlp + norms) + d, vocab * d, 2 * layers * kv_heads * head_dim * 2


def test_llama_8b_is_8b_with_128k_of_kv_per_token() -> None:
    shape = timing.LLAMA_3_1_8B
    assert shape.param_count == pytest.approx(8.03e9, rel=1e-3)
    assert shape.kv_bytes_per_token == 128 * 1024
    assert timing.MODEL_SHAPES["llama-3.1-8b"] is shape
    assert timing.GPUS["H100"] is timing.H100


@pytest.mark.parametrize("row", SHAPES, ids=[r[0] for r in SHAPES])
def test_prefill_time_is_flops_over_effective_compute(
    row: tuple[str, int, int, int, int, int, int],
) -> None:
    shape, gpu = _shape(row), timing.H100
    layer_params, head_params, _ = _by_hand(row)
    layers, d = row[1], row[2]
    for tokens, context in [(1, 0), (512, 0), (2048, 1024)]:
        pairs = tokens * context + tokens * (tokens + 1) / 2
        flops = 2 * layer_params * tokens + 2 * head_params + 4 * layers * d * pairs
        expected = flops / (989.4e12 * 0.5)
        assert timing.prefill_time(shape, gpu, tokens, context) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("row", SHAPES, ids=[r[0] for r in SHAPES])
def test_decode_step_time_is_bytes_over_effective_bandwidth(
    row: tuple[str, int, int, int, int, int, int],
) -> None:
    shape, gpu = _shape(row), timing.H100
    layer_params, head_params, kv_per_token = _by_hand(row)
    for contexts in ([100], [1000] * 8, [4000, 10, 2000, 77]):
        weights = (layer_params + head_params) * 2
        kv = kv_per_token * sum(c + 1 for c in contexts)
        expected = (weights + kv) / (3.35e12 * 0.65)
        assert timing.decode_step_time(shape, gpu, contexts) == pytest.approx(expected, rel=1e-9)


def test_known_values_for_llama_8b_on_h100() -> None:
    shape, gpu = timing.LLAMA_3_1_8B, timing.H100
    # ~15 GB of weights over 2.18 TB/s: a decode step of one short sequence takes ~6.9 ms.
    assert timing.decode_step_time(shape, gpu, [0]) == pytest.approx(6.9e-3, rel=0.01)
    # 1000 prompt tokens: ~15 TFLOP over ~495 TFLOP/s, ~29 ms.
    assert timing.prefill_time(shape, gpu, 1000) == pytest.approx(28.75e-3, rel=0.01)


def test_step_time_is_the_roofline_of_a_mixed_batch() -> None:
    shape, gpu = timing.LLAMA_3_1_8B, timing.H100
    decodes = [timing.SeqWork(1, 1000)] * 16
    prefill = timing.SeqWork(2048, 0)
    # A decode-only batch is memory-bound: its time is the bandwidth term.
    assert timing.step_time(shape, gpu, decodes) == pytest.approx(
        timing.decode_step_time(shape, gpu, [1000] * 16)
    )
    # A long prefill is compute-bound: its time is the compute term.
    assert timing.step_time(shape, gpu, [prefill]) == pytest.approx(
        timing.prefill_time(shape, gpu, 2048)
    )
    mixed = [*decodes, prefill]
    compute = timing.step_flops(shape, mixed) / gpu.effective_flops
    memory = timing.step_bytes(shape, mixed) / gpu.effective_bandwidth
    assert timing.step_time(shape, gpu, mixed) == max(compute, memory)
    # Decodes riding along a long prefill wait as long as the prefill: the interference
    # that disaggregation removes.
    assert timing.step_time(shape, gpu, mixed) > 5 * timing.step_time(shape, gpu, decodes)
    assert timing.step_time(shape, gpu, []) == 0.0


def test_kv_capacity_is_memory_budget_minus_weights() -> None:
    shape, gpu = timing.LLAMA_3_1_8B, timing.H100
    tokens = timing.kv_capacity_tokens(shape, gpu, 0.9)
    assert tokens == math.floor((80 * 1024**3 * 0.9 - shape.weight_bytes) / 131072)
    assert timing.kv_capacity_blocks(shape, gpu, 16, 0.9) == tokens // 16
    assert 400_000 < tokens < 500_000


def test_a_model_that_does_not_fit_is_an_error() -> None:
    seventy = _shape(SHAPES[2])
    with pytest.raises(ValueError, match="does not fit"):
        timing.kv_capacity_tokens(seventy, timing.H100)


def test_kv_transfer_time() -> None:
    assert timing.kv_transfer_time(25e9, 25e9) == pytest.approx(1.0)
    assert timing.kv_transfer_time(0, 1e9, latency=0.002) == pytest.approx(0.002)
    with pytest.raises(ValueError, match="link_bandwidth"):
        timing.kv_transfer_time(1, 0)


def test_bad_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="mfu"):
        timing.GpuSpec("x", peak_flops=1, memory_bandwidth=1, memory_bytes=1, mfu=1.5)
    with pytest.raises(ValueError, match="heads"):
        timing.ModelShape("x", hidden_size=100, num_heads=3)


def test_h100_defaults_agree_with_the_measurement_on_a_real_h100() -> None:
    """``measurements/h100-llama-3.1-8b.json`` came from ``python -m
    tandem.workers.emulator.calibration`` on an H100 80GB HBM3; the roofline with the
    default mfu/mbu must stay within 20% of it wherever the GPU, not Python, was the
    bottleneck (prefills of 1k+ tokens, CUDA-graphed decode steps)."""
    path = pathlib.Path(timing.__file__).parent / "measurements" / "h100-llama-3.1-8b.json"
    report = json.loads(path.read_text())
    assert report["device"].startswith("NVIDIA H100")
    shape, gpu = timing.LLAMA_3_1_8B, timing.H100
    checked = 0
    for row in report["rows"]:
        if row["kind"] == "prefill":
            if row["tokens"] < 1024:
                continue  # eager PyTorch launch overhead, not the GPU
            predicted = timing.step_time(shape, gpu, [timing.SeqWork(row["tokens"], 0)])
        else:
            works = [timing.SeqWork(1, row["context"])] * row["batch"]
            predicted = timing.step_time(shape, gpu, works)
        assert predicted * 1e3 == pytest.approx(row["measured_ms"], rel=0.2), row
        checked += 1
    assert checked >= 10
