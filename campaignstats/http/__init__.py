"""campaignstats over HTTP (docs/http.md): an ASGI application over :class:`StatsService`.

    import campaignstats.http

    stats_app = campaignstats.http.app(service)      # mount it: app.mount("/stats", stats_app)
    ...
    await stats_app.close()                            # ends the event streams at shutdown

``campaignstats serve`` runs it with uvicorn on ``--http-port`` (:class:`HttpServer`).

- ``app``: routes, caching, CORS, errors, the JSON ingest;
- ``events``: server-sent events, one subscription per campaign fanned out to the streams;
- ``ops``: readiness and Prometheus metrics, read from ``info`` at scrape time;
- ``server``: uvicorn inside the running event loop;
- ``static/``: ``widget.js`` (the ``<campaign-counter>`` element) and the demo page.
"""

from campaignstats.http.app import HttpConfig, StatsHttpApp, app
from campaignstats.http.server import HttpServer

__all__ = ["HttpConfig", "HttpServer", "StatsHttpApp", "app"]
