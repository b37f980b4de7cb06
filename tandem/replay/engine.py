"""The simulated engine's costs: the emulator's roofline (:mod:`tandem.workers.emulator.timing`)
made linear in (sequences, context) for decode steps, so a run of identical steps costs O(1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tandem.workers.emulator import timing

__all__ = ["Costs", "EngineModel"]


@dataclass(frozen=True)
class EngineModel:
    """One worker: its GPU and model (the emulator's roofline) and vLLM's knobs."""

    gpu: timing.GpuSpec = timing.H100
    shape: timing.ModelShape = timing.LLAMA_3_1_8B
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    """Token budget of a step (vLLM's default on 80 GB GPUs for the API server)."""
    gpu_memory_utilization: float = 0.9
    kv_link_bandwidth: float = 25e9
    """Bytes/s between a prefill and a decode worker."""
    step_overhead: float = 0.001
    """Seconds added to every step (scheduling, launches; the calibration on an H100
    measured 0.5-1 ms at batch 1)."""

    @property
    def kv_capacity(self) -> int:
        """Tokens of KV cache one worker holds."""
        return timing.kv_capacity_tokens(self.shape, self.gpu, self.gpu_memory_utilization)

    def costs(self) -> Costs:
        s = self.shape
        one = timing.step_flops(s, [timing.SeqWork(1, 0)])
        per_context = timing.step_flops(s, [timing.SeqWork(1, 1)]) - one
        weights = timing.step_bytes(s, [])
        kv = timing.step_bytes(s, [timing.SeqWork(1, 0)]) - weights
        return Costs(
            self, one, per_context, weights, kv, self.gpu.effective_flops,
            self.gpu.effective_bandwidth,
        )  # fmt: skip


@dataclass(frozen=True)
class Costs:
    """``timing``'s step cost, linear in (sequences, context) for decode tokens."""

    engine: EngineModel
    decode_flops: float
    """FLOPs of one decode token over no context."""
    context_flops: float
    """FLOPs each cached token adds to one decode token."""
    weight_bytes: float
    kv_bytes: float
    """Bytes of KV per token held."""
    flops_rate: float
    bytes_rate: float

    def step(self, n: int, context: float, chunks: Sequence[tuple[int, int]] = ()) -> float:
        """Seconds of a step with ``n`` decode tokens over ``context`` cached tokens in
        all, plus prefill ``chunks`` of ``(new_tokens, cached_before)``."""
        flops = n * self.decode_flops + self.context_flops * context
        kv_tokens = context + n
        for new, cached in chunks:
            flops += timing.prefill_flops(self.engine.shape, new, cached)
            kv_tokens += new + cached
        if n == 0 and not chunks:
            return 0.0
        seconds = max(
            flops / self.flops_rate,
            (self.weight_bytes + self.kv_bytes * kv_tokens) / self.bytes_rate,
        )
        return seconds + self.engine.step_overhead

    def transfer(self, tokens: int) -> float:
        return timing.kv_transfer_time(self.kv_bytes * tokens, self.engine.kv_link_bandwidth)
