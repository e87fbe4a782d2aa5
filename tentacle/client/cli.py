"""
C{tentacle-client}: drive listening tentacles from a shell.

Thin: parse, call L{tentacle.client.api}, print.  Everything that can be
checked without an agent (the command line, the targets file, local files)
is checked before any agent is contacted.  Exit status: the script's own
for C{run} on one target; otherwise 0 when everything worked, 1 when
something failed, 2 for a wrong command line or targets file, 130 after
Ctrl-C.  The common options may come before or after the command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Awaitable, Callable, NoReturn, Sequence

import attrs
from twisted.logger import formatEvent, globalLogPublisher
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults

from tentacle import __version__, events
from tentacle.client import deploy_cli
from tentacle.client.api import RemoteError, Target, TentacleClient
from tentacle.client.connection import AgentRefused, ClientError, Pin
from tentacle.client.targets import TargetError, load_targets_file, parse_target, read_target_list, via_hub
from tentacle.dialer import Proxy
from tentacle.config import ConfigError, resolve_home
from tentacle.contracts import ProcessOutput, ProcessOutputSource, ScriptIsolationLevel
from tentacle.errors import describe_os_error, failure_sentence
from tentacle.identity import Identity, IdentityError, IdentityStore

DEFAULT_TARGETS_FILE = Path("~/.config/tentacle/targets.json")
EXIT_CANCELLED = 130


class UsageError(Exception):
    """
    The command line (or the targets file) is wrong; exit status 2.
    """


class CommandError(Exception):
    """
    Understood, but it cannot be done (a local file is missing, say); exit status 1.
    """


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _add_common_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """
    The options every command takes, before or after its name; after it,
    they default to nothing, so they never undo the same option given before.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_command else value

    parser.add_argument("--home", default=default(None),
                        help="use this agent home's certificate as our identity (default: $TENTACLE_HOME or ~/.tentacle)")
    parser.add_argument("--cert", default=default(None), help="our certificate (PEM); with --key")
    parser.add_argument("--key", default=default(None), help="our private key (PEM); with --cert")
    parser.add_argument("--thumbprint", default=default(None),
                        help="the agents' certificate thumbprint (SHA-1 or SHA-256) to pin, for targets that name none")
    parser.add_argument("--targets-file", default=default(None), metavar="FILE",
                        help="named targets: {\"name\": {\"host\": ..., \"port\": ..., \"thumbprint\": ...}} "
                             f"(default {DEFAULT_TARGETS_FILE}, when it exists)")
    parser.add_argument("--target", action="append", default=default([]), metavar="TARGET",
                        help="another target (host[:port], a name, or @FILE listing targets one a line; "
                             "any of them =THUMBPRINT to pin it); repeatable")
    parser.add_argument("--hub", metavar="HOST[:PORT]", default=default(None),
                        help="reach poll://ID/ targets (polling agents) through this hub (port 10943 by default)")
    parser.add_argument("--hub-thumbprint", metavar="THUMBPRINT", default=default(None),
                        help="the hub's certificate thumbprint (SHA-1 or SHA-256) to pin")
    parser.add_argument("--proxy", metavar="URL", default=default(None),
                        help="reach the agents through this HTTP CONNECT proxy: http://[user:password@]host[:port]")
    parser.add_argument("--concurrency", type=int, default=default(10), help="targets worked on at once (default 10)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print results as JSON lines, one record per target (failures included)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tentacle-client", description="Drive listening tentacles (ours or Octopus's).")
    parser.add_argument("--version", action="version", version=f"tentacle-client {__version__}")
    _add_common_options(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        command = commands.add_parser(name, **kw)
        _add_common_options(command, after_command=True)
        return command

    check = add("check", help="connect and show the agent's identity, TLS version, capabilities and round trip")
    check.add_argument("targets", nargs="*", metavar="TARGET")

    run = add("run", help="run a script and stream its log; exits with its exit code")
    run.add_argument("targets", nargs="*", metavar="TARGET")
    body = run.add_mutually_exclusive_group(required=True)
    body.add_argument("--file", "-f", help="the script (bash) to run")
    body.add_argument("-c", dest="text", metavar="TEXT", help="the script text to run")
    run.add_argument("--isolation", choices=("full", "none"), default="none")
    run.add_argument("--mutex", help="the isolation mutex name")
    run.add_argument("--file-arg", action="append", default=[], metavar="NAME=PATH",
                     help="send a file into the script's workspace; repeatable")
    run.add_argument("--encrypt", action="store_true",
                     help="the agent stores the --file-arg files encrypted; the script gets the "
                          "password in $TENTACLE_FILES_PASSWORD")
    run.add_argument("--arg", action="append", default=[], help="a script argument; repeatable")

    upload = add("upload", help="send a file to the agent")
    upload.add_argument("targets", nargs="*", metavar="TARGET")
    upload.add_argument("local")
    upload.add_argument("remote")

    download = add(
        "download",
        help="fetch a file from the agent (from several: LOCAL is a folder, one file per target in LOCAL/TARGET/)",
    )
    download.add_argument("download_target", metavar="TARGET")
    download.add_argument("remote")
    download.add_argument("local")
    deploy_cli.add_commands(add)
    return parser


def _split_positionals(args: argparse.Namespace) -> list[str]:
    """
    For upload, the last two positionals are the files; the rest are targets.
    """
    if args.command == "download":
        return [args.download_target]
    return list(args.targets)


def _expand_target_files(names: Sequence[str]) -> list[str]:
    """
    C{@FILE} stands for the targets listed in FILE, one a line.
    """
    expanded: list[str] = []
    for name in names:
        expanded += read_target_list(Path(name[1:])) if name.startswith("@") else [name]
    return expanded


def resolve_targets(
    names: Sequence[str], thumbprint: str | None, targets_file: Path, required: bool = False
) -> list[tuple[str, Target]]:
    """
    Each name as a target: C{host[:port]} or a name from the targets file,
    pinned by its own C{=THUMBPRINT}, the file's, or C{thumbprint}.

    @raise TargetError: with the file, the entry and the field.
    """
    pin = None
    if thumbprint is not None:
        try:
            pin = Pin(thumbprint)
        except ValueError as e:
            raise TargetError(f"--thumbprint: {e}") from None
    named = load_targets_file(targets_file, required)
    return [(name.rpartition("=")[0] if "=" in name else name, parse_target(name, named, pin)) for name in names]


def load_identity(args: argparse.Namespace) -> Identity:
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise UsageError("tentacle-client: --cert and --key go together")
        return Identity.from_pem(Path(args.cert).read_bytes() + Path(args.key).read_bytes())
    return IdentityStore(resolve_home(args.home)).load()


@attrs.define
class Outcome:
    target: str
    ok: bool
    detail: str
    exit_code: int | None = None
    data: dict[str, Any] = attrs.field(factory=dict)


class Console:
    """
    Where output goes; prefixes lines per target when there are several.
    """

    def __init__(self, out: IO[str], err: IO[str], multi: bool, as_json: bool) -> None:
        self.out, self.err, self.multi, self.as_json = out, err, multi, as_json
        self.tty = hasattr(out, "isatty") and out.isatty()
        #: The targets that have their result record (JSON), so a failure
        #: without one gets one.
        self.recorded: set[str] = set()

    def line(self, target: str, text: str, stream: IO[str] | None = None) -> None:
        prefix = f"[{target}] " if self.multi else ""
        (stream or self.out).write(f"{prefix}{text}\n")
        (stream or self.out).flush()

    def log(self, target: str, entry: ProcessOutput) -> None:
        if self.as_json:
            self._write({"target": target, "source": entry.source.name, "text": entry.text,
                         "occurred": entry.occurred.isoformat()})
            return
        source = "" if self.tty and not self.multi else f"{entry.source.name.lower()}: "
        stream = self.err if entry.source is ProcessOutputSource.StdErr and self.tty else self.out
        self.line(target, f"{source}{entry.text}", stream)

    def record(self, data: dict[str, Any]) -> None:
        """
        A target's result record (JSON lines).
        """
        if "target" in data:
            self.recorded.add(data["target"])
        self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        self.out.write(json.dumps(data) + "\n")
        self.out.flush()

    def error(self, target: str, text: str, exit_code: int | None = None) -> None:
        """
        A target failed: a line on stderr, or its record with the error.
        """
        if self.as_json:
            if target not in self.recorded:
                record: dict[str, Any] = {"target": target, "ok": False, "error": text}
                if exit_code is not None:
                    record["exit_code"] = exit_code
                self.record(record)
        else:
            self.line(target, f"error: {text}", self.err)

    def progress(self, target: str) -> Callable[[int, int], None] | None:
        if not (hasattr(self.err, "isatty") and self.err.isatty()) or self.multi:
            return None
        started = time.monotonic()

        def show(done: int, total: int) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            rate = done / elapsed
            eta = (total - done) / rate if rate else 0
            self.err.write(f"\r{done / 2**20:9.1f} / {total / 2**20:.1f} MiB  {rate / 2**20:7.1f} MiB/s  ETA {eta:5.0f} s")
            if done >= total:
                self.err.write("\n")
            self.err.flush()

        return show


async def _check(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    started = time.monotonic()
    connection = await client.connect()
    client._release(connection)
    capabilities = await client.capabilities()
    started_rtt = time.monotonic()
    await client.call("ICapabilitiesServiceV2", "GetCapabilities")
    rtt = time.monotonic() - started_rtt
    peer = connection.peer
    assert peer is not None
    data = {
        "target": name, "ok": True, "thumbprint": peer.thumbprint, "sha256": peer.sha256, "subject": peer.subject,
        "tls": connection.tls_version, "capabilities": capabilities,
        "connect_seconds": round(started_rtt - started, 4), "round_trip_seconds": round(rtt, 4),
        "pinned": client.target.pin is not None,
    }
    if console.as_json:
        console.record(data)
    else:
        verified = "verified against the pin" if client.target.pin else "NOT VERIFIED: no --thumbprint given"
        console.line(name, f"Agent thumbprint: {peer.thumbprint} ({verified})")
        console.line(name, f"Subject:          {peer.subject}")
        console.line(name, f"TLS:              {connection.tls_version}")
        console.line(name, f"Capabilities:     {', '.join(capabilities)}")
        console.line(name, f"Round trip:       {rtt * 1000:.1f} ms")
    return Outcome(name, True, "ok", data=data)


async def _run(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    code = await client.run_script(
        args.body,
        arguments=tuple(args.arg),
        isolation=ScriptIsolationLevel.FullIsolation if args.isolation == "full" else ScriptIsolationLevel.NoIsolation,
        mutex=args.mutex,
        files=args.files,
        encrypt_files=args.encrypt,
        on_log=lambda entry: console.log(name, entry),
    )
    if console.as_json:
        console.record({"target": name, "ok": code == 0, "exit_code": code})
    return Outcome(name, code == 0, f"exit code {code}", exit_code=code)


async def _upload(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    result = await client.upload(Path(args.local), args.remote, console.progress(name))
    data = {"target": name, "ok": True, "path": result.full_path, "length": result.length, "sha1": result.hash}
    if console.as_json:
        console.record(data)
    else:
        console.line(name, f"Uploaded {result.length} bytes to {result.full_path} (SHA-1 {result.hash}, verified)")
    return Outcome(name, True, "uploaded", data=data)


async def _download(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    local = args.destinations[name]
    local.parent.mkdir(parents=True, exist_ok=True)
    length, sha1 = await client.download(args.remote, local, console.progress(name))
    if console.as_json:
        console.record({"target": name, "ok": True, "path": str(local), "length": length, "sha1": sha1})
    else:
        console.line(name, f"Downloaded {length} bytes to {local} (SHA-1 {sha1})")
    return Outcome(name, True, f"downloaded to {local}")


COMMANDS: dict[str, Callable[[TentacleClient, Console, str, argparse.Namespace], Awaitable[Outcome]]] = {
    "check": _check, "run": _run, "upload": _upload, "download": _download,
}
COMMANDS.update(deploy_cli.COMMANDS)


def describe_failure(error: Exception, identity: Identity, target: Target) -> str:
    """
    A failure as a sentence that says what to do.
    """
    if isinstance(error, AgentRefused):
        return (
            f"{target} refused our certificate {identity.thumbprint}: the agent does not trust it; "
            f"to let this client drive it, run on the agent: tentacle configure --trust {identity.thumbprint}"
        )
    if isinstance(error, RemoteError):
        return error.error.message
    if isinstance(error, OSError):
        return describe_os_error(error)
    return str(error)


async def _one(reactor: Any, identity: Identity, console: Console, name: str, target: Target,
               args: argparse.Namespace) -> Outcome:
    client = TentacleClient(target, identity, reactor)
    try:
        outcome = await COMMANDS[args.command](client, console, name, args)
    except CancelledError:
        console.error(name, "cancelled", EXIT_CANCELLED)
        return Outcome(name, False, "cancelled", exit_code=EXIT_CANCELLED)
    except (ClientError, OSError) as e:
        text = describe_failure(e, identity, target)
        console.error(name, text)
        return Outcome(name, False, text)
    finally:
        await client.close()
    if not outcome.ok and console.as_json:
        console.error(name, outcome.detail, outcome.exit_code)
    return outcome


@attrs.frozen
class Plan:
    """
    What a command will do, checked before any agent is contacted.
    """

    identity: Identity
    targets: list[tuple[str, Target]]


def prepare(args: argparse.Namespace) -> Plan:
    """
    Check everything that can be checked without an agent, and resolve the
    targets.

    @raise UsageError: the command line or the targets file is wrong.
    @raise CommandError: a local file is missing or unusable.
    """
    try:
        names = _expand_target_files(_split_positionals(args) + list(args.target))
        if not names:
            raise UsageError(f"tentacle-client {args.command}: give at least one TARGET")
        targets_file = Path(args.targets_file or DEFAULT_TARGETS_FILE)
        targets = resolve_targets(names, args.thumbprint, targets_file, required=args.targets_file is not None)
        hub_pin = Pin(args.hub_thumbprint) if args.hub_thumbprint else None
        targets = [(name, via_hub(target, args.hub, hub_pin)) for name, target in targets]
    except ValueError as e:  # a TargetError, or a --hub-thumbprint that is not one
        raise UsageError(f"tentacle-client: {e}") from None
    if args.proxy:
        try:
            proxy = Proxy.from_url(args.proxy)
        except ValueError as e:
            raise UsageError(f"tentacle-client: --proxy: {e}") from None
        targets = [(name, attrs.evolve(target, proxy=proxy)) for name, target in targets]
    if args.command != "check":
        unpinned = [name for name, target in targets if target.pin is None]
        if unpinned:
            raise UsageError(
                f"tentacle-client: no thumbprint for {', '.join(unpinned)}: give --thumbprint, "
                "write TARGET=THUMBPRINT, or name the target in the targets file (only 'check' works unpinned)"
            )
    _check_locals(args, [name for name, _ in targets])
    try:
        deploy_cli.check(args)
    except ValueError as e:
        raise UsageError(f"tentacle-client {args.command}: {e}") from None
    return Plan(load_identity(args), targets)


def _readable(path: str, what: str) -> Path:
    local = Path(path).expanduser()
    try:
        with local.open("rb"):
            pass
    except OSError as e:
        raise CommandError(f"{what}: {describe_os_error(e, local)}") from None
    if local.is_dir():
        raise CommandError(f"{what}: {local} is a folder, not a file")
    return local


def _remote_name(remote: str) -> str:
    name = re.split(r"[\\/]", remote)[-1]
    if not name or name in (".", ".."):
        raise UsageError(f"tentacle-client download: {remote!r} names a folder; name the file to fetch")
    return name


def _check_locals(args: argparse.Namespace, names: list[str]) -> None:
    """
    The local files a command reads or writes, checked (and the script
    read) before anything is sent.
    """
    if args.command == "run":
        args.body = _readable(args.file, "--file").read_text() if args.file else args.text
        args.files = {}
        for spec in args.file_arg:
            file_name, equals, path = spec.partition("=")
            if not equals or not file_name or not path:
                raise UsageError(f"tentacle-client run: --file-arg {spec!r} is not NAME=PATH")
            args.files[file_name] = _readable(path, f"--file-arg {file_name}")
    elif args.command == "upload":
        _readable(args.local, "the file to upload")
    elif args.command == "download":
        args.destinations = _destinations(args.local, _remote_name(args.remote), names)


def _destinations(local: str, name: str, targets: list[str]) -> dict[str, Path]:
    """
    Where each target's copy goes: LOCAL (or inside it, when it is a
    folder) for one target; LOCAL/TARGET/NAME for several, so no copy
    overwrites another.
    """
    path = Path(local).expanduser().absolute()
    if len(targets) == 1:
        if path.is_dir():
            path = path / name
        if not path.parent.is_dir():
            raise CommandError(f"cannot save to {path}: the folder {path.parent} does not exist")
        return {targets[0]: path}
    if path.exists() and not path.is_dir():
        raise CommandError(
            f"{path} is a file, but with {len(targets)} targets LOCAL must be a folder: "
            "each target's copy goes to LOCAL/TARGET/" + name
        )
    if len(set(targets)) != len(targets):
        raise UsageError("tentacle-client download: a target is named twice")
    return {target: path / re.sub(r"[/\\]", "_", target) / name for target in targets}


async def _main(reactor: Any, args: argparse.Namespace, console: Console, plan: Plan) -> int:
    console.multi = len(plan.targets) > 1
    limit = DeferredSemaphore(max(1, args.concurrency))
    work = [limit.run(_one, reactor, plan.identity, console, n, t, args) for n, t in plan.targets]
    everything = gatherResults(work)

    def interrupted(signum: int, frame: Any) -> None:
        console.err.write("Interrupted: cancelling the remote work and waiting for it to stop...\n")

        def cancel_all() -> None:
            for d in work:
                d.cancel()

        reactor.callFromThread(cancel_all)

    signal.signal(signal.SIGINT, interrupted)
    outcomes: list[Outcome] = await everything
    cancelled = any(o.exit_code == EXIT_CANCELLED and not o.ok for o in outcomes)
    if len(outcomes) > 1:
        failed = [o for o in outcomes if not o.ok]
        if console.as_json:
            console.record({"summary": {"targets": len(outcomes), "failed": len(failed)}})
        else:
            console.out.write("\nTarget" + " " * 26 + "Result\n")
            for o in outcomes:
                console.out.write(f"{o.target:<32}{'ok' if o.ok else 'FAILED'}: {o.detail}\n")
            console.out.write(f"{len(outcomes) - len(failed)} of {len(outcomes)} succeeded\n")
        if cancelled:
            return EXIT_CANCELLED
        return 1 if failed else 0
    [outcome] = outcomes
    if outcome.exit_code is not None:
        return outcome.exit_code
    return 0 if outcome.ok else 1


def _run_reactor(args: argparse.Namespace, console: Console, plan: Plan) -> int:
    """
    Run the command on the global reactor, in this process, until it ends.
    """
    from twisted.internet import reactor

    ended: dict[str, Any] = {}

    def retried(event: Any) -> None:
        # The client retries as Octopus Server does, for up to 2.5 minutes:
        # say so, rather than sit silent.
        if event.get("event") == events.CALL_RETRIED:
            console.err.write(f"tentacle-client: {formatEvent(event)}\n")

    globalLogPublisher.addObserver(retried)  # type: ignore[arg-type]

    def start() -> None:
        d = Deferred.fromCoroutine(_main(reactor, args, console, plan))
        d.addCallbacks(lambda code: ended.update(code=code), lambda f: ended.update(failure=f))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    try:
        reactor.run()
    finally:
        globalLogPublisher.removeObserver(retried)  # type: ignore[arg-type]
    if "failure" in ended:
        ended["failure"].raiseException()
    return int(ended.get("code", 1))


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0)
        plan = prepare(args)
        console = Console(out, err, False, args.json)
        return _run_reactor(args, console, plan)
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except (CommandError, IdentityError, ConfigError, OSError) as e:
        err.write(f"tentacle-client: error: {failure_sentence(e)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
