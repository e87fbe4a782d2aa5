from twisted.application.service import ServiceMaker

tentacle_hub = ServiceMaker("Tentacle hub", "tentacle.hub.tap", "A polling server that polling tentacles dial and CLI users reach them through.", "tentacle-hub")
