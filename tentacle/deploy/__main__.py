"""
C{python -m tentacle.deploy}: deploy packages on this machine.

The agent runs it as a script (the client sends C{"$TentaclePython" -m
tentacle.deploy ...}), so everything it prints is the script's log.  Exit
status: 0 when it worked, 1 when the deployment failed, 2 for a wrong
command line, 128 + N when signal N stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from tentacle.deploy.deployment import (
    DEFAULT_KEEP,
    EXIT_FAILED,
    DeployRequest,
    VariableError,
    check_variable,
    deploy,
    parse_variables,
    rollback,
)
from tentacle.deploy.packages import PackageError, PackageLimits, check_id, file_hashes, parse_package_name
from tentacle.deploy.releases import ReleaseError, ReleaseStore
from tentacle.encryption import PASSWORD_VARIABLE, DecryptionError, decrypt, is_encrypted


class _Stopped(BaseException):
    """
    SIGTERM arrived (the agent cancelled the script): unwind, so temp
    folders and half-extracted releases are removed on the way out.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: Any) -> NoReturn:
    raise _Stopped(signum)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1")
    return value


def _keep(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("keep at least 1 release")
    return value


def build_parser() -> argparse.ArgumentParser:
    default_apps = os.environ.get("TentacleApplications")
    apps_help = "the applications folder (default: $TentacleApplications)"
    parser = argparse.ArgumentParser(prog="python -m tentacle.deploy", description="Deploy packages on this machine.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = commands.add_parser("deploy", help="extract a package, run its conventions and activate it")
    d.add_argument("--package", required=True, help="the package file (.tar.gz, .tgz, .zip, .nupkg)")
    d.add_argument("--id", dest="package_id", help="the package id (default: from the file name)")
    d.add_argument("--version", help="the package version (default: from the file name)")
    d.add_argument("--sha1", help="refuse the package unless its SHA-1 is this")
    d.add_argument("--sha256", help="refuse the package unless its SHA-256 is this")
    d.add_argument("--apps", default=default_apps, help=apps_help)
    d.add_argument("--keep", type=_keep, default=DEFAULT_KEEP, help=f"releases to keep (default {DEFAULT_KEEP})")
    d.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a variable; repeatable")
    d.add_argument("--variables-file", metavar="FILE", help="variables as a JSON object of strings")
    d.add_argument("--substitute", action="append", default=[], metavar="GLOB",
                   help="substitute #{Name} placeholders in these files of the release; repeatable")
    limits = PackageLimits()
    d.add_argument("--max-extracted-bytes", type=_positive, default=limits.max_bytes, metavar="BYTES",
                   help=f"refuse a package that extracts to more (default {limits.max_bytes:,})")
    d.add_argument("--max-entries", type=_positive, default=limits.max_entries, metavar="N",
                   help=f"refuse a package of more files, folders and links (default {limits.max_entries:,})")
    d.add_argument("--max-ratio", type=_positive, default=limits.max_ratio, metavar="N",
                   help=f"refuse a package that expands over N times its size, past "
                        f"{limits.ratio_floor // (1 << 20)} MiB (default {limits.max_ratio})")

    r = commands.add_parser("rollback", help="re-activate the previous release and run its PostDeploy.sh")
    r.add_argument("--id", dest="package_id", required=True)
    r.add_argument("--to", metavar="VERSION", help="this release instead of the previous one")
    r.add_argument("--apps", default=default_apps, help=apps_help)
    r.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a variable; repeatable")
    r.add_argument("--variables-file", metavar="FILE", help="variables as a JSON object of strings")

    s = commands.add_parser("releases", help="list the releases kept, and which is current")
    s.add_argument("--id", dest="package_id", required=True)
    s.add_argument("--apps", default=default_apps, help=apps_help)
    s.add_argument("--json", action="store_true", help="one JSON object")

    h = commands.add_parser("hash", help="the SHA-1 and SHA-256 of a file, if it exists (the package cache check)")
    h.add_argument("--path", required=True)
    h.add_argument("--json", action="store_true", help="one JSON object")
    return parser


def _read_variables_file(path: str) -> str:
    """
    The file's text; decrypted in memory when the agent stored it
    encrypted, with the password the script was given (never on disk).
    """
    raw = Path(path).read_bytes()
    if not is_encrypted(raw):
        return raw.decode("utf-8")
    password = os.environ.get(PASSWORD_VARIABLE)
    if password is None:
        raise VariableError(f"{path} is encrypted, and ${PASSWORD_VARIABLE} is not set")
    try:
        return decrypt(raw, password)
    except DecryptionError as e:
        raise VariableError(f"{path}: {e}") from None


def _variables(args: argparse.Namespace) -> dict[str, str]:
    variables: dict[str, str] = {}
    if args.variables_file:
        data = json.loads(_read_variables_file(args.variables_file))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise VariableError(f"{args.variables_file} must hold a JSON object of strings")
        variables.update({check_variable(k): v for k, v in data.items()})
    variables.update(parse_variables(args.var))
    return variables


def _apps(args: argparse.Namespace) -> Path:
    if not args.apps:
        raise ReleaseError("give --apps, or run under the agent, which sets $TentacleApplications")
    return Path(args.apps).absolute()


def _releases(args: argparse.Namespace) -> int:
    store = ReleaseStore(_apps(args), args.package_id)
    releases = store.releases()
    current = next((r.version for r in releases if r.current), None)
    if args.json:
        print(json.dumps({"id": args.package_id, "current": current, "releases": [r.to_json() for r in releases]}))
    elif not releases:
        print(f"No releases of {args.package_id} in {store.root}")
    else:
        for release in releases:
            marker = "*" if release.current else " "
            print(f"{marker} {release.version:<24} {release.deployed or 'unknown':<26} {release.path}")
    return 0


def _hash(args: argparse.Namespace) -> int:
    path = Path(args.path).absolute()
    result: dict[str, Any] = {"path": str(path), "exists": path.is_file()}
    if path.is_file():
        sha1, sha256, length = file_hashes(path)
        result.update(sha1=sha1, sha256=sha256, length=length)
    if args.json:
        print(json.dumps(result))
    elif result["exists"]:
        print(f"{result['sha1']}  {path}")
    else:
        print(f"{path} does not exist")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        variables = _variables(args) if args.command in ("deploy", "rollback") else {}
    except (VariableError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    # The package's own scripts get the variables, not the files' password.
    os.environ.pop(PASSWORD_VARIABLE, None)
    try:
        if args.command == "deploy":
            package = Path(args.package).absolute()
            name = parse_package_name(package.name, args.package_id, args.version)
            request = DeployRequest(
                package=package, name=name, applications=_apps(args), keep=args.keep,
                sha1=args.sha1, sha256=args.sha256, variables=variables, substitute=tuple(args.substitute),
                limits=PackageLimits(args.max_extracted_bytes, args.max_entries, args.max_ratio),
            )
            return deploy(request)
        if args.command == "rollback":
            return rollback(_apps(args), check_id(args.package_id), args.to, variables)
        if args.command == "releases":
            check_id(args.package_id)
            return _releases(args)
        return _hash(args)
    except (PackageError, ReleaseError, VariableError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    try:
        return run(argv)
    except _Stopped as e:
        print("Stopped: the deployment was cancelled", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
