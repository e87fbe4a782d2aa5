"""
C{ICapabilitiesServiceV2}: the first thing Octopus Server asks an agent, to
learn which services it may call.
"""

from __future__ import annotations

from typing import Final

import attrs

from tentacle.contracts import (
    FILE_TRANSFER_SERVICE,
    SCRIPT_SERVICE,
    SCRIPT_SERVICE_V2,
    CapabilitiesResponseV2,
)
from tentacle.dispatch import Dispatcher

__all__ = ["ADVERTISED_SERVICES", "CapabilitiesService"]

#: What a listening Tentacle can advertise, in the order Tentacle lists it.
ADVERTISED_SERVICES: Final = (
    SCRIPT_SERVICE.name,
    FILE_TRANSFER_SERVICE.name,
    SCRIPT_SERVICE_V2.name,
)


@attrs.frozen
class CapabilitiesService:
    """
    Answers from the dispatcher at each call, so the list never claims a
    service that is not registered, nor misses one registered later.
    """

    dispatcher: Dispatcher

    def get_capabilities(self) -> CapabilitiesResponseV2:
        registered = self.dispatcher.contracts
        return CapabilitiesResponseV2(name for name in ADVERTISED_SERVICES if name in registered)
