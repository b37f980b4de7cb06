"""Tandem on a real node: ``helm install`` runs the operator, ``kubectl apply -f
examples/tiny.yaml`` runs a router and real vLLM (CPU) prefill and decode pods that
pass the KV cache over NIXL, and a new operator adopts the pool without touching it.

One helm release and one pool serve the whole module: a pool takes minutes to
come up (vLLM imports and engine start on two slow cores). The images are the ones
``scripts/build-images.sh tandem vllm-cpu`` wrote (``up`` imported them); the
chart is installed with ``--set image.repository/tag`` naming the local one.
Figures (apply → Ready, → first token, the request's time) are printed as
``cluster: ...`` lines.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import node

REPO_ROOT = node.REPO_ROOT
RELEASE = "tandem"
OPERATOR_NAMESPACE = "tandem-e2e"
POOL_NAMESPACE = "tiny-e2e"
POOL = "tiny"
EXAMPLE = REPO_ROOT / "examples" / "tiny.yaml"
CRD = "inferencepools.tandem.dev"
RESYNC_S = 10
"""The operator's drift-check interval here, so a takeover is checked within seconds."""
POOL_READY_TIMEOUT_S = 900.0
"""Measured: ~100 s for one vLLM pod alone; two at once on two shared cores, longer."""
REQUEST_TIMEOUT_S = 180.0
"""DESIGN.md: a known CPU-starvation stall can hold a decode ~30 s in some rounds."""
PROMPT = " ".join(
    [
        "Prefill reads the whole prompt at once and sets the time to first token.",
        "Decode makes one token per step and re-reads the weights and the KV cache.",
        "A router sends the prompt to a prefill worker, then the request to a decode worker.",
        "The decode worker pulls the key and value blocks from the prefill worker with NIXL.",
        "Kubernetes runs the pods; the operator reconciles an InferencePool into Deployments.",
    ]
)
"""About 180 tokens of the tiny tokenizer: several KV blocks to move."""

Say = Callable[[str], None]


@dataclass
class Release:
    kubeconfig: Path
    namespace: str
    deployment: str
    lease: str
    image: str
    seconds_to_ready: float


@dataclass
class Pool:
    kubeconfig: Path
    namespace: str
    applied_at: float
    """time.monotonic() when ``kubectl apply`` returned."""
    seconds_to_ready: float
    figures: dict[str, float] = field(default_factory=dict)


def _json(kubeconfig: Path, *args: str) -> Any:
    return json.loads(node.kubectl(kubeconfig, *args, "-o", "json").stdout)


def _image_ref(archive: str) -> str:
    """The reference build-images.sh gave an archive (its .json sidecar), or fail."""
    meta = node.images_dir() / f"{archive}.json"
    tar = node.images_dir() / f"{archive}.tar"
    if not tar.is_file() or not meta.is_file():
        pytest.fail(
            f"no {tar}: build the images first (bash scripts/build-images.sh tandem vllm-cpu; "
            "scripts/cluster.sh up imports them)",
            pytrace=False,
        )
    ref: str = json.loads(meta.read_text())["ref"]
    return ref


def _pod_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _pod_line(pod: dict[str, Any]) -> str:
    status = pod.get("status", {})
    states = []
    for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", []):
        (state, detail), *_ = c.get("state", {"unknown": {}}).items()
        reason = detail.get("reason", "")
        restarts = f" restarts={c['restartCount']}" if c.get("restartCount") else ""
        states.append(f"{c['name']}={state}{'/' + reason if reason else ''}{restarts}")
    ready = "Ready" if _pod_ready(pod) else status.get("phase", "?")
    return f"{pod['metadata']['name']} {ready} [{', '.join(states)}]"


def _diagnose(kubeconfig: Path, namespace: str) -> str:
    """Events and log tails of a namespace's pods, for a failure message."""
    out = [
        node.kubectl(kubeconfig, "get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    ]
    events = node.kubectl(
        kubeconfig, "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
    )
    out.append("\n".join(events.stdout.splitlines()[-25:]))
    for pod in _json(kubeconfig, "get", "pods", "-n", namespace)["items"]:
        if _pod_ready(pod):
            continue
        name = pod["metadata"]["name"]
        logs = node.kubectl(
            kubeconfig, "logs", "-n", namespace, name, "--all-containers", "--tail=30",
            check=False,
        )  # fmt: skip
        out.append(f"--- {name}\n{logs.stdout}{logs.stderr}")
    return "\n".join(out)


def _wait_pods_ready(
    kubeconfig: Path, namespace: str, selector: str, count: int, timeout: float, say: Say
) -> float:
    """Seconds until ``count`` pods matching ``selector`` are Ready; progress every 15 s."""
    start = last_said = time.monotonic()
    while True:
        pods = _json(kubeconfig, "get", "pods", "-n", namespace, "-l", selector)["items"]
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        elapsed = time.monotonic() - start
        if len(pods) >= count and all(_pod_ready(p) for p in pods):
            say(f"{namespace}: {len(pods)} pod(s) Ready after {elapsed:.0f} s")
            return elapsed
        if time.monotonic() - last_said >= 15:
            last_said = time.monotonic()
            lines = "; ".join(_pod_line(p) for p in pods) or "no pods yet"
            say(f"{namespace} +{elapsed:.0f}s: {lines}")
        if elapsed > timeout:
            pytest.fail(
                f"{namespace}: pods ({selector}) not Ready after {timeout:.0f} s\n"
                + _diagnose(kubeconfig, namespace),
                pytrace=False,
            )
        time.sleep(2)


@pytest.fixture(scope="module")
def release(cluster_kubeconfig: Path, say: Say) -> Iterator[Release]:
    """The chart, installed once with the locally built image."""
    image = _image_ref("tandem")
    _image_ref("tandem-vllm-cpu")  # the tiny pool's engine; fail early when missing
    repository, tag = image.rsplit(":", 1)
    kubeconfig = cluster_kubeconfig
    say(f"helm install {RELEASE} helm/tandem --namespace {OPERATOR_NAMESPACE} ({image})")
    try:
        start = time.monotonic()
        node.helm(
            kubeconfig,
            "upgrade", "--install", RELEASE, str(REPO_ROOT / "helm" / "tandem"),
            "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
            "--set", f"image.repository={repository}",
            "--set", f"image.tag={tag}",
            "--set", f"operator.resyncInterval={RESYNC_S}",
            # Per-pool lines at debug show when a new leader has reconciled a pool.
            "--set", "operator.logLevel=debug",
        )  # fmt: skip
        (deployment,) = _json(
            kubeconfig, "get", "deployments", "-n", OPERATOR_NAMESPACE,
            "-l", f"app.kubernetes.io/instance={RELEASE}",
        )["items"]  # fmt: skip
        replicas = deployment["spec"]["replicas"]
        selector = ",".join(
            f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items()
        )
        _wait_pods_ready(kubeconfig, OPERATOR_NAMESPACE, selector, replicas, 180, say)
        seconds = time.monotonic() - start
        say(f"operator: {replicas} pod(s) Ready {seconds:.1f} s after helm install began")
        yield Release(
            kubeconfig=kubeconfig,
            namespace=OPERATOR_NAMESPACE,
            deployment=deployment["metadata"]["name"],
            lease=deployment["metadata"]["name"],  # the chart's default lease name
            image=image,
            seconds_to_ready=seconds,
        )
    finally:
        # The pool first, while its operator still runs; then the release.
        for step, command in [
            ("delete the pool's namespace", ("kubectl", "delete", "namespace", POOL_NAMESPACE,
                                             "--ignore-not-found", "--timeout=240s")),
            ("helm uninstall", ("helm", "uninstall", RELEASE, "--namespace", OPERATOR_NAMESPACE,
                                "--wait", "--timeout", "120s")),
            ("delete the operator's namespace", ("kubectl", "delete", "namespace",
                                                 OPERATOR_NAMESPACE, "--ignore-not-found",
                                                 "--timeout=120s")),
            # helm never upgrades a CRD: a kept cluster's next install gets the current one.
            ("delete the CRD", ("kubectl", "delete", "crd", CRD,
                                "--ignore-not-found", "--timeout=60s")),
        ]:  # fmt: skip
            begun = time.monotonic()
            run = node.kubectl if command[0] == "kubectl" else node.helm
            result = run(kubeconfig, *command[1:], timeout=300, check=False)
            outcome = "done" if result.returncode == 0 else f"failed: {result.stderr.strip()}"
            say(f"teardown: {step} {outcome} in {time.monotonic() - begun:.0f} s")


@pytest.fixture(scope="module")
def pool(release: Release, say: Say) -> Iterator[Pool]:
    """examples/tiny.yaml applied as is, with every pod Ready; its figures printed at the end."""
    kubeconfig = release.kubeconfig
    node.kubectl(kubeconfig, "create", "namespace", POOL_NAMESPACE, check=False)
    node.kubectl(kubeconfig, "apply", "-n", POOL_NAMESPACE, "-f", str(EXAMPLE))
    applied_at = time.monotonic()
    say(f"kubectl apply -f examples/tiny.yaml -n {POOL_NAMESPACE}: waiting for 3 pods")
    # router + prefill + decode (replicas.min 1 each)
    seconds = _wait_pods_ready(
        kubeconfig, POOL_NAMESPACE, f"tandem.dev/pool={POOL}", 3, POOL_READY_TIMEOUT_S, say
    )
    say(f"tiny pool: all pods Ready {seconds:.0f} s after kubectl apply")
    figures = {"helm_install_to_operator_ready_s": release.seconds_to_ready,
               "apply_to_ready_s": seconds}  # fmt: skip
    pool = Pool(kubeconfig, POOL_NAMESPACE, applied_at, seconds, figures)
    yield pool
    say("figures: " + ", ".join(f"{k} {v:.1f}" for k, v in pool.figures.items()))


def test_chart_installs_and_the_operator_is_ready(release: Release) -> None:
    pods = _json(
        release.kubeconfig, "get", "pods", "-n", release.namespace,
        "-l", f"app.kubernetes.io/instance={RELEASE}",
    )["items"]  # fmt: skip
    assert pods
    assert all(_pod_ready(p) for p in pods)
    for pod in pods:
        spec = pod["spec"]
        (container,) = spec["containers"]
        assert container["image"] == release.image
        assert spec["serviceAccountName"] == release.deployment
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    lease = _json(release.kubeconfig, "get", "lease", "-n", release.namespace, release.lease)
    assert lease["spec"]["holderIdentity"] in {p["metadata"]["name"] for p in pods}


def test_tiny_pool_pods_become_ready(pool: Pool, say: Say) -> None:
    kubeconfig = pool.kubeconfig
    deadline = time.monotonic() + 120
    while True:
        body = _json(kubeconfig, "get", "tpool", "-n", pool.namespace, POOL)
        status = body.get("status", {})
        ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
        if ready and ready[0]["status"] == "True":
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the pool never said Ready=True: {json.dumps(status, indent=1)}")
        time.sleep(2)
    assert status["prefill"]["readyReplicas"] >= 1
    assert status["decode"]["readyReplicas"] >= 1
    table = node.kubectl(kubeconfig, "get", "tpool", "-n", pool.namespace).stdout
    say("kubectl get tpool:\n" + table.rstrip())
    (cells,) = _table(table)
    assert cells["READY"] == "True"
    assert cells["PREFILL"].startswith("1/")
    assert cells["DECODE"].startswith("1/")

    # The worker pods run hardened, from the engine image the example names.
    for role in ("prefill", "decode"):
        (pod,) = _json(
            kubeconfig, "get", "pods", "-n", pool.namespace, "-l",
            f"tandem.dev/pool={POOL},tandem.dev/role={role}",
        )["items"]  # fmt: skip
        (container,) = pod["spec"]["containers"]
        assert "tandem-vllm-cpu" in container["image"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert [c["name"] for c in pod["spec"]["initContainers"]] == ["tiny-model"]


def _table(text: str) -> list[dict[str, str]]:
    """Rows of kubectl's table output, cut at the header's columns (cells may be empty)."""
    header, *rows = text.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{n: row[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)} for row in rows]


def _service_url(kubeconfig: Path, namespace: str, name: str) -> tuple[str, int]:
    service = _json(kubeconfig, "get", "service", "-n", namespace, name)
    return service["spec"]["clusterIP"], service["spec"]["ports"][0]["port"]


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        if all(re.search(rf'{k}="{re.escape(v)}"', series) for k, v in labels.items()):
            total += float(value)
    return total


@dataclass(frozen=True)
class Stream:
    events: list[str]
    """Every ``data:`` payload, ``[DONE]`` included."""
    text: str
    started: float
    first_token_at: float
    done: float


def _stream_chat(host: str, port: int, content: str) -> Stream:
    """One streamed chat completion, its SSE framing checked line by line."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "stream": True,
        # Random weights: without it the stream may end at a sampled EOS at once.
        "ignore_eos": True,
    }
    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    events: list[str] = []
    first_token_at: float | None = None
    text = ""
    try:
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body),
            {"Content-Type": "application/json", "Accept": "text/event-stream"},
        )  # fmt: skip
        response = conn.getresponse()
        assert response.status == 200, response.read().decode(errors="replace")
        assert response.headers["Content-Type"].startswith("text/event-stream")
        while raw := response.readline():
            line = raw.decode().rstrip("\r\n")
            if not line:
                continue
            assert line.startswith("data: "), f"not SSE framing: {line!r}"
            payload = line[len("data: ") :]
            events.append(payload)
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                delta = choice.get("delta", {}).get("content") or ""
                if delta and first_token_at is None:
                    first_token_at = time.monotonic()
                text += delta
    finally:
        conn.close()
    assert events, "an empty stream"
    assert events[-1] == "[DONE]", events[-3:]
    assert text, f"no content in {len(events)} events"
    assert first_token_at is not None
    return Stream(events, text, start, first_token_at, time.monotonic())


def test_streamed_chat_crosses_pods_over_nixl(pool: Pool, say: Say) -> None:
    kubeconfig = pool.kubeconfig
    host, port = _service_url(kubeconfig, pool.namespace, POOL)
    first = _stream_chat(host, port, PROMPT)
    ttft, total = first.first_token_at - first.started, first.done - first.started
    pool.figures.update(
        first_request_ttft_s=ttft,
        first_request_total_s=total,
        apply_to_first_token_s=first.first_token_at - pool.applied_at,
    )
    say(
        f"streamed {len(first.events) - 1} chunks ({len(first.text)} chars): first token "
        f"{ttft:.2f} s, whole stream {total:.2f} s after the request (the first one: NIXL "
        f"handshake); first token {first.first_token_at - pool.applied_at:.0f} s after apply"
    )
    # A second prompt (no prefix shared): the steady state, handshake done.
    second = _stream_chat(host, port, "Tell me a story about a small robot. " + PROMPT[::-1])
    ttft, total = second.first_token_at - second.started, second.done - second.started
    pool.figures.update(second_request_ttft_s=ttft, second_request_total_s=total)
    say(f"second request: first token {ttft:.2f} s, whole stream {total:.2f} s")

    # The decode worker took the prompt's KV from the prefill worker over NIXL.
    (decode,) = _json(
        kubeconfig, "get", "pods", "-n", pool.namespace, "-l",
        f"tandem.dev/pool={POOL},tandem.dev/role=decode",
    )["items"]  # fmt: skip
    metrics = http.client.HTTPConnection(decode["status"]["podIP"], 8000, timeout=30)
    try:
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
    finally:
        metrics.close()
    external = _metric(text, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    failed = _metric(text, "vllm:nixl_num_failed_transfers_total")
    say(f"decode /metrics: external_kv_transfer prompt tokens {external:.0f}, failed {failed:.0f}")
    assert external > 0
    assert failed == 0


def _children(kubeconfig: Path, namespace: str) -> dict[str, tuple[str, str]]:
    """Every child object of the pool, as far as a writer of it shows: its generation and
    labels and annotations where it has a generation (a Deployment's status moves with its
    pods' readiness, which no operator writes), else its resourceVersion."""
    kinds = "deployments,services,configmaps,serviceaccounts,roles,rolebindings"
    items = _json(kubeconfig, "get", kinds, "-n", namespace, "-l", f"tandem.dev/pool={POOL}")
    found = {}
    for obj in items["items"]:
        meta = obj["metadata"]
        key = f"{obj['kind']}/{meta['name']}"
        if "generation" in meta:
            marks = json.dumps([meta.get("labels"), meta.get("annotations")], sort_keys=True)
            found[key] = (str(meta["generation"]), marks)
        else:
            found[key] = (meta["resourceVersion"], "")
    return found


def _leader(release: Release) -> str:
    lease = _json(release.kubeconfig, "get", "lease", "-n", release.namespace, release.lease)
    holder: str = lease["spec"].get("holderIdentity") or ""
    return holder


def test_a_new_operator_takes_over_and_changes_nothing(
    release: Release, pool: Pool, say: Say
) -> None:
    kubeconfig = release.kubeconfig
    before = _children(kubeconfig, pool.namespace)
    assert {"Deployment/tiny-prefill", "Deployment/tiny-decode", "Deployment/tiny-router",
            "Service/tiny", "ConfigMap/tiny-router"} <= set(before)  # fmt: skip
    old = _leader(release)
    assert old, "no operator holds the Lease"
    start = time.monotonic()
    node.kubectl(kubeconfig, "delete", "pod", "-n", release.namespace, old, "--wait=false")
    say(f"deleted the leading operator pod {old}; waiting for another to take the Lease")
    deadline = start + 120
    while (new := _leader(release)) in ("", old):
        if time.monotonic() > deadline:
            pytest.fail(f"nobody took over the Lease from {old} in 120 s")
        time.sleep(1)
    took_over = time.monotonic() - start
    pool.figures["new_leader_after_delete_s"] = took_over
    say(f"{new} leads {took_over:.1f} s after the delete")

    # Wait for the new leader's own drift check of the pool (its resume and a resync
    # timer tick), then give a second tick the time to act.
    deadline = time.monotonic() + 120
    mark = f"[{pool.namespace}/{POOL}] Timer 'resync' succeeded"
    while True:
        logs = node.kubectl(
            kubeconfig, "logs", "-n", release.namespace, new, "--tail=-1", check=False
        ).stdout
        if mark in logs.split("Became the leader", 1)[-1]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{new} logged no {mark!r} in 120 s:\n{logs[-3000:]}")
        time.sleep(2)
    say(f"{new} ran a drift check of the pool {time.monotonic() - start:.0f} s after the delete")
    time.sleep(RESYNC_S + 2)
    replicas = _json(kubeconfig, "get", "deployment", "-n", release.namespace,
                     release.deployment)["spec"]["replicas"]  # fmt: skip
    _wait_pods_ready(
        kubeconfig, release.namespace, f"app.kubernetes.io/instance={RELEASE}", replicas, 120, say
    )
    after = _children(kubeconfig, pool.namespace)
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
               if before.get(k) != after.get(k)}  # fmt: skip
    assert not changed, f"the new operator changed children: {changed}"
    # Its reconcile still sees the pool Ready.
    status = _json(kubeconfig, "get", "tpool", "-n", pool.namespace, POOL)["status"]
    assert [c["status"] for c in status["conditions"] if c["type"] == "Ready"] == ["True"]
