"""Replay workloads through simulated pools: Tandem's planner against static
peak provisioning, a GPU-utilization HPA and a colocated pool.

The simulation is :mod:`tandem.replay` (virtual time, the emulator's
H100 roofline for Llama-3.1-8B); this script only chooses the scenarios, runs
them (in parallel processes) and writes the report and the plots.

    .venv/bin/python benchmarks/replay.py                    # full run, ~7 min on 2 cores
    .venv/bin/python benchmarks/replay.py --quick            # 20-minute traces, smaller sweep
    .venv/bin/python benchmarks/replay.py --workloads bursty --no-sweep --no-plots

Writes ``benchmarks/AUTOSCALING.md`` and ``docs/autoscaling-*.png`` (plots need
matplotlib: ``uv pip install --python .venv/bin/python matplotlib``; without it
the report is written and the plots are skipped).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tandem import replay
from tandem.autoscaling import planner as autoscaling

ROOT = Path(__file__).resolve().parents[1]
MAX_REPLICAS = 16
ATTAINMENT_GOAL = 0.99

CONFIG = replay.ReplayConfig()
BOUNDS = autoscaling.RoleBounds(1, MAX_REPLICAS)


def profiled_prefill_capacity(config: replay.ReplayConfig = CONFIG, prompt: int = 2000) -> float:
    """Prompt tokens/s of one worker prefilling ``prompt``-token prompts back to back:
    what a profiling run (or the roofline) tells the planner ahead of time."""
    costs = config.engine.costs()
    return prompt / costs.step(0, 0, [(prompt, 0)])


def profiled_tpot_line(
    config: replay.ReplayConfig = CONFIG, context: int = 2125
) -> tuple[float, float]:
    """``(floor, slope)`` of the decode step time (seconds) against KV usage, from
    the roofline with sequences of ``context`` tokens each (2000-token prompts
    halfway through 250 output tokens): what the planner's fitted TPOT line
    learns at run time, profiled ahead of time."""
    costs = config.engine.costs()
    capacity = config.engine.kv_capacity

    def point(usage: float) -> tuple[float, float]:
        seqs = max(1, round(usage * capacity / context))
        return seqs * context / capacity, costs.step(seqs, seqs * context)

    (u0, t0), (u1, t1) = point(0.05), point(0.6)
    slope = (t1 - t0) / (u1 - u0)
    return t0 - slope * u0, slope


def planner_spec(reactive: bool = False) -> autoscaling.PlannerSpec:
    """The CRD's defaults (stabilization 30s up / 5m down, steps 2 up / 1 down,
    4 queued per worker, 1m window) with the replay's SLOs. Unless ``reactive``:
    stabilization 15s up / 3m down, a lead of 75s (that plus the provisioning
    delay), a profiled prefill capacity and TPOT line, and no tolerance or
    hysteresis band on the load signals (KV usage and prompt load: their targets
    carry the SLO's margin already, and a worker is the smallest step)."""
    spec = autoscaling.PlannerSpec(
        policy="slo",
        ttft=CONFIG.ttft_slo,
        tpot=CONFIG.tpot_slo,
        percentile=CONFIG.percentile,
        prefill=BOUNDS,
        decode=BOUNDS,
        interval=CONFIG.interval,
        scale_up_stabilization=30,
        scale_down_stabilization=300,
        max_scale_up_step=2,
        max_scale_down_step=1,
        target_queue_per_replica=4,
        settle=CONFIG.window,
    )
    if reactive:
        return spec
    up = 15.0
    return dataclasses.replace(
        spec,
        scale_up_stabilization=up,
        scale_down_stabilization=180.0,
        lead=up + CONFIG.provisioning_delay,
        prefill_capacity=profiled_prefill_capacity(),
        tpot_line=profiled_tpot_line(),
        load_tolerance=0.0,
        load_scale_down_ratio=1.0,
    )


def workloads(quick: bool) -> dict[str, Callable[[], replay.Workload]]:
    hour = 1200.0 if quick else 3600.0
    return {
        "steady": lambda: replay.steady(duration=hour / 2),
        "diurnal": lambda: replay.diurnal(period=hour, duration=hour),
        "diurnal-4x": lambda: dataclasses.replace(
            replay.diurnal(low=20.0, high=160.0, period=hour, duration=hour), name="diurnal-4x"
        ),
        "bursty": lambda: replay.bursty(duration=hour),
        "shifting": lambda: replay.shifting(duration=hour),
    }


# ---------------------------------------------------------------------------
# Runs (module-level functions: they cross process boundaries)


@dataclasses.dataclass(frozen=True)
class Row:
    workload: str
    strategy: str
    label: str
    prefill: str
    decode: str
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    ttft_p99: float
    tpot_p99: float
    goodput: float
    gpu_seconds: float
    mean_gpus: float
    decisions: int
    oscillations: tuple[int, int]
    requests: int


OSCILLATION_WINDOW = 300.0
"""Seconds within which an up-down-up (or down-up-down) of a role counts as
flapping: the CRD's default scale-down stabilization (longer than the tuned
planner's own)."""


def _row(res: replay.Result, label: str) -> Row:
    def span(values: Sequence[int]) -> str:
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    colocated = res.strategy == "colocated"
    return Row(
        workload=res.workload,
        strategy=res.strategy,
        label=label,
        prefill="-" if colocated else span([p.prefill for p in res.timeline]),
        decode=span([p.decode for p in res.timeline]),
        attainment=res.attainment,
        ttft_attainment=res.ttft_attainment,
        tpot_attainment=res.tpot_attainment,
        ttft_p99=res.percentile("ttft", 99),
        tpot_p99=res.percentile("tpot", 99),
        goodput=res.goodput,
        gpu_seconds=res.gpu_seconds,
        mean_gpus=res.mean_gpus,
        decisions=len(res.decisions),
        oscillations=(
            replay.oscillations(res.decisions, "prefill", OSCILLATION_WINDOW),
            replay.oscillations(res.decisions, "decode", OSCILLATION_WINDOW),
        ),
        requests=len(res.outcomes),
    )


def _strategy(kind: str, prefill: int, decode: int) -> replay.Strategy:
    if kind == "static":
        return replay.Static(prefill, decode)
    if kind == "colocated":
        return replay.Colocated(prefill + decode)
    if kind == "hpa":
        return replay.Hpa(prefill, decode, (BOUNDS, BOUNDS))
    if kind == "tandem":
        return replay.Tandem(prefill, decode, planner_spec())
    if kind == "tandem-reactive":
        return replay.Tandem(prefill, decode, planner_spec(reactive=True), name="tandem-reactive")
    raise ValueError(kind)


def run_scheduled(
    quick: bool, workload: str, schedule: replay.Scheduled
) -> tuple[Row, replay.Result]:
    res = replay.replay(workloads(quick)[workload](), schedule, CONFIG)
    return _row(res, schedule.name), res


def run_one(
    quick: bool, workload: str, kind: str, prefill: int, decode: int, label: str = ""
) -> tuple[Row, replay.Result]:
    wl = workloads(quick)[workload]()
    res = replay.replay(wl, _strategy(kind, prefill, decode), CONFIG)
    return _row(res, label or kind), res


Scores = tuple[float, float, float]
"""Share of requests within the TTFT SLO, within the TPOT SLO, within both."""


def _scores(res: replay.Result, since: float = 0.0) -> Scores:
    """``res``'s shares, of the requests that arrived at ``since`` or later."""
    kept = tuple(o for o in res.outcomes if o.request.arrival >= since)
    res = dataclasses.replace(res, outcomes=kept)
    return res.ttft_attainment, res.tpot_attainment, res.attainment


def smallest_pools(run: Callable[[int, int], Scores]) -> tuple[int, int]:
    """The smallest static pools that keep ≥99% of requests within both SLOs: each
    role alone first (the other at its most), then one worker at a time to the
    role whose growth helps more (a TTFT miss can be the decode side's: the first
    token waits for room in a decode worker)."""
    run = functools.cache(run)
    top = MAX_REPLICAS

    def fewest(ok: Callable[[int], bool]) -> int:
        lo, hi = 0, top  # bisection: more workers never serve worse
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi

    p = fewest(lambda n: run(n, top)[0] >= 0.995)
    d = fewest(lambda n: run(top, n)[1] >= 0.995)
    while (p, d) != (top, top) and run(p, d)[2] < ATTAINMENT_GOAL:
        grow = [(p + 1, d)] if p < top else []
        grow += [(p, d + 1)] if d < top else []
        p, d = max(grow, key=lambda pd: run(*pd)[2])
    return p, d


def search_static(quick: bool, workload: str) -> tuple[int, int]:
    """The smallest static pools for the whole trace: static peak provisioning."""
    wl = workloads(quick)[workload]()
    return smallest_pools(lambda p, d: _scores(replay.replay(wl, replay.Static(p, d), CONFIG)))


HINDSIGHT_BLOCK = 120.0
"""Seconds of trace the hindsight schedule sizes the pools for at a time."""
HINDSIGHT_LEAD_IN = 60.0
"""Seconds of arrivals before a block replayed with it (and not scored), so that
the block does not start on idle workers."""


def hindsight_schedule(quick: bool, workload: str) -> replay.Scheduled:
    """The pools an autoscaler with perfect foresight would have: for every block
    of the trace, the smallest static pools that keep ≥99% of that block's
    requests within both SLOs (:class:`replay.Scheduled` asks for each growth a
    provisioning delay ahead).
    The ceiling of any autoscaler at this granularity."""
    wl = workloads(quick)[workload]()
    changes: list[tuple[float, int, int]] = []
    t = 0.0
    while t < wl.duration:
        t0, t1 = max(0.0, t - HINDSIGHT_LEAD_IN), min(wl.duration, t + HINDSIGHT_BLOCK)
        shifted = tuple(
            dataclasses.replace(r, arrival=r.arrival - t0)
            for r in wl.requests
            if t0 <= r.arrival < t1
        )
        block = replay.Workload(wl.name, shifted, t1 - t0, wl.description)

        def run(p: int, d: int, skip: float = t - t0, block: replay.Workload = block) -> Scores:
            res = replay.replay(block, replay.Static(p, d), CONFIG)
            return _scores(res, since=skip)

        changes.append((t, *smallest_pools(run)))
        t += HINDSIGHT_BLOCK
    (_, p0, d0), *rest = changes
    return replay.Scheduled(p0, d0, tuple(rest), name="hindsight")


# ---------------------------------------------------------------------------
# Where disaggregation wins: the most load each layout carries within the SLOs


SWEEP_GPUS = 4
SWEEP_PROMPTS = (128, 512, 2048, 6000)
SWEEP_OUTPUT = 256
SWEEP_TPOTS = (0.025, 0.015)


def _attains(
    prompt: int, tpot: float, rate: float, layout: tuple[int, int], seconds: float
) -> bool:
    wl = replay.steady(rate=rate, duration=seconds, prompt=prompt, output=SWEEP_OUTPUT, seed=11)
    config = dataclasses.replace(CONFIG, tpot_slo=tpot)
    p, d = layout
    strategy: replay.Strategy = replay.Colocated(d) if p == 0 else replay.Static(p, d)
    return replay.replay(wl, strategy, config).attainment >= ATTAINMENT_GOAL


def max_rate(prompt: int, tpot: float, layout: tuple[int, int], quick: bool) -> float:
    """Bisection on the arrival rate: the highest one still within both SLOs."""
    seconds = 120.0 if quick else 180.0
    lo, hi = 0.0, 1.0
    while hi < 4096 and _attains(prompt, tpot, hi, layout, seconds):
        lo, hi = hi, hi * 2
    for _ in range(5 if quick else 6):
        mid = (lo + hi) / 2
        if _attains(prompt, tpot, mid, layout, seconds):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------
# Report


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _ms(x: float) -> str:
    return "∞" if math.isinf(x) else f"{1000 * x:.0f} ms" if x < 10 else f"{x:.0f} s"


def results_table(rows: Sequence[Row], static_gpu_seconds: float) -> list[str]:
    out = [
        "| strategy | prefill | decode | within both SLOs | TTFT ok | TPOT ok | TTFT p99 | TPOT p99 "
        "| goodput (req/s) | GPU-seconds | vs static peak | decisions | up-down-up < 5m (P/D) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        saving = 1 - r.gpu_seconds / static_gpu_seconds
        out.append(
            f"| {r.label} | {r.prefill} | {r.decode} | {_pct(r.attainment)} | {_pct(r.ttft_attainment)} "
            f"| {_pct(r.tpot_attainment)} | {_ms(r.ttft_p99)} | {_ms(r.tpot_p99)} | {r.goodput:.2f} "
            f"| {r.gpu_seconds:,.0f} | {-saving:+.1%} | {r.decisions} | {r.oscillations[0]}/{r.oscillations[1]} |"
        )
    return out


def plot(workload: str, results: dict[str, replay.Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    styles: dict[str, str | tuple[int, tuple[int, ...]]] = {
        "static": ":", "hpa": "-.", "tandem": "-", "tandem-reactive": "--", "hindsight": (0, (1, 1)),
    }  # fmt: skip
    for name in ("static", "hindsight", "tandem", "tandem-reactive", "hpa"):
        res = results.get(name)
        if res is None:
            continue
        t = [p.time / 60 for p in res.timeline]
        style = styles[name]
        for role, color in (("prefill", "tab:blue"), ("decode", "tab:orange")):
            workers = [getattr(p, role) for p in res.timeline]
            axes[0].step(
                t, workers, where="post", linestyle=style, label=f"{name} {role}", color=color
            )
        if name in ("static", "tandem"):
            for ax, attr in ((axes[1], "ttft"), (axes[2], "tpot")):
                values = [getattr(p, attr) for p in res.timeline]
                ax.plot(
                    t,
                    [v * 1000 if v is not None else math.nan for v in values],
                    linestyle=style,
                    label=name,
                )
    axes[0].set_ylabel("workers")
    axes[0].legend(ncol=4, fontsize=7)
    axes[0].set_title(f"{workload}: workers over time (Tandem scales each role on its own)")
    for ax, slo, what in ((axes[1], CONFIG.ttft_slo, "TTFT"), (axes[2], CONFIG.tpot_slo, "TPOT")):
        ax.axhline(slo * 1000, color="red", linewidth=1, label=f"{what} SLO")
        ax.set_ylabel(f"{what} p99 (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[2].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter traces and sweep")
    parser.add_argument(
        "--workloads",
        default="diurnal-4x,steady,diurnal,bursty,shifting",
        help="comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip the disaggregated-vs-colocated sweep"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "AUTOSCALING.md")
    parser.add_argument("--plots-dir", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    if not args.no_plots:
        args.plots_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    kinds = ("static", "colocated", "hpa", "tandem-reactive", "tandem")

    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        found = {n: pool.submit(hindsight_schedule, args.quick, n) for n in names}
        sizes = dict(
            zip(names, pool.map(search_static, [args.quick] * len(names), names), strict=True)
        )
        schedules = {n: job.result() for n, job in found.items()}
        print("static peak:", sizes, file=sys.stderr)
        # Fixed pools at the static peak; the autoscalers start where hindsight
        # does (what the trace's first minutes need), so none pays for a cold
        # start at the peak size.
        start = {
            (n, k): sizes[n] if k in ("static", "colocated") else schedules[n].start
            for n in names for k in kinds
        }  # fmt: skip
        jobs = {
            (n, k): pool.submit(run_one, args.quick, n, k, *start[(n, k)])
            for n in names
            for k in kinds
        }
        hindsight = {n: pool.submit(run_scheduled, args.quick, n, schedules[n]) for n in names}
        sweep_jobs = {}
        if not args.no_sweep:
            prompts = SWEEP_PROMPTS[1:] if args.quick else SWEEP_PROMPTS
            for tpot in SWEEP_TPOTS:
                for prompt in prompts:
                    layouts = [(0, SWEEP_GPUS)] + [
                        (p, SWEEP_GPUS - p) for p in range(1, SWEEP_GPUS)
                    ]
                    for layout in layouts:
                        sweep_jobs[(tpot, prompt, layout)] = pool.submit(
                            max_rate, prompt, tpot, layout, args.quick
                        )
        done = {key: job.result() for key, job in jobs.items()}
        done |= {(n, "hindsight"): job.result() for n, job in hindsight.items()}
        sweep = {key: job.result() for key, job in sweep_jobs.items()}

    lines = [
        "# Autoscaling in replay: Tandem's planner against static, HPA and colocated pools",
        "",
        f"Generated by `{' '.join(['.venv/bin/python benchmarks/replay.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"on {datetime.date.today().isoformat()} in {time.monotonic() - started:.0f} s "
        "(virtual time: the numbers do not depend on the machine).",
        "",
        "## Setup",
        "",
        "| | |",
        "|---|---|",
        f"| engine | the emulator's roofline (`tandem.workers.emulator.timing`): {CONFIG.engine.gpu.name}, "
        f"{CONFIG.engine.shape.name}, MFU {CONFIG.engine.gpu.mfu}, MBU {CONFIG.engine.gpu.mbu}, "
        f"{1000 * CONFIG.engine.step_overhead:g} ms per step, {CONFIG.engine.max_num_batched_tokens} tokens per step, "
        f"KV {CONFIG.engine.kv_capacity:,} tokens per worker, KV link {CONFIG.engine.kv_link_bandwidth / 1e9:g} GB/s |",
        f"| SLOs | TTFT ≤ {_ms(CONFIG.ttft_slo)} and TPOT ≤ {_ms(CONFIG.tpot_slo)} per request (TPOT: mean "
        "over the request's tokens after the first); goal: ≥99% of requests within both |",
        f"| cluster | a worker asked for costs GPU-seconds at once and serves after {CONFIG.provisioning_delay:g} s; "
        f"its samples count after {CONFIG.warmup:g} s more; removed workers drain first; autoscalers tick every "
        f"{CONFIG.interval:g} s over a {CONFIG.window:g} s window, p{CONFIG.percentile:g} |",
        "| static peak | the smallest fixed prefill/decode pools that keep ≥99% within both SLOs over the "
        "whole trace (searched) |",
        "| colocated | the same number of GPUs, each worker prefilling and decoding (vLLM's chunked "
        "prefill: every running decode waits for the step that carries a prefill chunk) |",
        "| hpa | a Kubernetes HPA per role on GPU utilization (busy time), target 70%, 10% tolerance, "
        "scale-up at once (at most x2 or +4), scale-down to the highest recommendation of 5 min |",
        "| tandem-reactive | `tandem/autoscaling/planner.py` with the CRD's defaults: stabilization 30 s up / "
        "5 min down, steps +2/-1, 4 queued per worker; planner tunables at their defaults (hysteresis band "
        "0.8-1.1; a prefill pool of n workers runs at the utilization Erlang C allows for TTFT at p99, at most "
        "90%; decode KV held to 80% of the usage at which the fitted TPOT line meets the SLO, 80% until "
        "fitted); prefill capacity learned |",
        "| tandem | the same with the settings of `examples/llama-8b-h100.yaml` (all CRD fields): "
        "`scaleUpStabilization: 15s`, `scaleDownStabilization: 3m`, `forecast: 75s` (stabilization + "
        "provisioning: the rising decode rate and prompt load are extrapolated that far), `prefillCapacity` "
        f"{profiled_prefill_capacity():,.0f} (prompt tokens/s per worker: the roofline for 2k-token prompts), "
        "`decodeStep` {0:.1f} ms + {1:.1f} ms per unit of KV usage (the roofline's; a line fitted while "
        "serving replaces it where it reaches the objective at a lower usage), `loadTolerance: 0` and "
        "`loadScaleDownRatio: 1` (the targets of KV usage and prompt load carry the SLO's margin "
        "already) |".format(*(1000 * x for x in profiled_tpot_line())),
        f"| hindsight | not an autoscaler: the ceiling of one. For every {HINDSIGHT_BLOCK:g} s of the trace, the "
        "smallest static pools that keep ≥99% of that block's requests within both SLOs (searched on the "
        f"block's own requests, after {HINDSIGHT_LEAD_IN:g} s of the ones before), each growth asked for a "
        "provisioning delay ahead: what perfect foresight would have run |",
        "| start | static and colocated at the static-peak sizes; the autoscalers at hindsight's first "
        "block's (what the trace's first minutes need: none pays for a cold start at the peak size); "
        "bounds 1-16 per role |",
        "",
    ]
    results: dict[str, dict[str, replay.Result]] = {}
    verdicts = []
    for name in names:
        shown = (*kinds, "hindsight") if (name, "hindsight") in done else kinds
        rows = [done[(name, k)][0] for k in shown]
        results[name] = {k: done[(name, k)][1] for k in shown}
        wl = workloads(args.quick)[name]()
        static = rows[0]
        p, d = sizes[name]
        lines += [
            f"## {name}",
            "",
            f"{wl.description}; {len(wl.requests):,} requests over {wl.duration / 60:.0f} min. "
            f"Static peak: {p} prefill + {d} decode.",
            "",
            *results_table(rows, static.gpu_seconds),
            "",
        ]
        if not args.no_plots and plot(
            name, results[name], args.plots_dir / f"autoscaling-{name}.png"
        ):
            lines += [f"![{name}](../docs/autoscaling-{name}.png)", ""]
        for r in rows:
            if r.strategy.startswith("tandem") or r.strategy == "hindsight":
                saving = 1 - r.gpu_seconds / static.gpu_seconds
                ok = r.attainment >= ATTAINMENT_GOAL and saving >= 0.25
                verdicts.append(
                    f"| {name} | {r.label} | {_pct(r.attainment)} | {saving:.1%} | "
                    f"{'yes' if ok else 'no'} | {sum(r.oscillations)} |"
                )
    lines += [
        "## Against the targets",
        "",
        "Target: ≥99% of requests within both SLOs with ≥25% fewer GPU-seconds than static peak, and no "
        f"up-down-up of a role within a scale-down stabilization window ({OSCILLATION_WINDOW / 60:g} min, "
        "the CRD's default).",
        "",
        "| workload | planner | within both SLOs | GPU-seconds saved | meets both | up-down-up |",
        "|---|---|---|---|---|---|",
        *verdicts,
        "",
    ]
    if sweep:
        lines += [
            "## Where disaggregation wins and where it loses",
            "",
            f"The most load (req/s, steady Poisson, output ~{SWEEP_OUTPUT} tokens) that {SWEEP_GPUS} GPUs carry "
            "with ≥99% of requests within both SLOs (TTFT ≤ 500 ms), colocated versus the best fixed "
            "prefill:decode split (bisection on the rate over 3-minute traces, 6 steps: about ±1.5%).",
            "",
            "| TPOT SLO | prompt (mean) | colocated | best split | its rate | winner | split / colocated |",
            "|---|---|---|---|---|---|---|",
        ]
        winners: dict[float, list[tuple[int, str]]] = {}
        for tpot in SWEEP_TPOTS:
            for prompt in sorted({k[1] for k in sweep}):
                colocated = sweep[(tpot, prompt, (0, SWEEP_GPUS))]
                splits = {
                    k[2]: v
                    for k, v in sweep.items()
                    if k[0] == tpot and k[1] == prompt and k[2][0] > 0
                }
                (bp, bd), best = max(splits.items(), key=lambda kv: kv[1])
                winner = (
                    "disaggregated"
                    if best > colocated * 1.05
                    else "colocated"
                    if colocated > best * 1.05
                    else "even"
                )
                ratio = f"{best / colocated:.2f}x" if colocated > 0 else "∞"
                lines.append(
                    f"| {_ms(tpot)} | {prompt} | {colocated:.1f} | {bp}P:{bd}D | {best:.1f} | {winner} | {ratio} |"
                )
                winners.setdefault(tpot, []).append((prompt, winner))
        lines += [
            "",
            "What `mode: auto` should follow (`autoThresholdTokens`: prompts below it skip the prefill hop):",
            "",
        ]
        for tpot, by_prompt in winners.items():
            wins = [prompt for prompt, winner in by_prompt if winner == "disaggregated"]
            local = [prompt for prompt, winner in by_prompt if winner != "disaggregated"]
            if not wins:
                advice = "colocated serving carried at least as much at every prompt length: prefill locally"
            else:
                first = min(wins)
                below = [p for p in local if p < first]
                advice = f"disaggregation pays from {first}-token prompts" + (
                    f"; up to {max(below)} tokens, prefill locally" if below else ""
                )
            lines.append(f"- TPOT ≤ {_ms(tpot)}: {advice}.")
        lines.append("")
    lines += [
        "## What the simulation leaves out",
        "",
        "- The engine is a roofline (calibrated on an H100 for prefill ≥2k tokens and CUDA-graph decode, "
        "`benchmarks/GPU_CALIBRATION.md`); short prefills are optimistic there.",
        "- KV admission is vLLM's (room for the prompt now), but preemption is not modelled: a full cache "
        "delays admission only.",
        "- The router is ideal (least-loaded, no overhead), the KV link is uncontended across workers, "
        "and a worker's start takes a fixed delay.",
        "- The planner sees exact percentiles over its window (Prometheus sees histogram buckets).",
        "",
    ]
    # A hand-written "## Findings" section of the previous report survives a rerun.
    previous = args.out.read_text() if args.out.exists() else ""
    marker = "\n## Findings"
    if marker in previous:
        lines.append(previous[previous.index(marker) + 1 :].rstrip("\n") + "\n")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
