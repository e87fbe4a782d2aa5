"""
The listener's order of checks, over in-memory TLS with a fake clock.
"""

from __future__ import annotations

from typing import Any

import attrs

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.internet.address import IPv4Address
from twisted.test.iosim import FakeTransport, IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.handshake import (
    MAX_INITIAL_REQUEST,
    SERVER_IDENTITY as IDENTITY_ANSWER,
    IdentityError,
    IdentityKind,
    IdentityReader,
    InitialRequestTooLong,
    PreambleReader,
    RemoteIdentity,
    normalize_subscription,
)
from tentacle.identity import Identity
from tentacle.admission import AdmissionLimits
from tentacle.listener import Accepted, AgentConnection, ListenerFactory, ListeningTLSFactory, describe_address
from tentacle.page import FRIENDLY_PAGE
from tentacle.tls import AgentTLSOptions
from tentacle.trust import PeerIdentity, TrustList
from tests.support import LogCapture, Recorder, client_tls_options, identity

MX_PREAMBLE = b"MX\r\n\r\n"
MX_IDENTITY = b"MX-CLIENT 1.0\r\n\r\n"


class PreambleReaderTests(SynchronousTestCase):
    def test_ends_at_blank_line_and_keeps_the_rest(self) -> None:
        reader = PreambleReader()
        self.assertIsNone(reader.feed(b"M"))
        self.assertEqual(reader.feed(b"X\r\n\r\nMX-CLIENT"), ("MX\n", b"MX-CLIENT"))

    def test_linux_client_newlines(self) -> None:
        self.assertEqual(PreambleReader().feed(b"MX\n\nrest"), ("MX\n", b"rest"))

    def test_http_request(self) -> None:
        request, rest = PreambleReader().feed(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        ) or ("", b"")
        self.assertTrue(request.startswith("GET / HTTP/1.1\nHost: x"))
        self.assertEqual(rest, b"")

    def test_carriage_returns_do_not_end_it(self) -> None:
        self.assertIsNone(PreambleReader().feed(b"MX\r\r\r\n\r"))

    def test_limit(self) -> None:
        reader = PreambleReader(limit=10)
        reader.feed(b"x" * 9)
        self.assertRaises(InitialRequestTooLong, reader.feed, b"y")

    def test_default_limit_is_halibuts(self) -> None:
        reader = PreambleReader()
        reader.feed(b"x" * (MAX_INITIAL_REQUEST - 1))
        self.assertRaises(InitialRequestTooLong, reader.feed, b"x")


class IdentityReaderTests(SynchronousTestCase):
    def test_identity_and_what_follows(self) -> None:
        reader = IdentityReader()
        self.assertIsNone(reader.feed(b"MX-CLIENT 1.0\r\n"))
        self.assertEqual(reader.feed(b"\r\nmessage"), (RemoteIdentity(IdentityKind.CLIENT, "1.0"), b"message"))

    def test_malformed(self) -> None:
        for data in (b"MX-SERVER 1.0\r\n\r\n", b"MX-CLIENT 1.0\n\n", b"MX-CLIENT 1.0\r\nx\r\n"):
            self.assertRaises(IdentityError, IdentityReader().feed, data)

    def test_subscriber(self) -> None:
        reader = IdentityReader(frozenset({IdentityKind.CLIENT, IdentityKind.SUBSCRIBER}))
        self.assertEqual(
            reader.feed(b"MX-SUBSCRIBER 1.0 poll://AbC123/\r\n\r\n"),
            (RemoteIdentity(IdentityKind.SUBSCRIBER, "1.0", "poll://abc123/"), b""),
        )
        for bad in (b"MX-SUBSCRIBER 1.0\r\n\r\n", b"MX-SUBSCRIBER 1.0 not-a-uri\r\n\r\n"):
            self.assertRaises(
                IdentityError, IdentityReader(frozenset({IdentityKind.SUBSCRIBER})).feed, bad
            )

    def test_subscriptions_are_normalised_as_halibut_keys_them(self) -> None:
        self.assertEqual(normalize_subscription("POLL://ABCDEF"), "poll://abcdef/")
        for bad in ("poll://", "poll:///", "abc", "poll://a/b", "poll://a b/"):
            self.assertRaises(ValueError, normalize_subscription, bad)

    def test_limit_holds_however_the_bytes_arrive(self) -> None:
        """
        Found by fuzzing: an over-long identity line was refused when it
        came a little at a time but accepted when it came in one read.
        """
        data = b"MX-CLIENT " + b"9" * 1100 + b"\r\n\r\n"
        self.assertRaises(IdentityError, IdentityReader(limit=1024).feed, data)
        reader = IdentityReader(limit=1024)
        with self.assertRaises(IdentityError):
            for byte in data:
                reader.feed(bytes([byte]))


class DescribeAddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        from twisted.internet.address import IPv6Address

        self.assertEqual(describe_address(IPv4Address("TCP", "10.0.0.1", 5)), "10.0.0.1:5")
        self.assertEqual(describe_address(IPv6Address("TCP", "::1", 5)), "[::1]:5")
        self.assertEqual(
            describe_address(IPv6Address("TCP", "::ffff:10.0.0.1", 5)), "10.0.0.1:5"
        )


class Session(Protocol):
    """
    Stands in for the message exchange: records what it is handed.
    """

    def __init__(self, peer: PeerIdentity) -> None:
        self.peer = peer
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class InMemoryAgent:
    """
    The listener behind real (in-memory) TLS, on a fake clock.
    """

    def __init__(
        self,
        trusted: tuple[str, ...] = (),
        handshake_timeout: float = 30.0,
        with_sessions: bool = False,
        limits: AdmissionLimits = AdmissionLimits(),
    ) -> None:
        self.clock = Clock()
        self.trust = TrustList(trusted)
        self.sessions: list[Session] = []
        self.factory = ListenerFactory(
            self.trust,
            self.clock,
            attrs.evolve(limits, handshake_timeout=handshake_timeout),
            self._session if with_sessions else None,
        )
        self.factory.doStart()
        self.tls = ListeningTLSFactory(AgentTLSOptions(identity("agent")), self.factory, clock=self.clock)
        self._port = 50122

    def _session(self, accepted: Accepted) -> Session | None:
        if accepted.identity.kind is not IdentityKind.CLIENT:
            return None
        session = Session(accepted.peer)
        self.sessions.append(session)
        return session

    def connect(self, client: Identity | None = None, host: str = "192.0.2.7") -> tuple[Recorder, Any, IOPump]:
        recorder = Recorder()
        client_factory = TLSMemoryBIOFactory(
            client_tls_options(client), True, _Once(recorder), clock=self.clock
        )
        return (recorder, *self._connected(client_factory.buildProtocol(None), host))

    def connect_raw(self, host: str = "192.0.2.7") -> tuple[Recorder, Any, IOPump]:
        """
        A TCP peer that sends whatever the test writes, TLS or not.
        """
        recorder = Recorder()
        return (recorder, *self._connected(recorder, host))

    def _connected(self, client: Protocol, host: str) -> tuple[Any, IOPump]:
        self._port += 1
        address = IPv4Address("TCP", host, self._port)
        _, tls_server, pump = connectedServerAndClient(
            lambda: self.tls.buildProtocol(None),
            lambda: client,
            serverTransportFactory=lambda p: FakeTransport(p, isServer=True, peerAddress=address),
            clock=self.clock,
        )
        return tls_server, pump


class _Once:
    """
    A factory-like callable handing out one prepared protocol.
    """

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


def connection_of(tls_server: Any) -> AgentConnection:
    wrapped = tls_server.wrappedProtocol
    assert isinstance(wrapped, AgentConnection)
    return wrapped


class ListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    def test_friendly_page_without_certificate(self) -> None:
        agent = InMemoryAgent()
        recorder, _, pump = agent.connect()
        recorder.transport.write(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
        pump.flush()
        self.assertEqual(recorder.received, FRIENDLY_PAGE)
        self.assertIsNotNone(recorder.lost)

    def test_untrusted_certificate_gets_nothing(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,))
        recorder, server, pump = agent.connect(identity("intruder"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        self.assertEqual(recorder.received, b"")
        self.assertIsNotNone(recorder.lost)
        [event] = self.logs.matching(event="client_denied")
        self.assertEqual(event["thumbprint"], identity("intruder").thumbprint)
        self.assertEqual(event["peer"], "192.0.2.7:50123")

    def test_no_certificate_gets_nothing(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,))
        recorder, _, pump = agent.connect(None)
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        self.assertEqual(recorder.received, b"")
        self.assertIsNotNone(recorder.lost)
        [event] = self.logs.matching(event="client_denied")
        self.assertNotIn("thumbprint", event)

    def test_trusted_by_sha1(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,))
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        self.assertEqual(recorder.received, IDENTITY_ANSWER)
        [event] = self.logs.matching(event="client_authenticated")
        self.assertEqual(event["thumbprint"], identity("server").thumbprint)

    def test_trusted_by_sha256(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").sha256,))
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        self.assertEqual(recorder.received, IDENTITY_ANSWER)

    def test_identity_answer_then_close_without_exchange(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,))
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        self.assertIsNotNone(recorder.lost)

    def test_hands_over_to_session_with_leftover_bytes(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,), with_sessions=True)
        recorder, server, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY + b"first")
        pump.flush()
        recorder.transport.write(b"second")
        pump.flush()
        [session] = agent.sessions
        self.assertEqual(session.received, b"firstsecond")
        self.assertEqual(session.peer.thumbprint, identity("server").thumbprint)
        self.assertIsNone(recorder.lost)

    def test_identity_split_across_writes(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,), with_sessions=True)
        recorder, _, pump = agent.connect(identity("server"))
        for piece in [b"M", b"X\n", b"\nMX-CLI", b"ENT 1.0\r", b"\n\r", b"\n"]:
            recorder.transport.write(piece)
            pump.flush()
        self.assertEqual(recorder.received, IDENTITY_ANSWER)
        self.assertEqual(len(agent.sessions), 1)

    def test_unknown_identity_type_closes(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,))
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + b"MX-BOGUS 1.0\r\n\r\n")
        pump.flush()
        self.assertEqual(recorder.received, b"")
        self.assertIsNotNone(recorder.lost)
        self.assertTrue(
            self.logs.matching(why="unknown identity type 'MX-BOGUS' (expected MX-CLIENT or MX-SUBSCRIBER)")
        )

    def test_identity_without_a_role_here_closes(self) -> None:
        """
        An agent serves listening clients only: a subscriber is closed
        before C{MX-SERVER}, and logged.
        """
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,), with_sessions=True)
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + b"MX-SUBSCRIBER 1.0 poll://x/\r\n\r\n")
        pump.flush()
        self.assertEqual(recorder.received, b"")
        self.assertIsNotNone(recorder.lost)
        self.assertEqual(agent.sessions, [])
        self.assertTrue(self.logs.matching(identity="MX-SUBSCRIBER poll://x/"))

    def test_identity_without_blank_line_closes(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,))
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + b"MX-CLIENT 1.0\r\nNEXT\r\n")
        pump.flush()
        self.assertEqual(recorder.received, b"")
        self.assertIsNotNone(recorder.lost)

    def test_overlong_identity_line_closes(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,))
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + b"MX-CLIENT " + b"9" * 2000)
        pump.flush()
        self.assertIsNotNone(recorder.lost)

    def test_overlong_initial_request_is_cut_at_the_limit(self) -> None:
        """
        The reader never holds more than the limit: the connection is cut
        while the 25,000 characters are still arriving.
        """
        agent = InMemoryAgent()
        recorder, server, pump = agent.connect()
        connection = connection_of(server)
        sent = 0
        while recorder.lost is None and sent < 25000:
            recorder.transport.write(b"A" * 1000)
            sent += 1000
            pump.flush()
        self.assertIsNotNone(recorder.lost)
        self.assertLessEqual(sent, MAX_INITIAL_REQUEST + 1000)
        self.assertEqual(recorder.received, b"")
        self.assertTrue(self.logs.matching(limit=MAX_INITIAL_REQUEST))
        self.assertIsNone(connection.peer)

    def test_silent_peer_times_out(self) -> None:
        agent = InMemoryAgent(handshake_timeout=30)
        recorder, _, pump = agent.connect()
        agent.clock.advance(29)
        pump.flush()
        self.assertIsNone(recorder.lost)
        agent.clock.advance(1)
        pump.flush()
        self.assertIsNotNone(recorder.lost)

    def test_incomplete_request_times_out(self) -> None:
        agent = InMemoryAgent(handshake_timeout=5)
        recorder, _, pump = agent.connect()
        recorder.transport.write(b"GET / HTTP/1.1\r\n")
        pump.flush()
        agent.clock.advance(5)
        pump.flush()
        self.assertIsNotNone(recorder.lost)
        self.assertEqual(recorder.received, b"")

    def test_authenticated_connection_has_no_handshake_timeout(self) -> None:
        agent = InMemoryAgent(trusted=(identity("server").thumbprint,), with_sessions=True)
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        agent.clock.advance(3600)
        pump.flush()
        self.assertIsNone(recorder.lost)

    def test_removed_thumbprint_is_cut_off(self) -> None:
        server_thumbprint = identity("server").thumbprint
        other = identity("other").thumbprint
        agent = InMemoryAgent(trusted=(server_thumbprint, other), with_sessions=True)
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        bystander, _, pump2 = agent.connect(identity("other"))
        bystander.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump2.flush()
        agent.trust.replace({other})
        pump.flush()
        pump2.flush()
        self.assertIsNotNone(recorder.lost)
        self.assertIsNone(bystander.lost)
        # and a new connection from the removed server is refused
        again, _, pump3 = agent.connect(identity("server"))
        again.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump3.flush()
        self.assertEqual(again.received, b"")
        self.assertIsNotNone(again.lost)

    def test_empty_request_is_ignored(self) -> None:
        agent = InMemoryAgent()
        recorder, _, pump = agent.connect()
        recorder.transport.write(b"\r\n\r\n")
        pump.flush()
        self.assertEqual(recorder.received, b"")
        self.assertIsNotNone(recorder.lost)


class UnauthenticatedBudgetTests(SynchronousTestCase):
    """
    The deadlines and budgets of connections that have not authenticated,
    on a fake clock.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    def test_silent_peer_is_cut_at_the_first_byte_timeout(self) -> None:
        agent = InMemoryAgent(limits=AdmissionLimits(first_byte_timeout=5), handshake_timeout=30)
        recorder, _, pump = agent.connect_raw()
        agent.clock.advance(4.9)
        pump.flush()
        self.assertIsNone(recorder.lost)
        agent.clock.advance(0.1)
        pump.flush()
        self.assertIsNotNone(recorder.lost)
        [event] = self.logs.matching(event="handshake_timed_out")
        self.assertEqual((event["peer"], event["reason"], event["timeout"]), ("192.0.2.7:50123", "first-byte-timeout", 5))
        self.assertEqual(agent.factory.open_connections, 0)

    def test_a_flood_of_silent_peers_writes_a_bounded_log(self) -> None:
        """
        Beyond C{connection-log-lines} a window, the lines of silent peers
        go on at debug level (each still an event the metrics count), and
        one line sums them up when the window ends.
        """
        agent = InMemoryAgent(limits=AdmissionLimits(first_byte_timeout=5, connection_log_lines=2))
        pumps = [agent.connect_raw()[2] for _ in range(6)]
        agent.clock.advance(5)
        for pump in pumps:
            pump.flush()
        timed_out = self.logs.matching(event="handshake_timed_out")
        self.assertEqual(len(timed_out), 6)
        self.assertEqual([e["log_level"] for e in timed_out], [LogLevel.info] * 2 + [LogLevel.debug] * 4)
        self.assertEqual(self.logs.matching(held_back=4), [])
        agent.clock.advance(10)
        [summary] = self.logs.matching(held_back=4)
        self.assertEqual(summary["kind"], "connections timed out (first-byte-timeout)")
        self.assertEqual(summary["sources"], {"192.0.2.7": 4})
        self.assertEqual(agent.factory.open_connections, 0)

    def test_a_flood_of_peers_that_fail_tls_writes_a_bounded_log(self) -> None:
        """
        A peer that sends anything but TLS (a port scanner's plain HTTP)
        costs the agent no handshake and the attacker one packet: its line
        (TLS failed) is the cheapest flood of all, so it has a budget too.
        """
        agent = InMemoryAgent(limits=AdmissionLimits(connection_log_lines=2))
        for _ in range(6):
            recorder, _, pump = agent.connect_raw()
            recorder.transport.write(b"GET / HTTP/1.0\r\n\r\n")
            pump.flush()
            self.assertIsNotNone(recorder.lost)
        failed = [e for e in self.logs.events if "TLS with" in e.get("log_format", "")]
        self.assertEqual(len(failed), 6)
        self.assertEqual([e["log_level"] for e in failed], [LogLevel.info] * 2 + [LogLevel.debug] * 4)
        agent.clock.advance(10)
        [summary] = self.logs.matching(held_back=4)
        self.assertEqual(agent.clock.getDelayedCalls(), [])

    def test_a_flood_of_empty_or_overlong_requests_writes_a_bounded_log(self) -> None:
        """
        TLS without a client certificate, then an empty or an over-long
        first request: lines of peers that never authenticate, budgeted.
        """
        agent = InMemoryAgent(limits=AdmissionLimits(connection_log_lines=1))
        for _ in range(3):
            recorder, _, pump = agent.connect()
            recorder.transport.write(b"\r\n\r\n")
            pump.flush()
            recorder, _, pump = agent.connect()
            recorder.transport.write(b"A" * (MAX_INITIAL_REQUEST + 1))
            pump.flush()
        empty = [e for e in self.logs.events if "empty request" in e.get("log_format", "")]
        overlong = self.logs.matching(limit=MAX_INITIAL_REQUEST)
        self.assertEqual([e["log_level"] for e in empty], [LogLevel.info] + [LogLevel.debug] * 2)
        self.assertEqual([e["log_level"] for e in overlong], [LogLevel.warn] + [LogLevel.debug] * 2)
        agent.clock.advance(10)
        self.assertEqual(len(self.logs.matching(held_back=2)), 2)

    def test_a_trusted_server_that_times_out_is_logged_whatever_the_flood(self) -> None:
        """
        A flood of silent peers has used the window's budget; a trusted
        server whose certificate passed but whose identity line never came
        is still logged at info, with its thumbprint: the budget is for
        peers that never authenticate, not for a trusted server's trouble.
        """
        server = identity("server")
        agent = InMemoryAgent(
            trusted=(server.thumbprint,),
            handshake_timeout=10,
            with_sessions=True,
            limits=AdmissionLimits(first_byte_timeout=5, connection_log_lines=1),
        )
        flood = []
        for _ in range(3):
            peer, _, p = agent.connect_raw()
            peer.transport.write(b"\x16\x03\x01\x02\x00\x01")  # half a client hello
            p.flush()
            flood.append(p)
        agent.clock.advance(5)
        recorder, _, pump = agent.connect(server)
        recorder.transport.write(MX_PREAMBLE)  # and no identity line
        pump.flush()
        agent.clock.advance(5)
        for p in flood:
            p.flush()
        self.assertEqual(len(self.logs.matching(event="handshake_timed_out", log_level=LogLevel.debug)), 2)
        agent.clock.advance(5)
        pump.flush()
        self.assertIsNotNone(recorder.lost)
        event = self.logs.matching(event="handshake_timed_out")[-1]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event.get("thumbprint"), server.thumbprint)

    def test_the_log_budget_follows_a_reload(self) -> None:
        agent = InMemoryAgent(limits=AdmissionLimits(first_byte_timeout=5, connection_log_lines=1))
        agent.factory.set_limits(AdmissionLimits(first_byte_timeout=5, connection_log_lines=3))
        pumps = [agent.connect_raw()[2] for _ in range(4)]
        agent.clock.advance(5)
        for pump in pumps:
            pump.flush()
        levels = [e["log_level"] for e in self.logs.matching(event="handshake_timed_out")]
        self.assertEqual(levels, [LogLevel.info] * 3 + [LogLevel.debug])
        agent.factory.doStop()
        self.assertEqual(len(self.logs.matching(held_back=1)), 1)

    def test_half_a_client_hello_gets_the_handshake_timeout(self) -> None:
        """
        A byte of TLS stops the first-byte clock; the rest of the handshake
        must still come within the handshake timeout.
        """
        agent = InMemoryAgent(limits=AdmissionLimits(first_byte_timeout=5), handshake_timeout=30)
        recorder, _, pump = agent.connect_raw()
        recorder.transport.write(b"\x16\x03\x01\x02\x00\x01")
        pump.flush()
        agent.clock.advance(29)
        pump.flush()
        self.assertIsNone(recorder.lost)
        agent.clock.advance(1)
        pump.flush()
        self.assertIsNotNone(recorder.lost)
        [event] = self.logs.matching(event="handshake_timed_out")
        self.assertEqual(event["reason"], "handshake-timeout")

    def test_a_late_first_byte_gets_only_the_rest_of_the_handshake_timeout(self) -> None:
        """
        The handshake timeout counts from the accept, not from the first
        byte: one timer serves both, and moves on at the first byte.
        """
        agent = InMemoryAgent(limits=AdmissionLimits(first_byte_timeout=5), handshake_timeout=30)
        recorder, _, pump = agent.connect_raw()
        agent.clock.advance(4)
        recorder.transport.write(b"\x16\x03\x01\x02\x00\x01")
        pump.flush()
        agent.clock.advance(25.9)
        pump.flush()
        self.assertIsNone(recorder.lost)
        agent.clock.advance(0.1)
        pump.flush()
        self.assertIsNotNone(recorder.lost)
        [event] = self.logs.matching(event="handshake_timed_out")
        self.assertEqual((event["reason"], event["timeout"]), ("handshake-timeout", 30))

    def test_first_byte_timeout_longer_than_the_handshake_timeout(self) -> None:
        """
        A silent peer is cut by whichever limit comes first, and the log
        names that one.
        """
        agent = InMemoryAgent(limits=AdmissionLimits(first_byte_timeout=20), handshake_timeout=8)
        recorder, _, pump = agent.connect_raw()
        agent.clock.advance(7.9)
        pump.flush()
        self.assertIsNone(recorder.lost)
        agent.clock.advance(0.1)
        pump.flush()
        self.assertIsNotNone(recorder.lost)
        [event] = self.logs.matching(event="handshake_timed_out")
        self.assertEqual((event["reason"], event["timeout"]), ("handshake-timeout", 8))
        self.assertEqual(agent.clock.getDelayedCalls(), [])

    def test_one_timer_per_connection_before_authentication(self) -> None:
        """
        A new connection sets one timer for its deadlines, and an
        authenticated one leaves none behind.
        """
        agent = InMemoryAgent(
            trusted=(identity("server").thumbprint,), with_sessions=True,
            limits=AdmissionLimits(first_byte_timeout=5),
        )
        recorder, _, pump = agent.connect(identity("server"))
        self.assertEqual(len(agent.clock.getDelayedCalls()), 1)
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        self.assertEqual(len(agent.sessions), 1)
        self.assertEqual(agent.clock.getDelayedCalls(), [])

    def test_tls_layer_offers_the_transport_interfaces(self) -> None:
        """
        The TLS layer of an accepted connection provides what the TCP
        transport under it provides, and TLS's own, as Twisted's does.
        """
        from twisted.internet.interfaces import ISSLTransport, ITransport
        from zope.interface import providedBy

        agent = InMemoryAgent()
        _, tls_server, _ = agent.connect_raw()
        self.assertTrue(ISSLTransport.providedBy(tls_server))
        for interface in providedBy(tls_server.transport):
            self.assertTrue(interface.providedBy(tls_server), interface)
        self.assertTrue(ITransport.providedBy(tls_server))
        self.assertIn(tls_server, agent.tls.protocols)

    def test_trusted_server_is_never_cut_by_the_first_byte_timeout(self) -> None:
        agent = InMemoryAgent(
            trusted=(identity("server").thumbprint,), with_sessions=True,
            limits=AdmissionLimits(first_byte_timeout=1),
        )
        recorder, _, pump = agent.connect(identity("server"))
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        agent.clock.advance(3600)
        pump.flush()
        self.assertIsNone(recorder.lost)
        self.assertEqual(len(agent.sessions), 1)

    def test_full_budget_evicts_the_oldest_and_admits_the_newest(self) -> None:
        agent = InMemoryAgent(limits=AdmissionLimits(max_unauthenticated=3))
        silent = [agent.connect_raw(host=f"192.0.2.{n}") for n in range(1, 4)]
        newest, _, pump = agent.connect_raw(host="192.0.2.4")
        for _, _, p in silent:
            p.flush()
        self.assertEqual([r.lost is not None for r, _, _ in silent], [True, False, False])
        self.assertIsNone(newest.lost)
        [event] = self.logs.matching(event="connection_evicted")
        self.assertEqual(
            (event["peer"], event["reason"], event["limit"]),
            ("192.0.2.1:50123", "max-unauthenticated-connections", 3),
        )
        self.assertEqual(agent.factory.unauthenticated_connections, 3)

    def test_trusted_server_gets_in_past_a_full_budget(self) -> None:
        """
        Every unauthenticated place is held by one address; the trusted
        server's connection evicts the oldest of them, is served, and
        leaves the unauthenticated budget when it authenticates.
        """
        agent = InMemoryAgent(
            trusted=(identity("server").thumbprint,), with_sessions=True,
            limits=AdmissionLimits(max_unauthenticated=4, max_unauthenticated_per_address=4),
        )
        crowd = [agent.connect_raw(host="198.51.100.9") for _ in range(4)]
        recorder, _, pump = agent.connect(identity("server"), host="192.0.2.7")
        recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
        pump.flush()
        self.assertEqual(recorder.received, IDENTITY_ANSWER)
        self.assertEqual(len(agent.sessions), 1)
        for _, _, p in crowd:
            p.flush()
        self.assertEqual(sum(r.lost is not None for r, _, _ in crowd), 1)
        self.assertEqual((agent.factory.unauthenticated_connections, len(agent.factory.authenticated_connections)), (3, 1))

    def test_every_place_authenticated_refuses_before_tls(self) -> None:
        agent = InMemoryAgent(
            trusted=(identity("server").thumbprint,), with_sessions=True,
            limits=AdmissionLimits(max_connections=2),
        )
        for _ in range(2):
            recorder, _, pump = agent.connect(identity("server"))
            recorder.transport.write(MX_PREAMBLE + MX_IDENTITY)
            pump.flush()
        late, _, pump = agent.connect_raw()
        pump.flush()
        self.assertIsNotNone(late.lost)
        self.assertEqual(late.received, b"")
        [event] = self.logs.matching(event="connection_refused")
        self.assertEqual((event["reason"], event["limit"]), ("max-connections", 2))
        self.assertEqual(len(agent.sessions), 2)
