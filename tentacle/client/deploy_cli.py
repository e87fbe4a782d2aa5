"""
C{tentacle-client deploy | rollback | releases}: the deployment commands,
kept apart from L{tentacle.client.cli}, which wires them in:

    deploy_cli.add_commands(add)          # in build_parser
    COMMANDS.update(deploy_cli.COMMANDS)  # after COMMANDS

Thin, as the rest of the CLI: parse, call L{tentacle.client.deploy}, print.
This module imports nothing from C{cli} when it loads (C{cli} imports it),
only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from tentacle.client import deploy as library
from tentacle.client.api import TentacleClient
from tentacle.deploy.deployment import DEFAULT_KEEP, VariableError, parse_variables
from tentacle.deploy.packages import PackageError, check_id, parse_package_name

if TYPE_CHECKING:
    from tentacle.client.cli import Console, Outcome


def _outcome(target: str, ok: bool, detail: str, data: dict[str, Any] | None = None) -> Outcome:
    from tentacle.client.cli import Outcome

    return Outcome(target, ok, detail, data=data or {})


def _keep(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("keep at least 1 release")
    return value


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """
    Add the commands through C{add(name, **kw)}, the CLI's own helper that
    gives each command the common options.
    """
    deploy = add("deploy", help="deploy a package: upload it unless the agent has it, then extract and activate it")
    deploy.add_argument("targets", nargs="*", metavar="TARGET")
    deploy.add_argument("package", metavar="PACKAGE", help="<id>.<version>.tar.gz, .tgz, .zip or .nupkg")
    deploy.add_argument("--id", dest="package_id", help="the package id (default: from the file name)")
    deploy.add_argument("--version", dest="package_version", help="the version (default: from the file name)")
    deploy.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="a variable for the package's scripts and placeholders; repeatable")
    deploy.add_argument("--substitute", action="append", default=[], metavar="GLOB",
                        help="replace #{Name} placeholders in these files of the release; repeatable")
    deploy.add_argument("--keep", type=_keep, default=DEFAULT_KEEP,
                        help=f"releases to keep on each agent (default {DEFAULT_KEEP})")
    deploy.add_argument("--apps", help="the agents' applications folder (default: each agent's own)")

    rollback = add("rollback", help="re-activate the previous release and run its PostDeploy.sh again")
    rollback.add_argument("targets", nargs="*", metavar="TARGET")
    rollback.add_argument("package_id", metavar="ID")
    rollback.add_argument("--to", metavar="VERSION", help="this release instead of the previous one")
    rollback.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                          help="a variable for PostDeploy.sh; repeatable")
    rollback.add_argument("--apps", help="the agents' applications folder (default: each agent's own)")

    listing = add("releases", help="list the releases an agent keeps of a package, and which is current")
    listing.add_argument("targets", nargs="*", metavar="TARGET")
    listing.add_argument("package_id", metavar="ID")
    listing.add_argument("--apps", help="the agents' applications folder (default: each agent's own)")


def check(args: argparse.Namespace) -> None:
    """
    What the deployment commands can check before contacting an agent:
    the variables, and the package's id and version.

    @raise ValueError: with a sentence naming the option to fix.
    """
    if args.command not in COMMANDS:
        return
    try:
        args.variables = parse_variables(getattr(args, "var", []))
    except VariableError as e:
        raise ValueError(f"--var: {e}") from None
    if args.command == "deploy":
        try:
            parse_package_name(Path(args.package).name, args.package_id, args.package_version)
        except PackageError as e:
            text = str(e)
            if "is not a version" in text:
                raise ValueError(f"--version: {text}") from None
            if "is not a package id" in text:
                raise ValueError(f"--id: {text}") from None
            raise ValueError(text.replace("give the id and version", "give them with --id and --version")) from None
        if not Path(args.package).is_file():
            raise ValueError(f"the package {args.package} does not exist")
    else:
        try:
            check_id(args.package_id)
        except PackageError as e:
            raise ValueError(str(e)) from None


async def _deploy(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    try:
        variables = parse_variables(args.var)
        result = await library.deploy(
            client, Path(args.package), package_id=args.package_id, version=args.package_version,
            variables=variables, substitute=tuple(args.substitute), keep=args.keep, apps=args.apps,
            on_log=lambda entry: console.log(name, entry), progress=console.progress(name),
        )
    except (PackageError, VariableError) as e:
        console.line(name, f"error: {e}", console.err)
        return _outcome(name, False, str(e))
    package = f"{result.package.id} {result.package.version}"
    how = "uploaded" if result.uploaded else "package already on the agent"
    data = {"target": name, "id": result.package.id, "version": result.package.version, "sha1": result.sha1,
            "uploaded": result.uploaded, "exit_code": result.exit_code}
    if console.as_json:
        console.record(data)
    elif result.ok:
        console.line(name, f"Deployed {package} ({how})")
    else:
        console.line(name, f"Deployment of {package} failed (exit code {result.exit_code})", console.err)
    detail = f"deployed {package} ({how})" if result.ok else f"deployment failed (exit code {result.exit_code})"
    return _outcome(name, result.ok, detail, data)


async def _rollback(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    try:
        code = await library.rollback(
            client, args.package_id, to=args.to, variables=parse_variables(args.var), apps=args.apps,
            on_log=lambda entry: console.log(name, entry),
        )
    except (PackageError, VariableError) as e:
        console.line(name, f"error: {e}", console.err)
        return _outcome(name, False, str(e))
    if console.as_json:
        console.record({"target": name, "id": args.package_id, "exit_code": code})
    detail = "rolled back" if code == 0 else f"rollback failed (exit code {code})"
    return _outcome(name, code == 0, detail)


async def _releases(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    try:
        found = await library.releases(client, args.package_id, apps=args.apps)
    except PackageError as e:
        console.line(name, f"error: {e}", console.err)
        return _outcome(name, False, str(e))
    current = next((r.version for r in found if r.current), None)
    if console.as_json:
        console.record({"target": name, "id": args.package_id, "current": current,
                        "releases": [{"version": r.version, "deployed": r.deployed, "sha1": r.sha1,
                                      "current": r.current, "path": r.path} for r in found]})
    elif not found:
        console.line(name, f"No releases of {args.package_id}")
    else:
        for r in found:
            console.line(name, f"{'*' if r.current else ' '} {r.version:<24} {r.deployed or 'unknown':<26} {r.path}")
    detail = f"{len(found)} release(s), current {current or 'none'}"
    return _outcome(name, True, detail)


COMMANDS: dict[str, Callable[[TentacleClient, Console, str, argparse.Namespace], Awaitable[Outcome]]] = {
    "deploy": _deploy, "rollback": _rollback, "releases": _releases,
}
