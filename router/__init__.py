"""tandem.router: the OpenAI-compatible gateway in front of the prefill and decode pools.

Public surface (import the modules, as kopf does):

* :mod:`.settings` — ``RouterSettings`` (loads ``planning.router_config()``'s JSON),
  ``static_settings(...)`` for fixed worker URLs, ``load(path)``;
* :mod:`.app` — ``create_app(settings, transport=...)``: the ASGI app
  (``set_endpoints(role, urls)`` to change workers while it runs);
* :mod:`.server` — ``serving(settings, port=...)`` (uvicorn in this event loop),
  ``build(...)`` (a ``uvicorn.Server``);
* :mod:`.cli` — ``tandem router --config FILE`` (also ``python -m tandem.router``).

Inside, from the pure core out: ``policies`` (``select(features, snapshot)``),
``endpoints`` (snapshots, in-flight counts), ``payloads`` (request checks and the two
hops' bodies), ``tokens``, ``errors`` (one hierarchy, one mapping to OpenAI errors),
``admission`` (the bounded queue), ``migration`` (a stream's token ids and its
continuation on another decode worker), ``orchestration`` (prefill hop, decode hop,
retries, fallback, migration), ``transport`` (HTTP/1.1 to the workers), ``discovery``
(static, EndpointSlice watch, metrics scraping), ``metrics`` (see ``METRICS.md``).
"""

if __name__ != "tandem.router":
    # The repository root is on sys.path: this folder is the installed package
    # tandem.router, never a top-level `router` (one import path per module).
    raise ImportError(f"import tandem.router, not {__name__}: router/ installs as tandem.router")
