"""
The Tentacle services a trusted server calls, and the one place that
registers them on a L{Dispatcher}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from tentacle.config import TentacleConfig
from tentacle.contracts import CAPABILITIES_SERVICE_V2, FILE_TRANSFER_SERVICE
from tentacle.dispatch import Dispatcher
from tentacle.services.capabilities import CapabilitiesService
from tentacle.services.files import FileTransferError, FileTransferService

__all__ = [
    "CapabilitiesService",
    "FileTransferError",
    "FileTransferService",
    "register_tentacle_services",
]


def register_tentacle_services(
    dispatcher: Dispatcher, config: TentacleConfig, reactor: IReactorThreads, *, log: Logger | None = None
) -> None:
    """
    Offer Tentacle's services on C{dispatcher}: file transfer (confined to
    C{config.allowed_roots} when set) and capabilities.

    @param reactor: its thread pool runs blocking file work (fsync, rename).
    @param log: where the services' events go (the agent's publisher).
    """
    files = FileTransferService(config.home, config.allowed_roots, reactor)
    if log is not None:
        files.log = log
    dispatcher.register(FILE_TRANSFER_SERVICE, files)
    dispatcher.register(CAPABILITIES_SERVICE_V2, CapabilitiesService(dispatcher))
