"""
What an idle agent keeps out of its memory until it is needed: the modules
of polling, of running scripts and of encrypted files, and what starting
leaves behind.  (How much that saves is measured by
C{benchmarks/bench_connections.py --memory-only}.)
"""

from __future__ import annotations

import linecache
import subprocess
import sys
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tentacle.config import ConfigFile, TentacleConfig
from tentacle.identity import IdentityStore
from tentacle.tap import ATTRS_GENERATED, _release_startup_garbage
from tests.support import identity

CHECKOUT = Path(__file__).resolve().parent.parent

#: The daemon's path in a process of its own: the command line's module,
#: then the twistd plugin's service, started (on a memory reactor) and
#: stopped; prints the modules it loaded.
DAEMON = """
import sys
import tentacle.cli
from twisted.internet.testing import MemoryReactorClock
from tentacle.tap import Options, makeService

options = Options()
options.parseOptions(["--home", sys.argv[1]])
service = makeService(options, MemoryReactorClock())
service.privilegedStartService()
service.startService()
service.stopService()
print(" ".join(sorted(sys.modules)))
"""

#: Loaded on first use only: the dialer (polling; and with it Twisted's
#: endpoints), the script process worker, and the ciphers of encrypted
#: script files.
DEFERRED = (
    "tentacle.dialer",
    "twisted.internet.endpoints",
    "tentacle.workers.process",
    "tentacle.encryption",
    "cryptography.hazmat.primitives.kdf.pbkdf2",
)


class IdleImportTests(SynchronousTestCase):
    def modules_of_an_idle_agent(self) -> set[str]:
        home = Path(self.mktemp()).absolute()
        ConfigFile(home).save(TentacleConfig(home=home, trusted_thumbprints=("A" * 40,)))
        IdentityStore(home).save(identity("agent"))
        done = subprocess.run(
            [sys.executable, "-c", DAEMON, str(home)], cwd=CHECKOUT, capture_output=True, text=True, timeout=120
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return set(done.stdout.split())

    def test_a_listening_agent_loads_no_dialer_process_worker_or_ciphers(self) -> None:
        modules = self.modules_of_an_idle_agent()
        # A check of the check: the agent's own services are there.
        self.assertTrue({"tentacle.service", "tentacle.services.scripts", "tentacle.polling"} <= modules)
        self.assertEqual([name for name in DEFERRED if name in modules], [])


class StartupGarbageTests(SynchronousTestCase):
    def test_the_source_attrs_keeps_for_debuggers_is_dropped(self) -> None:
        @attrs.define
        class Example:
            x: int

        generated = [name for name in linecache.cache if name.startswith(ATTRS_GENERATED)]
        self.assertTrue(generated)
        _release_startup_garbage()
        self.assertEqual([name for name in linecache.cache if name.startswith(ATTRS_GENERATED)], [])
        self.assertEqual(Example(1).x, 1)
