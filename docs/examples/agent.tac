"""
The Tentacle agent inside your own Twisted application, configured by its
home's tentacle.json (the defaults when there is none) and given a
certificate on its first start:

    twistd -ny agent.tac
"""

import os

from twisted.application.service import Application, MultiService
from twisted.internet import reactor

from tentacle.config import ConfigFile, resolve_home
from tentacle.identity import IdentityStore
from tentacle.service import TentacleService
from tentacle.tap import ensure_identity

home = resolve_home(os.environ.get("AGENT_HOME"))  # else $TENTACLE_HOME, else ~/.tentacle
config_file = ConfigFile(home)
identity = ensure_identity(IdentityStore(home))  # created, and its thumbprint logged, when missing

application = Application("my-app")
top = MultiService()
top.setServiceParent(application)

agent = TentacleService(
    config_file.load(),
    reactor,
    identity=identity,
    config_file=config_file,  # reload trust and limits when the file changes
    handle_sighup=True,  # and on SIGHUP (leave it out if your application owns SIGHUP)
)
agent.setServiceParent(top)
