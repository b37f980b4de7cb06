"""Calibrate the engine emulator's roofline against a real GPU.

Builds a Llama-3.1-8B-shaped model with random bf16 weights on the GPU (no hub:
the shape comes from the emulator's own ``LLAMA_3_1_8B``), then measures

* prefill: one forward over a prompt of N tokens (logits for the last position
  only, as vLLM computes them), for several N;
* decode: one step for a batch of B sequences over a KV cache of C tokens each,
  for several B;

and prints them beside the emulator's prediction for the same shape on an H100,
with the MFU/MBU the measurement implies. The model runs through Hugging Face
transformers in eager mode (SDPA attention), which is slower than vLLM's CUDA
graphs and fused kernels, so the implied utilizations are a floor.

Run on a GPU machine with torch and transformers:

    python benchmarks/gpu_calibration.py [--out results.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_timing() -> ModuleType:
    """The emulator's timing module alone (no server dependencies on the GPU box)."""
    path = ROOT / "workers" / "emulator" / "timing.py"
    spec = importlib.util.spec_from_file_location("tandem_timing", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["tandem_timing"] = module
    spec.loader.exec_module(module)
    return module


def median_ms(fn: Any, repeats: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed_decode_ms(model: Any, shape: Any, batch: int, context: int, repeats: int) -> float:
    import torch
    import torch.nn.functional as F

    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            (
                layer.input_layernorm.weight,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                mlp.down_proj.weight,
            )
        )
    head = model.lm_head.weight
    hd, nh, nkv = shape.head_dim, shape.num_heads, shape.num_kv_heads
    kv = [
        (
            torch.randn(batch, nkv, context, hd, device="cuda", dtype=torch.bfloat16),
            torch.randn(batch, nkv, context, hd, device="cuda", dtype=torch.bfloat16),
        )
        for _ in layers
    ]
    x0 = torch.randn(batch, shape.hidden_size, device="cuda", dtype=torch.bfloat16)

    def rms(x: Any, w: Any) -> Any:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * w

    def step() -> Any:
        x = x0
        for (n1, wqkv, wo, n2, wgu, wd), (k_cache, v_cache) in zip(layers, kv, strict=True):
            qkv = rms(x, n1) @ wqkv.T
            q = qkv[:, : nh * hd].view(batch, nh, 1, hd)
            o = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True)
            x = x + o.reshape(batch, nh * hd) @ wo.T
            gate, up = (rms(x, n2) @ wgu.T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ wd.T
        return x @ head.T

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = median_ms(graph.replay, repeats)
    del graph, kv, layers
    torch.cuda.empty_cache()
    return ms


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import DynamicCache

    timing = load_timing()
    shape = timing.LLAMA_3_1_8B
    gpu = timing.H100
    config = LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(0)
    lines = [
        f"device: {device_name}; torch {torch.__version__}; params {n_params / 1e9:.2f}e9 "
        f"(emulator shape: {shape.param_count / 1e9:.2f}e9)",
        "",
        "| phase | shape | measured ms | emulator ms | ratio meas/emu | implied |",
        "|---|---|---|---|---|---|",
    ]
    with torch.inference_mode():
        for tokens in (128, 512, 2048, 4096, 8192):
            ids = torch.randint(0, shape.vocab_size, (1, tokens), device="cuda")

            def prefill(ids: Any = ids) -> None:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

            ms = median_ms(prefill, args.repeats)
            emu = timing.prefill_time(shape, gpu, tokens) * 1000
            mfu = timing.prefill_flops(shape, tokens) / (ms / 1000) / gpu.peak_flops
            lines.append(
                f"| prefill | {tokens} tokens | {ms:.2f} | {emu:.2f} | {ms / emu:.2f} | MFU {mfu:.2f} |"
            )
            print(lines[-1], flush=True)
        context = 1024
        hd = shape.head_dim
        for batch in (1, 8, 32, 64, 128):
            cache = DynamicCache()
            for layer in range(shape.num_layers):
                k = torch.randn(
                    batch, shape.num_kv_heads, context, hd, device="cuda", dtype=torch.bfloat16
                )
                cache.update(k, torch.randn_like(k), layer)
            ids = torch.randint(0, shape.vocab_size, (batch, 1), device="cuda")
            pos = torch.full((batch, 1), context, device="cuda")

            def decode(ids: Any = ids, pos: Any = pos, cache: Any = cache) -> None:
                model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
                cache.crop(context)

            ms = median_ms(decode, args.repeats)
            emu = timing.decode_step_time(shape, gpu, [context] * batch) * 1000
            mbu = (
                timing.decode_step_bytes(shape, [context] * batch)
                / (ms / 1000)
                / gpu.memory_bandwidth
            )
            lines.append(
                f"| decode | batch {batch} × {context} ctx | {ms:.2f} | {emu:.2f} | {ms / emu:.2f} | MBU {mbu:.2f} |"
            )
            print(lines[-1], flush=True)
            del cache
            torch.cuda.empty_cache()
        # The decode step again as vLLM runs it: bare torch ops over the same weights
        # (fused QKV and gate/up, GQA attention over a preallocated KV cache),
        # captured in one CUDA graph, so no per-kernel launch overhead remains.
        for batch in (1, 8, 32, 64, 128):
            ms = graphed_decode_ms(model, shape, batch, context, args.repeats)
            emu = timing.decode_step_time(shape, gpu, [context] * batch) * 1000
            mbu = (
                timing.decode_step_bytes(shape, [context] * batch)
                / (ms / 1000)
                / gpu.memory_bandwidth
            )
            lines.append(
                f"| decode, CUDA graph | batch {batch} × {context} ctx | {ms:.2f} | {emu:.2f} | {ms / emu:.2f} | MBU {mbu:.2f} |"
            )
            print(lines[-1], flush=True)
        # The same weights streamed by bare matmuls: what the memory system gives
        # a decode step without the framework's per-layer overhead.
        weights = [p for p in model.model.layers.parameters() if p.dim() == 2]
        x = torch.randn(1, shape.hidden_size, device="cuda", dtype=torch.bfloat16)

        def stream() -> None:
            for w in weights:
                (
                    x[:, : w.shape[1]]
                    if w.shape[1] <= x.shape[1]
                    else x.repeat(1, 4)[:, : w.shape[1]]
                ) @ w.T

        ms = median_ms(stream, args.repeats)
        moved = sum(w.numel() * w.element_size() for w in weights)
        lines.append(
            f"| weights only | {moved / 1e9:.1f} GB of block weights, batch 1 | {ms:.2f} | "
            f"{moved / gpu.effective_bandwidth * 1000:.2f} | {ms / (moved / gpu.effective_bandwidth * 1000):.2f} | "
            f"MBU {moved / (ms / 1000) / gpu.memory_bandwidth:.2f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
