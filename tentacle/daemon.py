"""
The agent's own process: twistd running the tentacle plugin's service.

C{tentacle run} checks its arguments, then replaces itself with this module
in a fresh interpreter (C{os.execv}, the same process and PID), so that the
command line's modules, its parser and what they allocated do not stay in
the agent's memory for as long as it runs (about 0.5 MiB of an idle agent's
RSS).  Its arguments are twistd's: its own options, then C{tentacle} and the
plugin's options.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the agent until it stops; a failure to start is one line on stderr
    and exit status 1, as C{tentacle run} reports it.
    """
    from twisted.python.usage import UsageError

    from tentacle.config import ConfigError
    from tentacle.errors import failure_sentence
    from tentacle.identity import IdentityError
    from tentacle.tap import CannotStart, run_twistd

    arguments = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["twistd", *arguments]
    err = sys.stderr  # twistd points sys.stderr at its log once it starts
    try:
        run_twistd(arguments)
    except (UsageError, CannotStart, ConfigError, IdentityError, OSError) as e:
        # The same failures, worded the same, as tentacle.cli's main reports
        # when the agent runs in its process.
        err.write(f"tentacle: error: {failure_sentence(e)}\n")
        err.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
