"""
The Halibut protocol: bytes and .NET conventions, nothing of scripts or files.

The codec modules here are pure (no I/O, no reactor) so they can be fuzzed.
"""
