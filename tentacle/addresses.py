"""
How peers' addresses are written in log lines and audit entries, shared by
the listener, the exchange and the service.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress


def describe_address(address: IAddress) -> str:
    """
    C{host:port}, with IPv6 hosts in brackets, for log lines.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]  # IPv4 through the dual-stack socket
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
