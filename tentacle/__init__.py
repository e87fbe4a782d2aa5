"""
tentacle: a Python implementation of the Octopus Deploy Listening Tentacle,
built on Twisted and wire-compatible with Octopus's Halibut protocol.
"""

__version__ = "0.1.0"
