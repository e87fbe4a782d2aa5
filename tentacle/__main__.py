"""
C{python -m tentacle ...}: the same as the C{tentacle} command.
"""

import sys

from tentacle.cli import main

sys.exit(main())
