"""
Deploy packages to agents from Python: the client half of
L{tentacle.deploy}.

    result = await deploy(client, Path("app.1.2.0.tar.gz"), variables={"Port": "8080"}, on_log=print)
    await rollback(client, "app")
    for release in await releases(client, "app"): ...

Each call runs the deploy tool the agent ships as an ordinary script
(C{"$TentaclePython" -m tentacle.deploy ...}), so its output streams like any
script's, and cancelling the call cancels the deployment on the agent.

Packages are cached on the agent as C{<home>/Packages/<id>.<version>.<ext>}.
Before uploading, L{deploy} asks the agent for the SHA-1 of that file and
uploads only when it differs from the local package's; the deploy tool then
checks the SHA-1 again, so a package changed in between is refused rather
than deployed.

Variables travel as a JSON file in the script's workspace, never on a
command line, where other users of the machine could read them.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs

from tentacle.client.api import Progress, TentacleClient
from tentacle.client.connection import ClientError
from tentacle.contracts import ProcessOutput, ProcessOutputSource
from tentacle.deploy.deployment import DEFAULT_KEEP, check_variable
from tentacle.deploy.packages import PackageName, check_id, file_hashes, parse_package_name

#: Where packages are cached, relative to the agent's home.
PACKAGE_CACHE = "Packages"
_VARIABLES_FILE = "variables.json"
_TOOL = (
    '"${TentaclePython:?is not set: deploying needs a tentacle agent in Python, which ships the deploy tool}"'
    " -m tentacle.deploy"
)

Log = Callable[[ProcessOutput], None]


class DeployError(ClientError):
    """
    The agent's deploy tool could not be run, or its answer not read.
    """


@attrs.frozen
class DeployResult:
    """
    How one deployment to one agent went.

    @ivar uploaded: whether the package had to be sent (C{False}: the agent
        already had this exact package).
    """

    package: PackageName
    sha1: str
    uploaded: bool
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@attrs.frozen
class ReleaseInfo:
    version: str
    path: str
    deployed: str | None
    sha1: str | None
    current: bool


def _cached_path(name: PackageName) -> str:
    """
    The cached package as a bash word: the home comes from the script's
    environment, the name is ours and quoted.
    """
    return f'"$TentacleHome"/{PACKAGE_CACHE}/{shlex.quote(name.file_name)}'


def _command(subcommand: str, *arguments: str, raw: str = "") -> str:
    """
    A script that runs the tool: C{arguments} are quoted, C{raw} is bash.
    """
    words = " ".join(shlex.quote(a) for a in (subcommand, *arguments))
    return f"exec {_TOOL} {words} {raw}".rstrip() + "\n"


async def _json_answer(client: TentacleClient, body: str) -> Any:
    """
    Run a tool command that prints one JSON object; that object.
    """
    lines: list[ProcessOutput] = []
    code = await client.run_script(body, on_log=lines.append)
    answers = [line.text for line in lines if line.source is ProcessOutputSource.StdOut and line.text.startswith("{")]
    if code != 0 or not answers:
        said = "; ".join(line.text for line in lines if line.source is ProcessOutputSource.StdErr) or "no answer"
        raise DeployError(f"the deploy tool on {client.target} failed (exit code {code}): {said}")
    try:
        return json.loads(answers[-1])
    except ValueError as e:
        raise DeployError(f"the deploy tool on {client.target} answered {answers[-1]!r}: {e}") from None


async def cached_sha1(client: TentacleClient, name: PackageName) -> str | None:
    """
    The SHA-1 of the agent's cached copy of this package, if it has one.
    """
    answer = await _json_answer(client, _command("hash", "--json", raw=f"--path {_cached_path(name)}"))
    return answer.get("sha1") if answer.get("exists") else None


def _apps(apps: str | None) -> tuple[str, ...]:
    return ("--apps", apps) if apps else ()


async def _run_with_variables(
    client: TentacleClient, body: str, variables: Mapping[str, str], on_log: Log | None
) -> int:
    """
    Run C{body}; when there are variables, they go along as a file the
    agent stores encrypted (as Octopus Server's sensitive variables), which
    the tool is pointed at and decrypts in memory.
    """
    if not variables:
        return await client.run_script(body, on_log=on_log)
    with tempfile.TemporaryDirectory(prefix="tentacle-deploy-") as folder:
        path = Path(folder) / _VARIABLES_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(variables), f)
        body = body.rstrip("\n") + f" --variables-file {_VARIABLES_FILE}\n"
        return await client.run_script(body, files={_VARIABLES_FILE: path}, encrypt_files=True, on_log=on_log)


def _checked(variables: Mapping[str, str] | None) -> dict[str, str]:
    return {check_variable(name): value for name, value in (variables or {}).items()}


async def deploy(
    client: TentacleClient,
    package: Path,
    *,
    package_id: str | None = None,
    version: str | None = None,
    variables: Mapping[str, str] | None = None,
    substitute: Sequence[str] = (),
    keep: int = DEFAULT_KEEP,
    apps: str | None = None,
    on_log: Log | None = None,
    progress: Progress | None = None,
) -> DeployResult:
    """
    Deploy a package to one agent: upload it unless the agent already has
    this exact package, then extract, run its conventions and activate it
    there.  The deployment's own failure is in the result's exit code.

    @param variables: environment variables for the package's scripts, and
        the values of C{#{Name}} placeholders in the C{substitute} files.
    @param apps: the agent's applications folder (default: the agent's own).
    @raise PackageError: the package's name gives no id and version.
    @raise VariableError: a variable name is not allowed.
    @raise ClientError: the agent could not be driven.
    """
    name = parse_package_name(package.name, package_id, version)
    checked = _checked(variables)
    if keep < 1:
        raise ValueError("keep at least 1 release")
    sha1, _, _ = file_hashes(package)
    uploaded = False
    if await cached_sha1(client, name) != sha1:
        await client.upload(package, f"{PACKAGE_CACHE}/{name.file_name}", progress)
        uploaded = True
    arguments = ["--id", name.id, "--version", name.version, "--sha1", sha1, "--keep", str(keep), *_apps(apps)]
    for pattern in substitute:
        arguments += ["--substitute", pattern]
    body = _command("deploy", *arguments, raw=f"--package {_cached_path(name)}")
    code = await _run_with_variables(client, body, checked, on_log)
    return DeployResult(name, sha1, uploaded, code)


async def rollback(
    client: TentacleClient,
    package_id: str,
    *,
    to: str | None = None,
    variables: Mapping[str, str] | None = None,
    apps: str | None = None,
    on_log: Log | None = None,
) -> int:
    """
    Re-activate the release deployed before the current one (or C{to}) and
    run its C{PostDeploy.sh} again; the tool's exit code.
    """
    arguments = ["--id", check_id(package_id), *_apps(apps)]
    if to is not None:
        arguments += ["--to", to]
    return await _run_with_variables(client, _command("rollback", *arguments), _checked(variables), on_log)


async def releases(client: TentacleClient, package_id: str, *, apps: str | None = None) -> list[ReleaseInfo]:
    """
    The releases an agent keeps of a package, least recently deployed first.
    """
    answer = await _json_answer(client, _command("releases", "--json", "--id", check_id(package_id), *_apps(apps)))
    return [
        ReleaseInfo(r["version"], r["path"], r.get("deployed"), r.get("sha1"), bool(r.get("current")))
        for r in answer.get("releases", [])
    ]
