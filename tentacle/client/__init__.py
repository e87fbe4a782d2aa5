"""
The server's side of Halibut: drive any listening tentacle (ours or Octopus's)
from Python.  See L{tentacle.client.api.TentacleClient}.
"""
