"""
Mechanisms the script services build on: running a script as a child
process tree (L{tentacle.workers.process}) and the named isolation mutexes
that decide which scripts may run side by side (L{tentacle.workers.isolation}).
"""
