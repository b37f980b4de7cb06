"""Continuous batching, as vLLM v1's scheduler does it, on emulated time.

Pure: no I/O, no clock of its own; every call that needs the time takes ``now``.
The async shell (:mod:`.engine`) and the discrete-event replay (:mod:`.simulation`)
drive the same :class:`Scheduler`.

One step, as in vLLM v1 (``vllm/v1/core/sched/scheduler.py``), with chunked prefill on:

1. A token budget of ``max_num_batched_tokens``.
2. Running sequences first, in admission order: each asks for the tokens it has not
   computed yet (1 for a decoding sequence, the rest of its prompt for one whose
   prefill was chunked), capped by the budget. KV blocks are allocated for them;
   when none are free the most recently admitted running sequence is preempted
   (its blocks freed, its progress dropped, back to the head of the queue, to be
   recomputed), as vLLM's recompute preemption does.
3. If nothing was preempted, waiting sequences are admitted in FIFO order while the
   budget lasts, ``max_num_seqs`` is not reached and their blocks can be allocated;
   a prompt longer than the budget left is cut into chunks. A sequence whose blocks
   cannot be allocated stays at the head of the queue and blocks the ones behind it
   (so ``num_requests_waiting`` grows when the KV cache is full).
4. The step takes :func:`.timing.step_time` of the batch; at its end every sequence
   that has computed all its tokens samples one.

Disaggregation, as vLLM's NixlConnector does it:

* a sequence whose KV comes from a remote prefill (decode role) gets blocks for its
  whole prompt when admitted, then waits (counted as waiting) while the KV crosses
  the link: ``kv_transfer_time(blocks * block_size * kv_bytes_per_token)``, one
  transfer at a time on the link. It then runs with all but the last prompt token
  computed (vLLM recomputes the last one to get logits);
* a sequence that hands its KV to a remote decode (prefill role) keeps its blocks
  after finishing, for as long as the decode side needs to read them (the same
  transfer time), and reports their ids.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from tandem.workers.emulator import timing

__all__ = [
    "FinishReason",
    "FinishedRequest",
    "PromptSources",
    "RequestSpec",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "Step",
    "StepResult",
    "TokenEvent",
    "TransferDone",
]


class FinishReason(enum.StrEnum):
    """Why a request ended, with vLLM's spelling (``finished_reason`` label)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class SchedulerConfig:
    """What the emulated engine is: its GPU, its model and vLLM's scheduling knobs."""

    gpu: timing.GpuSpec = timing.H100
    """The accelerator whose roofline prices each step."""
    shape: timing.ModelShape = timing.LLAMA_3_1_8B
    """The model whose FLOPs and bytes are priced."""
    num_gpu_blocks: int = 0
    """KV blocks in the cache; 0 means what fits (:func:`.timing.kv_capacity_blocks`)."""
    block_size: int = 16
    """Tokens per KV block (vLLM's ``--block-size``)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may use (weights + KV), for ``num_gpu_blocks=0``."""
    max_num_seqs: int = 256
    """Most sequences in one batch (vLLM's ``--max-num-seqs``)."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step (vLLM's ``--max-num-batched-tokens``)."""
    kv_link_bandwidth: float = 25e9
    """Bytes/s of the link the KV cache crosses between prefill and decode workers
    (25 GB/s: a 200 Gb/s RDMA NIC at line rate)."""
    kv_link_latency: float = 0.0
    """Seconds added to every KV transfer (handshake, posting)."""
    step_overhead: float = 0.0
    """Seconds added to every step (scheduling, launches): 0 models a CUDA-graphed engine."""

    def __post_init__(self) -> None:
        if min(self.block_size, self.max_num_seqs, self.max_num_batched_tokens) < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.num_gpu_blocks < 0:
            raise ValueError("num_gpu_blocks must be >= 0 (0: derive it from the GPU)")

    @property
    def total_blocks(self) -> int:
        if self.num_gpu_blocks:
            return self.num_gpu_blocks
        return timing.kv_capacity_blocks(
            self.shape, self.gpu, self.block_size, self.gpu_memory_utilization
        )

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of the KV blocks holding ``tokens`` tokens (whole blocks, as NIXL moves them)."""
        blocks = timing.ceil_div(tokens, self.block_size)
        return blocks * self.block_size * self.shape.kv_bytes_per_token

    def transfer_time(self, tokens: int) -> float:
        return timing.kv_transfer_time(
            self.kv_bytes(tokens), self.kv_link_bandwidth, self.kv_link_latency
        )


@dataclass(frozen=True)
class RequestSpec:
    """What one request asks of the engine."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    remote_prefill: bool = False
    """The KV of the prompt comes from a remote prefill worker (decode role)."""
    remote_decode: bool = False
    """The KV is handed to a remote decode worker afterwards (prefill role): keep it."""


@dataclass(frozen=True)
class PromptSources:
    """Where the prompt's KV came from (vLLM's ``prompt_tokens_by_source``)."""

    local_compute: int
    external_kv_transfer: int = 0
    recomputed: int = 0


@dataclass(frozen=True)
class TokenEvent:
    """A sampled token."""

    request_id: str
    index: int
    """0 for the first generated token."""
    time: float
    since_last: float
    """Seconds since the previous token, or since arrival for the first (TTFT)."""
    finish_reason: FinishReason | None = None
    prompt: PromptSources | None = None
    """Set on the first token only."""


@dataclass(frozen=True)
class FinishedRequest:
    """A request that ended with a reason other than an abort, and its timestamps."""

    request_id: str
    reason: FinishReason
    prompt_tokens: int
    generation_tokens: int
    max_tokens: int
    arrival: float
    scheduled: float
    first_token: float
    last_token: float
    kv_block_ids: tuple[int, ...] = ()
    """The blocks kept for a remote decode (prefill role), else empty."""


@dataclass(frozen=True)
class TransferDone:
    """A KV cache that finished arriving from a remote prefill worker."""

    request_id: str
    num_bytes: int
    num_blocks: int
    duration: float
    """Seconds on the link (not counting the wait for the link)."""


@dataclass(frozen=True)
class Step:
    """A batch to run: ``(request_id, new_tokens, context)`` per sequence."""

    work: tuple[tuple[str, int, int], ...]
    duration: float
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(new for _, new, _ in self.work)


@dataclass(frozen=True)
class StepResult:
    tokens: tuple[TokenEvent, ...]
    finished: tuple[FinishedRequest, ...]


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    """Fraction of KV blocks in use, 0 to 1."""


class _State(enum.Enum):
    WAITING = enum.auto()
    TRANSFERRING = enum.auto()
    RUNNING = enum.auto()


@dataclass(eq=False)
class _Seq:
    spec: RequestSpec
    arrival: float
    state: _State = _State.WAITING
    num_computed: int = 0
    num_generated: int = 0
    blocks: list[int] = field(default_factory=list)
    kv_received: bool = False
    ready_at: float = 0.0
    transfer: TransferDone | None = None
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.spec.prompt_tokens + self.num_generated


class Scheduler:
    """The scheduler and KV block pool of one emulated engine (see the module docstring)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._total_blocks = config.total_blocks
        self._free: deque[int] = deque(range(self._total_blocks))
        self._seqs: dict[str, _Seq] = {}
        self._waiting: deque[_Seq] = deque()
        self._transferring: list[_Seq] = []
        self._running: list[_Seq] = []
        self._held: list[tuple[float, list[int]]] = []
        self._link_free_at = 0.0

    # -- queries -------------------------------------------------------------

    @property
    def num_gpu_blocks(self) -> int:
        return self._total_blocks

    def stats(self) -> SchedulerStats:
        used = self._total_blocks - len(self._free)
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting) + len(self._transferring),
            kv_usage=used / self._total_blocks if self._total_blocks else 0.0,
        )

    def has_work(self) -> bool:
        return bool(self._waiting or self._transferring or self._running)

    def next_event_time(self) -> float | None:
        """When a transfer ends or held KV is released, if anything is pending."""
        times = [seq.ready_at for seq in self._transferring] + [t for t, _ in self._held]
        return min(times, default=None)

    # -- requests ------------------------------------------------------------

    def add(self, spec: RequestSpec, now: float) -> None:
        if spec.request_id in self._seqs:
            raise ValueError(f"request {spec.request_id!r} is already in the engine")
        if spec.prompt_tokens < 1 or spec.max_tokens < 1:
            raise ValueError("a request needs at least one prompt token and one token to generate")
        need = timing.ceil_div(spec.prompt_tokens + spec.max_tokens, self.config.block_size)
        if need > self._total_blocks:
            raise ValueError(
                f"request {spec.request_id!r} needs {need} KV blocks; the cache has {self._total_blocks}"
            )
        seq = _Seq(spec=spec, arrival=now)
        self._seqs[spec.request_id] = seq
        self._waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        if seq.state is _State.RUNNING:
            self._running.remove(seq)
        elif seq.state is _State.TRANSFERRING:
            self._transferring.remove(seq)
        else:
            self._waiting.remove(seq)
        self._free_blocks(seq)
        return True

    # -- time ----------------------------------------------------------------

    def advance(self, now: float) -> list[TransferDone]:
        """Land the transfers and release the held KV whose time has come."""
        still_held = []
        for release, blocks in self._held:
            if release <= now:
                self._free.extend(blocks)
            else:
                still_held.append((release, blocks))
        self._held = still_held

        done = sorted(
            (s for s in self._transferring if s.ready_at <= now), key=lambda s: s.ready_at
        )
        for seq in done:
            self._transferring.remove(seq)
            seq.state = _State.WAITING
            seq.kv_received = True
            # vLLM recomputes the last prompt token to get the logits of the first output.
            seq.num_computed = seq.spec.prompt_tokens - 1
        # Back to the head of the queue, in the order they landed (vLLM keeps them in front).
        self._waiting.extendleft(reversed(done))
        return [seq.transfer for seq in done if seq.transfer is not None]

    # -- one step ------------------------------------------------------------

    def schedule(self, now: float) -> Step | None:
        """Pick the next batch (see the module docstring); None if nothing can run."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        work: list[tuple[_Seq, int]] = []
        preempted = 0

        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            scheduled = True
            while not self._allocate(seq, seq.num_computed + num_new):
                victim = self._running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            work.append((seq, num_new))
            budget -= num_new
            i += 1

        if not preempted:
            while self._waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
                seq = self._waiting[0]
                if seq.spec.remote_prefill and not seq.kv_received:
                    if not self._allocate(seq, seq.spec.prompt_tokens):
                        break
                    self._waiting.popleft()
                    self._start_transfer(seq, now)
                    continue
                num_new = min(seq.num_tokens - seq.num_computed, budget)
                if not self._allocate(seq, seq.num_computed + num_new):
                    break
                self._waiting.popleft()
                seq.state = _State.RUNNING
                if seq.scheduled is None:
                    seq.scheduled = now
                self._running.append(seq)
                work.append((seq, num_new))
                budget -= num_new

        if not work:
            return None
        batch = [timing.SeqWork(new, seq.num_computed) for seq, new in work]
        duration = timing.step_time(cfg.shape, cfg.gpu, batch) + cfg.step_overhead
        return Step(
            work=tuple((seq.spec.request_id, new, seq.num_computed) for seq, new in work),
            duration=duration,
            num_preemptions=preempted,
        )

    def complete(self, step: Step, now: float) -> StepResult:
        """Account for a step that ended at ``now``: sample, finish, free."""
        tokens: list[TokenEvent] = []
        finished: list[FinishedRequest] = []
        for request_id, num_new, _ in step.work:
            seq = self._seqs.get(request_id)
            if seq is None or seq.state is not _State.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed += num_new
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk that did not reach the end of the prompt
            index = seq.num_generated
            seq.num_generated += 1
            prompt = None
            previous = seq.last_token
            if seq.first_token is None:
                seq.first_token = now
                previous = seq.arrival
                prompt = self._prompt_sources(seq)
            assert previous is not None
            seq.last_token = now
            reason = FinishReason.LENGTH if seq.num_generated >= seq.spec.max_tokens else None
            tokens.append(TokenEvent(request_id, index, now, now - previous, reason, prompt))
            if reason is not None:
                finished.append(self._finish(seq, reason, now))
        return StepResult(tokens=tuple(tokens), finished=tuple(finished))

    # -- internals -----------------------------------------------------------

    def _prompt_sources(self, seq: _Seq) -> PromptSources:
        prompt = seq.spec.prompt_tokens
        if seq.kv_received:
            return PromptSources(local_compute=1, external_kv_transfer=prompt, recomputed=1)
        return PromptSources(local_compute=prompt)

    def _finish(self, seq: _Seq, reason: FinishReason, now: float) -> FinishedRequest:
        self._running.remove(seq)
        del self._seqs[seq.spec.request_id]
        kept: tuple[int, ...] = ()
        if seq.spec.remote_decode and reason is FinishReason.LENGTH:
            kept = tuple(seq.blocks)
            release = now + self.config.transfer_time(seq.spec.prompt_tokens)
            self._held.append((release, seq.blocks))
            seq.blocks = []
        else:
            self._free_blocks(seq)
        assert seq.scheduled is not None
        assert seq.first_token is not None
        return FinishedRequest(
            request_id=seq.spec.request_id,
            reason=reason,
            prompt_tokens=seq.spec.prompt_tokens,
            generation_tokens=seq.num_generated,
            max_tokens=seq.spec.max_tokens,
            arrival=seq.arrival,
            scheduled=seq.scheduled,
            first_token=seq.first_token,
            last_token=now,
            kv_block_ids=kept,
        )

    def _start_transfer(self, seq: _Seq, now: float) -> None:
        cfg = self.config
        prompt = seq.spec.prompt_tokens
        start = max(now, self._link_free_at)
        duration = cfg.transfer_time(prompt)
        seq.ready_at = self._link_free_at = start + duration
        seq.state = _State.TRANSFERRING
        if seq.scheduled is None:
            seq.scheduled = now
        seq.transfer = TransferDone(
            request_id=seq.spec.request_id,
            num_bytes=cfg.kv_bytes(prompt),
            num_blocks=timing.ceil_div(prompt, cfg.block_size),
            duration=duration,
        )
        self._transferring.append(seq)

    def _allocate(self, seq: _Seq, tokens: int) -> bool:
        need = timing.ceil_div(tokens, self.config.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        seq.blocks.extend(self._free.popleft() for _ in range(need))
        return True

    def _free_blocks(self, seq: _Seq) -> None:
        self._free.extend(seq.blocks)
        seq.blocks = []

    def _preempt(self, seq: _Seq) -> None:
        self._free_blocks(seq)
        seq.state = _State.WAITING
        seq.num_computed = 0  # recompute; KV already received is not fetched again
        self._waiting.appendleft(seq)
