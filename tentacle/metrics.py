"""
The agent's counters, in Prometheus' text format.

They are fed by the structured log events the listener, the exchange and the
services already emit (see L{tentacle.observe}), so nothing in the request
path knows about metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

#: Request latency buckets, in seconds: most calls are milliseconds, a
#: StartScript that waits for its script can take minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """
    A sample value, exactly: integers as integers (C{314572800}, never
    C{3.14573e+08}), floats with every digit (C{repr}), and Prometheus'
    spellings of the infinities and NaN.
    """
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(pairs: Mapping[str, object]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


class Metrics:
    """
    Counters and a latency histogram; gauges are read when rendered.

    @param gauges: called at render time for values that are states, not
        counts (scripts running and pending).
    """

    def __init__(
        self,
        gauges: Callable[[], Mapping[str, float]] | None = None,
        polling: Callable[[], Iterable[tuple[Any, int, int]]] | None = None,
    ) -> None:
        """
        @param polling: each polling server (with C{address} and
            C{subscription_id}), its connections up and configured.
        """
        self.connections_accepted = 0
        self.connections_refused: Counter[str] = Counter()
        self.connections_evicted: Counter[str] = Counter()
        self.handshakes_timed_out: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.scripts_finished: Counter[int] = Counter()
        self.bytes_uploaded = 0
        self.bytes_downloaded = 0
        #: Polling connections that identified, and refusals, by server address.
        self.polling_sessions: Counter[str] = Counter()
        self.polling_refused: Counter[str] = Counter()
        #: Observations per bucket, each counted once (in the first bucket
        #: whose bound it does not pass, or none past the last bound);
        #: rendering adds them up, as Prometheus' buckets are cumulative.
        self._latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._gauges = gauges
        self._polling = polling

    def observe_latency(self, seconds: float) -> None:
        # One bucket per request (every request makes one observation);
        # NaN, which passes no bound, lands past the last, as before.
        self._latency_buckets[bisect_left(LATENCY_BUCKETS, seconds) if seconds == seconds else -1] += 1
        self._latency_sum += seconds
        self._latency_count += 1

    def render(self) -> str:
        """
        The Prometheus text exposition format, version 0.0.4.
        """
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, object], float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{_labels(labels)} {format_value(value)}")

        metric("tentacle_connections_accepted_total", "counter",
               "TCP connections accepted by the listener.", [({}, self.connections_accepted)])
        metric("tentacle_connections_refused_total", "counter",
               "Connections refused, by reason.",
               [({"reason": r}, n) for r, n in sorted(self.connections_refused.items())])
        metric("tentacle_connections_evicted_total", "counter",
               "Unauthenticated connections closed to make room for newer ones, by the budget that was full.",
               [({"reason": r}, n) for r, n in sorted(self.connections_evicted.items())])
        metric("tentacle_handshakes_timed_out_total", "counter",
               "Unauthenticated connections cut off at a deadline, by the deadline.",
               [({"reason": r}, n) for r, n in sorted(self.handshakes_timed_out.items())])
        metric("tentacle_requests_total", "counter",
               "Requests answered, by service, method and outcome.",
               [({"service": s, "method": m, "outcome": o}, n) for (s, m, o), n in sorted(self.requests.items())])
        lines.append("# HELP tentacle_request_duration_seconds Time from a request's arrival to its answer.")
        lines.append("# TYPE tentacle_request_duration_seconds histogram")
        count = 0
        for bound, observed in zip(LATENCY_BUCKETS, self._latency_buckets):
            count += observed
            lines.append(f'tentacle_request_duration_seconds_bucket{{le="{bound!r}"}} {count}')
        lines.append(f'tentacle_request_duration_seconds_bucket{{le="+Inf"}} {self._latency_count}')
        lines.append(f"tentacle_request_duration_seconds_sum {format_value(self._latency_sum)}")
        lines.append(f"tentacle_request_duration_seconds_count {self._latency_count}")
        gauges = dict(self._gauges()) if self._gauges else {}
        metric("tentacle_scripts_running", "gauge", "Scripts running now.",
               [({}, gauges.get("running", 0))])
        metric("tentacle_scripts_pending", "gauge", "Scripts waiting for a mutex or a slot.",
               [({}, gauges.get("pending", 0))])
        metric("tentacle_scripts_finished_total", "counter", "Scripts finished, by exit code.",
               [({"exit_code": c}, n) for c, n in sorted(self.scripts_finished.items())])
        metric("tentacle_uploaded_bytes_total", "counter", "Bytes stored by uploads.",
               [({}, self.bytes_uploaded)])
        metric("tentacle_downloaded_bytes_total", "counter", "Bytes sent by downloads.",
               [({}, self.bytes_downloaded)])
        if self._polling is not None:
            servers = list(self._polling())
            metric("tentacle_polling_connections", "gauge",
                   "Polling connections identified with their server now.",
                   [({"server": s.address, "subscription": s.subscription_id}, up) for s, up, _ in servers])
            metric("tentacle_polling_connections_configured", "gauge",
                   "Polling connections configured per server.",
                   [({"server": s.address, "subscription": s.subscription_id}, n) for s, _, n in servers])
            metric("tentacle_polling_sessions_total", "counter",
                   "Polling connections that identified with their server, by server.",
                   [({"server": s}, n) for s, n in sorted(self.polling_sessions.items())])
            metric("tentacle_polling_refused_total", "counter",
                   "Polling connections refused (wrong certificate, or not trusted by the server).",
                   [({"server": s}, n) for s, n in sorted(self.polling_refused.items())])
        return "\n".join(lines) + "\n"
