"""
The server's side of polling mode: a polling port with per-subscription
queues (L{tentacle.hub.polling_server.PollingServer}), and the hub that
holds one for CLI users (C{tentacle-hub}).
"""
