"""
The package's convention scripts: C{PreDeploy.sh}, C{Deploy.sh},
C{PostDeploy.sh} and C{DeployFailed.sh}, run from the release folder when
the package has them, as Octopus runs its C{.ps1}/C{.sh} conventions.

This runs inside the deploy tool, a script the agent started, never in the
agent's reactor: a plain blocking C{subprocess} is right here.  The scripts
write straight to the tool's own stdout and stderr, which are the agent's
pipes, so each line reaches the script log as it is written and nothing is
buffered on the way.  They stay in the tool's process group, so cancelling
the deployment on the agent stops them too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping

PRE_DEPLOY = "PreDeploy.sh"
DEPLOY = "Deploy.sh"
POST_DEPLOY = "PostDeploy.sh"
DEPLOY_FAILED = "DeployFailed.sh"


class ScriptFailed(Exception):
    """
    A convention script exited with a non-zero status.
    """

    def __init__(self, script: str, exit_code: int) -> None:
        super().__init__(f"{script} failed with exit code {exit_code}")
        self.script = script
        self.exit_code = exit_code


def say(text: str) -> None:
    """
    A progress line on stdout, flushed so it lands before a script's output.
    """
    print(text, flush=True)


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_convention(folder: Path, script: str, environment: Mapping[str, str]) -> bool:
    """
    Run C{folder/script} with bash, in C{folder}, if the package has it;
    whether it was there.

    @raise ScriptFailed: it exited with a non-zero status (128 + N for
        signal N, as a shell reports it).
    """
    path = folder / script
    if not path.is_file():
        return False
    say(f"Running {script}")
    sys.stderr.flush()
    bash = shutil.which("bash", path=environment.get("PATH", os.defpath)) or "/bin/bash"
    completed = subprocess.run(
        [bash, str(path)], cwd=folder, env=dict(environment), stdin=subprocess.DEVNULL, check=False
    )
    code = completed.returncode
    if code < 0:
        code = 128 - code
    if code != 0:
        raise ScriptFailed(script, code)
    return True
