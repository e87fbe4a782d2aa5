from twisted.application.service import ServiceMaker

tentacle = ServiceMaker("Tentacle", "tentacle.tap", "A listening deployment agent, wire-compatible with Octopus Tentacle.", "tentacle")
