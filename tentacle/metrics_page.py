"""
The metrics over HTTP (C{metrics-port}): Prometheus' scrape target.

Apart from L{tentacle.metrics} because it needs C{twisted.web}, which pulls
in some fifty modules (C{twisted.spread}, C{xml.sax}, C{decimal}, ...,
about 3 MiB of a running agent): imported only when the port is
configured.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from tentacle.metrics import Metrics


class MetricsPage(Resource):
    """
    The metrics at any path, in Prometheus' text format.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics.render().encode("utf-8")


def metrics_site(metrics: Metrics) -> Site:
    """
    The site to listen with (on loopback only: the caller's choice).
    """
    site = Site(MetricsPage(metrics))
    site.noisy = False
    return site
