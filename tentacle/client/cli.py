"""
C{tentacle-client}: drive listening tentacles from a shell.

Thin: parse, call L{tentacle.client.api}, print.  Exit status: the script's
own for C{run} on one target; otherwise 0 when everything worked, 1 when
something failed, 2 for a wrong command line, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Awaitable, Callable, NoReturn, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults

from tentacle.client import deploy_cli
from tentacle.client.api import RemoteError, Target, TentacleClient
from tentacle.client.connection import ClientError, Pin
from tentacle.dialer import Proxy
from tentacle.config import ConfigError, resolve_home
from tentacle.contracts import ProcessOutput, ProcessOutputSource, ScriptIsolationLevel
from tentacle.identity import Identity, IdentityError, IdentityStore

DEFAULT_TARGETS_FILE = Path("~/.config/tentacle/targets.json")
EXIT_CANCELLED = 130


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--home", help="use this agent home's certificate as our identity (default: $TENTACLE_HOME or ~/.tentacle)")
    common.add_argument("--cert", help="our certificate (PEM); with --key")
    common.add_argument("--key", help="our private key (PEM); with --cert")
    common.add_argument("--thumbprint", help="the agents' certificate thumbprint (SHA-1 or SHA-256) to pin")
    common.add_argument("--targets-file", default=str(DEFAULT_TARGETS_FILE),
                        help="named targets: {\"name\": {\"host\": ..., \"port\": ..., \"thumbprint\": ...}}")
    common.add_argument("--target", action="append", default=[], metavar="TARGET",
                        help="another target (host[:port], a name, or @FILE listing targets one a line); repeatable")
    common.add_argument("--proxy", metavar="URL",
                        help="reach the agents through this HTTP CONNECT proxy: http://[user:password@]host[:port]")
    common.add_argument("--concurrency", type=int, default=10, help="targets worked on at once (default 10)")
    common.add_argument("--json", action="store_true", help="print results as JSON lines")
    parser = _Parser(prog="tentacle-client", description="Drive listening tentacles (ours or Octopus's).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add = lambda name, **kw: commands.add_parser(name, parents=[common], **kw)  # noqa: E731
    commands.required = True

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

    download = add("download", help="fetch a file from the agent")
    download.add_argument("download_target", metavar="TARGET")
    download.add_argument("remote")
    download.add_argument("local")
    deploy_cli.add_commands(add)
    return parser


def _split_positionals(args: argparse.Namespace) -> list[str]:
    """
    For upload, the last two positionals are the files; the rest are targets.
    """
    if args.command == "upload":
        return list(args.targets)
    if args.command == "download":
        return [args.download_target]
    return list(args.targets)


def _host_and_port(text: str) -> tuple[str, int]:
    """
    C{host}, C{host:port}, C{[v6]} or C{[v6]:port}.
    """
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        number = int(port) if port else 10933
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise UsageError(f"tentacle-client: {text!r} is not host[:port] or a named target")
    return host, number


def _expand_target_files(names: Sequence[str]) -> list[str]:
    """
    C{@FILE} stands for the targets listed in FILE, one a line (blank lines
    and C{#} comments ignored).
    """
    expanded: list[str] = []
    for name in names:
        if not name.startswith("@"):
            expanded.append(name)
            continue
        try:
            lines = Path(name[1:]).expanduser().read_text().splitlines()
        except OSError as e:
            raise UsageError(f"tentacle-client: cannot read the target list {name[1:]}: {e.strerror}") from None
        expanded += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    return expanded


def _pin(thumbprint: str | None) -> Pin | None:
    if thumbprint is None:
        return None
    try:
        return Pin(thumbprint)
    except ValueError as e:
        raise UsageError(f"tentacle-client: --thumbprint: {e}") from None


def resolve_targets(names: Sequence[str], thumbprint: str | None, targets_file: Path) -> list[tuple[str, Target]]:
    """
    C{host[:port]} with C{--thumbprint}, or a name from the targets file.
    """
    named: dict[str, Any] = {}
    if targets_file.expanduser().exists():
        try:
            named = json.loads(targets_file.expanduser().read_text())
        except ValueError as e:
            raise UsageError(f"{targets_file} is not valid JSON: {e}") from None
    resolved = []
    for name in names:
        if name in named:
            entry = named[name]
            target = Target(entry["host"], int(entry.get("port", 10933)), _pin(entry.get("thumbprint") or thumbprint))
        else:
            host, port = _host_and_port(name)
            target = Target(host, port, _pin(thumbprint))
        resolved.append((name, target))
    return resolved


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

    def line(self, target: str, text: str, stream: IO[str] | None = None) -> None:
        prefix = f"[{target}] " if self.multi else ""
        (stream or self.out).write(f"{prefix}{text}\n")
        (stream or self.out).flush()

    def log(self, target: str, entry: ProcessOutput) -> None:
        if self.as_json:
            self.record({"target": target, "source": entry.source.name, "text": entry.text,
                         "occurred": entry.occurred.isoformat()})
            return
        source = "" if self.tty and not self.multi else f"{entry.source.name.lower()}: "
        stream = self.err if entry.source is ProcessOutputSource.StdErr and self.tty else self.out
        self.line(target, f"{source}{entry.text}", stream)

    def record(self, data: dict[str, Any]) -> None:
        self.out.write(json.dumps(data) + "\n")
        self.out.flush()

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
        "target": name, "thumbprint": peer.thumbprint, "sha256": peer.sha256, "subject": peer.subject,
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
    body = Path(args.file).read_text() if args.file else args.text
    files = {}
    for spec in args.file_arg:
        file_name, _, path = spec.partition("=")
        files[file_name] = Path(path)
    code = await client.run_script(
        body,
        arguments=tuple(args.arg),
        isolation=ScriptIsolationLevel.FullIsolation if args.isolation == "full" else ScriptIsolationLevel.NoIsolation,
        mutex=args.mutex,
        files=files,
        encrypt_files=args.encrypt,
        on_log=lambda entry: console.log(name, entry),
    )
    if console.as_json:
        console.record({"target": name, "exit_code": code})
    return Outcome(name, code == 0, f"exit code {code}", exit_code=code)


async def _upload(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    result = await client.upload(Path(args.local), args.remote, console.progress(name))
    data = {"target": name, "path": result.full_path, "length": result.length, "sha1": result.hash}
    if console.as_json:
        console.record(data)
    else:
        console.line(name, f"Uploaded {result.length} bytes to {result.full_path} (SHA-1 {result.hash}, verified)")
    return Outcome(name, True, "uploaded", data=data)


async def _download(client: TentacleClient, console: Console, name: str, args: argparse.Namespace) -> Outcome:
    length, sha1 = await client.download(args.remote, Path(args.local), console.progress(name))
    if console.as_json:
        console.record({"target": name, "path": args.local, "length": length, "sha1": sha1})
    else:
        console.line(name, f"Downloaded {length} bytes to {args.local} (SHA-1 {sha1})")
    return Outcome(name, True, "downloaded")


COMMANDS: dict[str, Callable[[TentacleClient, Console, str, argparse.Namespace], Awaitable[Outcome]]] = {
    "check": _check, "run": _run, "upload": _upload, "download": _download,
}
COMMANDS.update(deploy_cli.COMMANDS)


async def _one(reactor: Any, identity: Identity, console: Console, name: str, target: Target,
               args: argparse.Namespace) -> Outcome:
    client = TentacleClient(target, identity, reactor)
    try:
        return await COMMANDS[args.command](client, console, name, args)
    except CancelledError:
        return Outcome(name, False, "cancelled", exit_code=EXIT_CANCELLED)
    except (ClientError, OSError) as e:
        text = e.error.message if isinstance(e, RemoteError) else str(e)
        console.line(name, f"error: {text}", console.err)
        return Outcome(name, False, text)
    finally:
        await client.close()


async def _main(reactor: Any, args: argparse.Namespace, console: Console) -> int:
    identity = load_identity(args)
    names = _expand_target_files(_split_positionals(args) + list(args.target))
    if not names:
        raise UsageError(f"tentacle-client {args.command}: give at least one TARGET")
    targets = resolve_targets(names, args.thumbprint, Path(args.targets_file))
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
                f"tentacle-client: no thumbprint for {', '.join(unpinned)}: give --thumbprint "
                "or name the target in the targets file (only 'check' works unpinned)"
            )
    console.multi = len(targets) > 1
    limit = DeferredSemaphore(max(1, args.concurrency))
    work = [limit.run(_one, reactor, identity, console, n, t, args) for n, t in targets]
    everything = gatherResults(work)

    def interrupted(signum: int, frame: Any) -> None:
        console.err.write("Interrupted: cancelling the remote work and waiting for it to stop...\n")
        def cancel_all() -> None:
            for d in work:
                d.cancel()

        reactor.callFromThread(cancel_all)

    signal.signal(signal.SIGINT, interrupted)
    outcomes: list[Outcome] = await everything
    if len(outcomes) > 1:
        failed = [o for o in outcomes if not o.ok]
        if console.as_json:
            console.record({"summary": {"targets": len(outcomes), "failed": len(failed)}})
        else:
            console.out.write("\nTarget" + " " * 26 + "Result\n")
            for o in outcomes:
                console.out.write(f"{o.target:<32}{'ok' if o.ok else 'FAILED'}: {o.detail}\n")
            console.out.write(f"{len(outcomes) - len(failed)} of {len(outcomes)} succeeded\n")
        return 1 if failed else 0
    [outcome] = outcomes
    if outcome.exit_code is not None:
        return outcome.exit_code
    return 0 if outcome.ok else 1


def _run_reactor(args: argparse.Namespace, console: Console) -> int:
    """
    Run the command on the global reactor, in this process, until it ends.
    """
    from twisted.internet import reactor

    ended: dict[str, Any] = {}

    def start() -> None:
        d = Deferred.fromCoroutine(_main(reactor, args, console))
        d.addCallbacks(lambda code: ended.update(code=code), lambda f: ended.update(failure=f))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
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
        console = Console(out, err, False, args.json)
        return _run_reactor(args, console)
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except (IdentityError, ConfigError, OSError) as e:
        err.write(f"tentacle-client: error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
