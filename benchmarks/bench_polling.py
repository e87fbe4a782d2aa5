"""
Polling mode, against listening mode and a bare TLS server measured in the
same run:

  - round trip: C{GetCapabilities} through L{TentacleClient}, to the same
    agent (a child process) reached two ways: listening (a pooled
    connection to its port) and polling (through a polling server in this
    process, whose queue the agent's connection serves).  Goal: polling
    p50 / listening p50 <= 1.5.
  - hub memory per idle subscription: a hub (child process) before and
    after C{--idle} agents' connections (another child process, one
    subscription each) are up and idle, against a bare Twisted TLS server
    holding as many idle mutual-TLS connections.
  - upload through the hub: C{--mib} MiB uploaded by L{TentacleClient} to
    the agent directly, and through a hub (child process) that forwards it
    to the agent's polling connection, spooled on the way.

Rounds interleave the two sides of each comparison; medians and spread are
over the rounds.

Run from the repository root::

    python benchmarks/bench_polling.py [--rounds 3] [--count 500] [--idle 300] [--mib 1024]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import Certificates, MiB

SUBSCRIPTION = "poll://benchagent/"


def spread(values: list[float]) -> str:
    return f"{min(values):.4g}..{max(values):.4g}"


async def round_trips(reactor: Any, args: Any, certs: Certificates, hub_identity: Any, folder: Path) -> dict[str, Any]:
    from tentacle.client.api import Target, TentacleClient
    from tentacle.client.connection import Pin
    from tentacle.hub.polling_server import PollingServer

    server = PollingServer(hub_identity, [certs.agent.thumbprint], reactor, port=0, interface="127.0.0.1")
    server.startService()
    agent = common.start_child(
        common.server_command(
            "polling_servers.py", "agent", certs.agent_pem, certs.server.thumbprint,
            hub_identity.thumbprint, server.listening_port,
        )
    )
    try:
        [agent_port] = common.read_ready(agent, "ports", 1)
        while server.connections(SUBSCRIPTION) < 1:
            await _sleep(reactor, 0.05)
        pin = Pin(certs.agent.thumbprint)
        listening = TentacleClient(Target("127.0.0.1", agent_port, pin), certs.server, reactor)
        polling = TentacleClient(Target.polling(SUBSCRIPTION, pin), certs.server, reactor, hub=server)
        samples: dict[str, list[float]] = {"listening": [], "polling": []}
        medians: dict[str, list[float]] = {"listening": [], "polling": []}
        for client in (listening, polling):
            for _ in range(50):
                await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        for _ in range(args.rounds):
            for name, client in (("listening", listening), ("polling", polling)):
                times = []
                for _ in range(args.count):
                    started = time.perf_counter()
                    await client.call("ICapabilitiesServiceV2", "GetCapabilities")
                    times.append(time.perf_counter() - started)
                samples[name] += times
                medians[name].append(statistics.median(times))
        await listening.close()
        await polling.close()
    finally:
        common.stop_child(agent)
        await server.stopService()
    ratios = [p / l for p, l in zip(medians["polling"], medians["listening"])]
    figures = {
        "listening_p50_us": statistics.median(samples["listening"]) * 1e6,
        "polling_p50_us": statistics.median(samples["polling"]) * 1e6,
        "ratio_median": statistics.median(ratios),
        "ratio_spread": spread(ratios),
    }
    print(
        f"round trip, GetCapabilities via TentacleClient, {args.rounds} x {args.count} each\n"
        f"  listening p50 {figures['listening_p50_us']:.0f} us   polling p50 {figures['polling_p50_us']:.0f} us\n"
        f"  polling / listening (median of rounds) {figures['ratio_median']:.2f}  spread {figures['ratio_spread']}"
        f"   goal <= 1.5"
    )
    return figures


def _ask(child: Any, command: str) -> int:
    child.stdin.write(command + "\n")
    child.stdin.flush()
    return int(child.stdout.readline())


def memory(args: Any, certs: Certificates, hub_pem: Path, hub_identity: Any) -> dict[str, Any]:
    """
    Synchronous (child processes and blocking sockets only).
    """
    hub = common.start_child(common.server_command("polling_servers.py", "hub", hub_pem, certs.agent.thumbprint))
    bare = common.start_child(common.server_command("polling_servers.py", "bare", hub_pem))
    try:
        [hub_port] = common.read_ready(hub, "ports", 1)
        [bare_port] = common.read_ready(bare, "ports", 1)
        time.sleep(1)
        hub_before, bare_before = _ask(hub, "rss"), _ask(bare, "rss")
        subscribers = common.start_child(
            common.server_command(
                "polling_servers.py", "subscribers", certs.agent_pem, hub_identity.thumbprint, hub_port, args.idle
            )
        )
        try:
            common.read_ready(subscribers, "ready", 1)
            held = []
            for _ in range(args.idle):
                raw = socket.create_connection(("127.0.0.1", bare_port))
                tls = certs.context.wrap_socket(raw)
                tls.sendall(b"x")
                tls.recv(1)
                held.append(tls)
            time.sleep(1)
            connected = _ask(hub, "subscriptions")
            hub_after, bare_after = _ask(hub, "rss"), _ask(bare, "rss")
            for s in held:
                s.close()
        finally:
            common.stop_child(subscribers)
    finally:
        common.stop_child(hub)
        common.stop_child(bare)
    per_hub = (hub_after - hub_before) / args.idle / 1024
    per_bare = (bare_after - bare_before) / args.idle / 1024
    figures = {
        "subscriptions": connected,
        "hub_kib_per_subscription": per_hub,
        "bare_kib_per_connection": per_bare,
        "ratio": per_hub / per_bare if per_bare > 0 else float("nan"),
    }
    print(
        f"hub memory, {connected} idle subscriptions: {per_hub:.1f} KiB each; "
        f"bare TLS server: {per_bare:.1f} KiB per idle connection; ratio {figures['ratio']:.2f}"
    )
    return figures


async def uploads(reactor: Any, args: Any, certs: Certificates, hub_pem: Path, hub_identity: Any, folder: Path) -> dict[str, Any]:
    from tentacle.client.api import Target, TentacleClient
    from tentacle.client.connection import Pin

    hub = common.start_child(
        common.server_command(
            "polling_servers.py", "hub", hub_pem, certs.agent.thumbprint, certs.server.thumbprint
        )
    )
    agent = None
    source = folder / "upload.bin"
    try:
        [hub_port] = common.read_ready(hub, "ports", 1)
        agent = common.start_child(
            common.server_command(
                "polling_servers.py", "agent", certs.agent_pem, certs.server.thumbprint,
                hub_identity.thumbprint, hub_port,
            )
        )
        [agent_port] = common.read_ready(agent, "ports", 1)
        while _ask(hub, "subscriptions") < 1:
            await _sleep(reactor, 0.1)
        block = os.urandom(MiB)
        with source.open("wb") as f:
            for _ in range(args.mib):
                f.write(block)
        pin = Pin(certs.agent.thumbprint)
        direct = TentacleClient(Target("127.0.0.1", agent_port, pin), certs.server, reactor)
        via = TentacleClient(
            Target("127.0.0.1", hub_port, Pin(hub_identity.thumbprint), subscription=SUBSCRIPTION, agent_pin=pin),
            certs.server, reactor,
        )
        rates: dict[str, list[float]] = {"direct": [], "hub": []}
        for _ in range(args.rounds):
            for name, client in (("direct", direct), ("hub", via)):
                started = time.perf_counter()
                await client.upload(source, f"bench/{name}.bin")
                rates[name].append(args.mib / (time.perf_counter() - started))
        await direct.close()
        await via.close()
    finally:
        source.unlink(missing_ok=True)
        if agent is not None:
            common.stop_child(agent)
        common.stop_child(hub)
    ratios = [h / d for h, d in zip(rates["hub"], rates["direct"])]
    figures = {
        "direct_mib_s": statistics.median(rates["direct"]),
        "hub_mib_s": statistics.median(rates["hub"]),
        "ratio_median": statistics.median(ratios),
        "ratio_spread": spread(ratios),
    }
    print(
        f"upload {args.mib} MiB via TentacleClient: direct {figures['direct_mib_s']:.0f} MiB/s, "
        f"through the hub {figures['hub_mib_s']:.0f} MiB/s; hub / direct {figures['ratio_median']:.2f} "
        f"(spread {figures['ratio_spread']})"
    )
    return figures


async def _sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--idle", type=int, default=300)
    parser.add_argument("--mib", type=int, default=1024)
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    common.quiet_logging()
    print(common.header("bench_polling"), flush=True)
    from tentacle.identity import Identity

    figures: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="tentacle-bench-polling-") as tmp:
            folder = Path(tmp)
            # The children's temp folders (their homes) go inside this one.
            os.environ["TMPDIR"] = tmp
            certs = Certificates(folder)
            hub_identity = Identity.generate("hub")
            hub_pem = folder / "hub.pem"
            hub_pem.write_bytes(hub_identity.certificate_pem() + hub_identity.private_key_pem())
            figures["round_trip"] = await round_trips(reactor, args, certs, hub_identity, folder)
            figures["memory"] = await _in_thread(memory, args, certs, hub_pem, hub_identity)
            figures["upload"] = await uploads(reactor, args, certs, hub_pem, hub_identity, folder)

    common.react(run)
    common.write_json(args.json, figures)
    return 0


async def _in_thread(f: Any, *args: Any) -> Any:
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)


if __name__ == "__main__":
    raise SystemExit(main())
