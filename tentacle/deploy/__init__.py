"""
Deploying packages on the agent's machine: our counterpart of Octopus's
Calamari.  The agent ships it; a client runs it as an ordinary script
(C{"$TentaclePython" -m tentacle.deploy deploy ...}).  It runs in the
script's own process, never in the agent's reactor, so it may block.

  - L{tentacle.deploy.packages}: package names, hashes, safe extraction;
  - L{tentacle.deploy.releases}: release folders, C{current}, retention;
  - L{tentacle.deploy.conventions}: C{PreDeploy.sh} and friends;
  - L{tentacle.deploy.substitution}: C{#{Name}} placeholders;
  - L{tentacle.deploy.deployment}: the steps of a deployment and a rollback.
"""
