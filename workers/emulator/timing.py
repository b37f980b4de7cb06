"""What a GPU step costs: a roofline of a named GPU and model shape.

Pure functions over frozen dataclasses; no I/O, no clock.

The model of one engine step (a batch of sequences, each adding ``new_tokens``
on top of ``context`` tokens already in its KV cache):

* compute: ``FLOPs = 2 * P_layers * T + 2 * P_head * S + 4 * L * d_attn * sum_i A_i``
  where ``T`` is the number of tokens in the step, ``S`` the number of sequences
  (the LM head runs once per sequence: vLLM computes logits only for the last
  position), ``P_layers`` the parameters of the transformer blocks, ``P_head`` those
  of the LM head, ``L`` the layers, ``d_attn = num_heads * head_dim`` and ``A_i`` the
  number of (query, key) pairs of sequence ``i``: ``n * c + n * (n + 1) / 2`` for
  ``n`` new tokens over ``c`` cached ones (causal). The factor 4 is 2 FLOPs per
  multiply-add, twice (``Q K^T`` and ``softmax(.) V``).
* memory: ``bytes = W_read + kv_bytes_per_token * sum_i (c_i + n_i)``: every step
  reads all weights once (the input embedding is a gather, so it is not counted)
  and the KV cache of every sequence in the batch.
* time: ``max(FLOPs / (peak_flops * mfu), bytes / (memory_bandwidth * mbu))``.

The efficiencies ``mfu``/``mbu`` were checked on a real H100 with
:mod:`.calibration`; the measurement is kept in ``measurements/`` and a test holds
the defaults to it.

A long prefill is compute-bound (its time is the first term); a decode step is
memory-bound (the second). :func:`prefill_time` and :func:`decode_step_time` are the
two terms on their own; :func:`step_time` is the roofline of a mixed batch, which is
what a continuous-batching scheduler (vLLM v1) actually runs.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "A100",
    "GPUS",
    "H100",
    "H200",
    "LLAMA_3_1_8B",
    "MODEL_SHAPES",
    "TINY",
    "GpuSpec",
    "ModelShape",
    "SeqWork",
    "ceil_div",
    "decode_step_bytes",
    "decode_step_time",
    "kv_capacity_blocks",
    "kv_capacity_tokens",
    "kv_transfer_time",
    "prefill_flops",
    "prefill_time",
    "step_bytes",
    "step_flops",
    "step_time",
]


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator, as a roofline sees it."""

    name: str
    """A label, e.g. ``"H100"``."""
    peak_flops: float
    """Dense bf16 tensor-core FLOP/s (no sparsity)."""
    memory_bandwidth: float
    """HBM bandwidth, bytes/s."""
    memory_bytes: int
    """HBM capacity, bytes."""
    mfu: float = 0.5
    """Model FLOPs utilization reached by compute-bound work (prefill): the fraction
    of ``peak_flops`` that real kernels sustain. 0.5 is what a Llama 3.1 8B-shaped
    bf16 prefill of 1k-8k tokens measured on an H100 (``measurements/``)."""
    mbu: float = 0.65
    """Memory bandwidth utilization reached by memory-bound work (decode): the
    fraction of ``memory_bandwidth`` a decode step sustains. 0.65 is the middle of
    what CUDA-graphed Llama 3.1 8B-shaped decode steps measured on an H100
    (0.57 for small batches over short contexts to 0.76 for large KV reads)."""

    def __post_init__(self) -> None:
        if self.peak_flops <= 0 or self.memory_bandwidth <= 0 or self.memory_bytes <= 0:
            raise ValueError(f"GpuSpec {self.name!r}: rates and capacity must be positive")
        if not (0 < self.mfu <= 1 and 0 < self.mbu <= 1):
            raise ValueError(f"GpuSpec {self.name!r}: mfu and mbu must lie in (0, 1]")

    @property
    def effective_flops(self) -> float:
        """FLOP/s a prefill gets: ``peak_flops * mfu``."""
        return self.peak_flops * self.mfu

    @property
    def effective_bandwidth(self) -> float:
        """Bytes/s a decode step gets: ``memory_bandwidth * mbu``."""
        return self.memory_bandwidth * self.mbu


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama family: GQA attention, gated MLP)."""

    name: str
    num_layers: int = 32
    hidden_size: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 128256
    bytes_per_param: int = 2
    """2 for bf16/fp16 weights."""
    kv_bytes_per_element: int = 2
    """2 for a bf16 KV cache (vLLM's ``kv_cache_dtype=auto`` follows the weights)."""
    tie_word_embeddings: bool = False
    """Whether the LM head shares the input embedding (it does not in Llama 3.1 8B)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape {self.name!r}: heads must divide hidden and kv_heads heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params_per_layer(self) -> int:
        """``d*(H + 2*H_kv)*h`` (QKV) + ``H*h*d`` (O) + ``3*d*I`` (gate, up, down) + ``2*d`` (norms)."""
        d, h = self.hidden_size, self.head_dim
        attention = d * h * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * h * d
        return attention + 3 * d * self.intermediate_size + 2 * d

    @property
    def layer_params(self) -> int:
        """Parameters of all transformer blocks plus the final norm."""
        return self.num_layers * self.params_per_layer + self.hidden_size

    @property
    def head_params(self) -> int:
        """Parameters of the LM head (``vocab * d``), used whether tied or not."""
        return self.vocab_size * self.hidden_size

    @property
    def param_count(self) -> int:
        """All stored parameters: blocks, input embedding and (if untied) the LM head."""
        embedding = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.head_params
        return self.layer_params + embedding + head

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights occupy in GPU memory."""
        return self.param_count * self.bytes_per_param

    @property
    def weight_bytes_read(self) -> int:
        """Bytes of weights one forward pass reads: blocks and LM head, not the embedding."""
        return (self.layer_params + self.head_params) * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """``2 (K and V) * L * H_kv * h * bytes``: 131072 (128 KiB) for Llama 3.1 8B."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_element


@dataclass(frozen=True)
class SeqWork:
    """One sequence's share of a step: ``new_tokens`` on top of ``context`` cached ones."""

    new_tokens: int
    context: int = 0


H100 = GpuSpec(
    name="H100",
    peak_flops=989.4e12,
    memory_bandwidth=3.35e12,
    memory_bytes=80 * 1024**3,
)
"""H100 SXM5 80GB: 989.4 TFLOP/s dense bf16, 3.35 TB/s HBM3 (NVIDIA's data sheet)."""

H200 = GpuSpec(name="H200", peak_flops=989.4e12, memory_bandwidth=4.8e12, memory_bytes=141 * 10**9)
"""H200 SXM 141GB: the H100's compute with 4.8 TB/s HBM3e."""

A100 = GpuSpec(
    name="A100-80GB", peak_flops=312e12, memory_bandwidth=2.039e12, memory_bytes=80 * 1024**3
)
"""A100 SXM 80GB: 312 TFLOP/s dense bf16, 2.039 TB/s HBM2e."""

LLAMA_3_1_8B = ModelShape(name="llama-3.1-8b")
"""meta-llama/Llama-3.1-8B(-Instruct): 8.03e9 parameters, 128 KiB of KV per token."""

TINY = ModelShape(
    name="tiny",
    num_layers=2,
    hidden_size=128,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
    vocab_size=1024,
)
"""A toy shape whose steps take microseconds: for tests that want a fast engine."""

GPUS: Mapping[str, GpuSpec] = types.MappingProxyType({g.name: g for g in (H100, H200, A100)})
MODEL_SHAPES: Mapping[str, ModelShape] = types.MappingProxyType(
    {m.name: m for m in (LLAMA_3_1_8B, TINY)}
)


def _attention_pairs(work: SeqWork) -> int:
    n, c = work.new_tokens, work.context
    return n * c + n * (n + 1) // 2


def step_flops(shape: ModelShape, batch: Iterable[SeqWork]) -> float:
    """FLOPs of one forward pass over ``batch`` (see the module docstring)."""
    tokens = sequences = pairs = 0
    for work in batch:
        tokens += work.new_tokens
        sequences += 1
        pairs += _attention_pairs(work)
    d_attn = shape.num_heads * shape.head_dim
    return float(
        2 * shape.layer_params * tokens
        + 2 * shape.head_params * sequences
        + 4 * shape.num_layers * d_attn * pairs
    )


def step_bytes(shape: ModelShape, batch: Iterable[SeqWork]) -> float:
    """HBM bytes one forward pass over ``batch`` moves: weights once, plus the KV of
    every sequence (its cached tokens read, its new tokens written)."""
    kv_tokens = sum(work.context + work.new_tokens for work in batch)
    return float(shape.weight_bytes_read + shape.kv_bytes_per_token * kv_tokens)


def step_time(shape: ModelShape, gpu: GpuSpec, batch: Iterable[SeqWork]) -> float:
    """Seconds one step takes: the slower of its compute and its memory traffic."""
    works = tuple(batch)
    if not works:
        return 0.0
    compute = step_flops(shape, works) / gpu.effective_flops
    memory = step_bytes(shape, works) / gpu.effective_bandwidth
    return max(compute, memory)


def prefill_flops(shape: ModelShape, tokens: int, context: int = 0) -> float:
    """FLOPs of prefilling ``tokens`` prompt tokens of one sequence over ``context``
    already-cached ones: ``2*P_layers*n + 2*P_head + 4*L*d_attn*(n*c + n(n+1)/2)``."""
    return step_flops(shape, (SeqWork(tokens, context),))


def prefill_time(shape: ModelShape, gpu: GpuSpec, tokens: int, context: int = 0) -> float:
    """Compute-roofline time of a prefill: ``prefill_flops / (peak_flops * mfu)``."""
    return prefill_flops(shape, tokens, context) / gpu.effective_flops


def decode_step_bytes(shape: ModelShape, context_lens: Iterable[int]) -> float:
    """Bytes of one decode step: ``W_read + kv_bytes_per_token * sum(c_i + 1)``."""
    return step_bytes(shape, (SeqWork(1, c) for c in context_lens))


def decode_step_time(shape: ModelShape, gpu: GpuSpec, context_lens: Iterable[int]) -> float:
    """Bandwidth-roofline time of one decode step for a batch of sequences whose KV
    caches hold ``context_lens`` tokens: ``decode_step_bytes / (bandwidth * mbu)``."""
    return decode_step_bytes(shape, context_lens) / gpu.effective_bandwidth


def kv_capacity_tokens(shape: ModelShape, gpu: GpuSpec, gpu_memory_utilization: float = 0.9) -> int:
    """Tokens of KV cache that fit: ``(memory * utilization - weight_bytes) / kv_bytes_per_token``.

    As vLLM's ``--gpu-memory-utilization``: the fraction is of the whole memory, and
    the weights come out of that budget (activations are neglected here).
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError("gpu_memory_utilization must lie in (0, 1]")
    free = gpu.memory_bytes * gpu_memory_utilization - shape.weight_bytes
    if free <= 0:
        raise ValueError(
            f"{shape.name} ({shape.weight_bytes / 1e9:.1f} GB) does not fit on {gpu.name}"
        )
    return int(free // shape.kv_bytes_per_token)


def kv_capacity_blocks(
    shape: ModelShape, gpu: GpuSpec, block_size: int = 16, gpu_memory_utilization: float = 0.9
) -> int:
    """KV blocks of ``block_size`` tokens that fit (vLLM's ``num_gpu_blocks``)."""
    return kv_capacity_tokens(shape, gpu, gpu_memory_utilization) // block_size


def kv_transfer_time(num_bytes: float, link_bandwidth: float, latency: float = 0.0) -> float:
    """Seconds to move ``num_bytes`` of KV over a link: ``latency + bytes / bandwidth``."""
    if link_bandwidth <= 0:
        raise ValueError("link_bandwidth must be positive")
    return latency + num_bytes / link_bandwidth


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative integers."""
    return -(-a // b)
