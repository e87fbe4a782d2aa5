"""
The agent with its settings built in code, from the application's own
configuration (here, environment variables), with no tentacle.json:

    SERVER_THUMBPRINT=8e:9f:... AGENT_PORT=10933 twistd -ny configured-in-code.tac
"""

import os
from pathlib import Path

from twisted.application.service import Application
from twisted.internet import reactor

from tentacle.config import TentacleConfig
from tentacle.identity import IdentityStore
from tentacle.service import TentacleService
from tentacle.tap import ensure_identity

home = Path(os.environ.get("AGENT_HOME", "/var/lib/my-app/tentacle"))
config = TentacleConfig(
    home=home,
    port=int(os.environ.get("AGENT_PORT", "10933")),
    listen_address="127.0.0.1",
    # Any case, with or without colons: normalised as 'tentacle configure --trust' does.
    trusted_thumbprints=[os.environ["SERVER_THUMBPRINT"]],
    max_concurrent_scripts=4,
    script_timeout=3600.0,
    allowed_roots=(home / "Files",),
)

application = Application("my-app")
agent = TentacleService(config, reactor, identity=ensure_identity(IdentityStore(home)))
agent.setServiceParent(application)
