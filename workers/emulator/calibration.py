"""Measure a model-shaped forward pass on a real GPU and compare it with the roofline.

``python -m tandem.workers.emulator.calibration [--shape llama-3.1-8b] [--out FILE]``
needs PyTorch and a CUDA GPU (imported lazily; nothing else in the emulator does).
It builds random bf16 weights of the shape, times

* prefills of one sequence (T tokens: the matmuls, causal SDPA attention, and the LM
  head on the last position), and
* decode steps of B sequences over C cached tokens each (the matmuls and an
  attention that reads the KV cache), replayed from a CUDA graph as vLLM does,

and prints, for each, the time measured, the roofline's time at mfu = mbu = 1, and
the utilization they imply (``ideal / measured``): the values to put in
:class:`.timing.GpuSpec`'s ``mfu`` and ``mbu``. Elementwise work (norms, SiLU,
residuals) is included, RoPE and the KV-cache write are left out; this is a
lower bound on what a serving engine spends, so a real vLLM lands a little below.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tandem.workers.emulator import timing

__all__ = ["main"]


def _time_ms(torch: Any, fn: Callable[[], object], *, warmup: int = 3, repeat: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return float(statistics.median(samples))


class _Model:
    """Random weights of ``shape``, laid out as fused QKV and gate-up matrices."""

    def __init__(self, torch: Any, shape: timing.ModelShape) -> None:
        self.torch, self.shape = torch, shape
        d, hd = shape.hidden_size, shape.head_dim
        qkv = (shape.num_heads + 2 * shape.num_kv_heads) * hd
        opts = {"device": "cuda", "dtype": torch.bfloat16}
        std = 0.02
        self.layers = [
            (
                torch.randn(d, qkv, **opts) * std,
                torch.randn(shape.num_heads * hd, d, **opts) * std,
                torch.randn(d, 2 * shape.intermediate_size, **opts) * std,
                torch.randn(shape.intermediate_size, d, **opts) * std,
                torch.ones(d, **opts),
                torch.ones(d, **opts),
            )
            for _ in range(shape.num_layers)
        ]
        self.head = torch.randn(d, shape.vocab_size, **opts) * std

    def _norm(self, x: Any, weight: Any) -> Any:
        torch = self.torch
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + 1e-5)).to(x.dtype) * weight

    def _mlp(self, x: Any, w_gu: Any, w_down: Any, norm: Any) -> Any:
        gate, up = (self._norm(x, norm) @ w_gu).chunk(2, dim=-1)
        return x + (self.torch.nn.functional.silu(gate) * up) @ w_down

    def prefill(self, x: Any) -> Any:
        """One sequence of ``x.shape[0]`` tokens, causal attention, logits of the last."""
        s, f = self.shape, self.torch.nn.functional
        t, hd = x.shape[0], s.head_dim
        for w_qkv, w_o, w_gu, w_down, n1, n2 in self.layers:
            qkv = self._norm(x, n1) @ w_qkv
            q, k, v = qkv.split(
                [s.num_heads * hd, s.num_kv_heads * hd, s.num_kv_heads * hd], dim=-1
            )
            q = q.view(t, s.num_heads, hd).transpose(0, 1).unsqueeze(0)
            k = k.view(t, s.num_kv_heads, hd).transpose(0, 1).unsqueeze(0)
            v = v.view(t, s.num_kv_heads, hd).transpose(0, 1).unsqueeze(0)
            a = f.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + a.squeeze(0).transpose(0, 1).reshape(t, -1) @ w_o
            x = self._mlp(x, w_gu, w_down, n2)
        return x[-1:] @ self.head

    def decode(self, x: Any, caches: Sequence[tuple[Any, Any]]) -> Any:
        """One token for each of ``x.shape[0]`` sequences over their cached K and V.

        GQA decode as one SDPA call: the query heads of a KV head form its "rows".
        """
        s, f = self.shape, self.torch.nn.functional
        b, hd = x.shape[0], s.head_dim
        group = s.num_heads // s.num_kv_heads
        for (w_qkv, w_o, w_gu, w_down, n1, n2), (k_cache, v_cache) in zip(
            self.layers, caches, strict=True
        ):
            qkv = self._norm(x, n1) @ w_qkv
            q = qkv[:, : s.num_heads * hd].view(b, s.num_kv_heads, group, hd)
            a = f.scaled_dot_product_attention(q, k_cache, v_cache)
            x = x + a.reshape(b, -1) @ w_o
            x = self._mlp(x, w_gu, w_down, n2)
        return x @ self.head


def _measure(
    torch: Any, shape: timing.ModelShape, gpu: timing.GpuSpec, quick: bool
) -> dict[str, Any]:
    ideal = timing.GpuSpec(
        gpu.name, gpu.peak_flops, gpu.memory_bandwidth, gpu.memory_bytes, mfu=1.0, mbu=1.0
    )
    model = _Model(torch, shape)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for tokens in (128, 512, 2048) if quick else (128, 512, 1024, 2048, 4096, 8192):
            x = torch.randn(tokens, shape.hidden_size, device="cuda", dtype=torch.bfloat16)
            ms = _time_ms(torch, functools.partial(model.prefill, x))
            roof = timing.step_time(shape, ideal, [timing.SeqWork(tokens, 0)])
            flops = timing.step_flops(shape, [timing.SeqWork(tokens, 0)])
            rows.append(
                {
                    "kind": "prefill",
                    "tokens": tokens,
                    "measured_ms": ms,
                    "roofline_ms": roof * 1e3,
                    "mfu": flops / (ms / 1e3) / gpu.peak_flops,
                }
            )
        grid = [(1, 1024), (32, 1024)] if quick else [
            (1, 1024), (8, 1024), (32, 1024), (64, 1024), (128, 1024), (256, 1024),
            (32, 256), (32, 4096), (64, 4096),
        ]  # fmt: skip
        hd, kv_heads = shape.head_dim, shape.num_kv_heads
        for batch, context in grid:
            caches = [
                (
                    torch.randn(batch, kv_heads, context, hd, device="cuda", dtype=torch.bfloat16),
                    torch.randn(batch, kv_heads, context, hd, device="cuda", dtype=torch.bfloat16),
                )
                for _ in range(shape.num_layers)
            ]
            x = torch.randn(batch, shape.hidden_size, device="cuda", dtype=torch.bfloat16)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    model.decode(x, caches)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.decode(x, caches)
            ms = _time_ms(torch, graph.replay)
            works = [timing.SeqWork(1, context)] * batch
            roof = timing.step_time(shape, ideal, works)
            moved = timing.step_bytes(shape, works)
            rows.append(
                {
                    "kind": "decode",
                    "batch": batch,
                    "context": context,
                    "measured_ms": ms,
                    "roofline_ms": roof * 1e3,
                    "mbu": moved / (ms / 1e3) / gpu.memory_bandwidth,
                }
            )
            del caches, graph
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": shape.name,
        "gpu_spec": gpu.name,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.workers.emulator.calibration")
    parser.add_argument("--shape", choices=sorted(timing.MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--gpu", choices=sorted(timing.GPUS), default="H100")
    parser.add_argument("--quick", action="store_true", help="fewer points")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("calibration needs PyTorch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("calibration needs a CUDA GPU", file=sys.stderr)
        return 2
    report = _measure(torch, timing.MODEL_SHAPES[args.shape], timing.GPUS[args.gpu], args.quick)
    for row in report["rows"]:
        what = (
            f"prefill T={row['tokens']:>5}"
            if row["kind"] == "prefill"
            else f"decode  B={row['batch']:>3} C={row['context']:>5}"
        )
        util = f"mfu={row['mfu']:.2f}" if "mfu" in row else f"mbu={row['mbu']:.2f}"
        print(
            f"{what}  measured {row['measured_ms']:8.3f} ms  roofline {row['roofline_ms']:8.3f} ms  {util}"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
