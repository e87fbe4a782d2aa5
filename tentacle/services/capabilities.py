"""
C{ICapabilitiesServiceV2}: the first thing Octopus Server asks an agent, to
learn which services it may call.
"""

from __future__ import annotations

from typing import Final

import attrs

from tentacle.contracts import (
    CAPABILITIES_SERVICE_V2,
    FILE_TRANSFER_SERVICE,
    SCRIPT_SERVICE,
    SCRIPT_SERVICE_V2,
    CapabilitiesResponseV2,
)
from tentacle.dispatch import Dispatcher

__all__ = ["ADVERTISED_SERVICES", "KUBERNETES_MARKER", "CapabilitiesService"]

#: What a listening Tentacle advertises, in the order Tentacle lists it.
ADVERTISED_SERVICES: Final = (
    SCRIPT_SERVICE.name,
    FILE_TRANSFER_SERVICE.name,
    SCRIPT_SERVICE_V2.name,
)
#: A Server that sees this sends every script to Kubernetes pods: an agent
#: that is not the Kubernetes agent must never claim it.
KUBERNETES_MARKER: Final = "KubernetesScriptService"


@attrs.frozen
class CapabilitiesService:
    """
    Answers from the dispatcher at each call, so the list never claims a
    service that is not registered, nor misses one registered later:
    Tentacle's own first, in its order, then any others by name.  The
    capabilities service itself is not listed, as Tentacle does not.
    """

    dispatcher: Dispatcher

    def get_capabilities(self) -> CapabilitiesResponseV2:
        registered = self.dispatcher.contracts
        known = [name for name in ADVERTISED_SERVICES if name in registered]
        others = sorted(
            name for name in registered
            if name not in ADVERTISED_SERVICES
            and name != CAPABILITIES_SERVICE_V2.name
            and KUBERNETES_MARKER not in name
        )
        return CapabilitiesResponseV2(known + others)
