"""
A deployment and a rollback, step by step.

Deploy, under the package's lock:

  1. check the package's hashes;
  2. extract it into a temp folder beside the releases (within the
     package limits), fsync every file and folder of it, then rename it to
     C{<id>/<version>} (skipped when that exact package is already there);
  3. C{PreDeploy.sh}; substitute variables; C{Deploy.sh};
  4. activate: switch C{current} to the new release;
  5. C{PostDeploy.sh};
  6. delete releases beyond the number to keep.

A failure runs C{DeployFailed.sh} (when the package was extracted far
enough to have one).  Before step 4, C{current} is left as it was and a
release extracted by this deployment is deleted again.  From step 4 on, the
new release stays live: its PostDeploy may already have changed the
machine, so quietly switching back would lie about what runs.

Rollback re-activates an earlier release that is still on disk, without the
package, and runs its C{PostDeploy.sh} again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import attrs

from tentacle.deploy.conventions import (
    DEPLOY,
    DEPLOY_FAILED,
    POST_DEPLOY,
    PRE_DEPLOY,
    ScriptFailed,
    run_convention,
    say,
    warn,
)
from tentacle.deploy.packages import PackageError, PackageLimits, PackageName, extract, verify_hashes
from tentacle.deploy.releases import ReleaseError, ReleaseStore, remove_tree
from tentacle.deploy.substitution import SubstitutionError, files_to_substitute, substitute_file
from tentacle.fsutil import sync_tree

DEFAULT_KEEP = 3
#: Names we give scripts ourselves; a deployment's own variables may not use
#: the prefix, so they can never shadow the agent's.
RESERVED_PREFIX = "Tentacle"
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")

#: What a failed deployment or rollback exits with.
EXIT_FAILED = 1


class VariableError(ValueError):
    pass


def check_variable(name: str) -> str:
    """
    A variable name usable both as an environment variable in bash and in a
    C{#{Name}} placeholder.
    """
    if not _VARIABLE_NAME.fullmatch(name):
        raise VariableError(f"{name!r} is not a variable name (a letter or '_', then letters, digits, '_')")
    if name.lower().startswith(RESERVED_PREFIX.lower()):
        raise VariableError(f"{name!r}: names starting with {RESERVED_PREFIX!r} are the agent's own")
    return name


def parse_variables(specs: Sequence[str]) -> dict[str, str]:
    """
    C{NAME=VALUE} strings (the value may contain C{=}); a later name wins.
    """
    variables = {}
    for spec in specs:
        name, equals, value = spec.partition("=")
        if not equals:
            raise VariableError(f"{spec!r} is not NAME=VALUE")
        variables[check_variable(name)] = value
    return variables


@attrs.frozen
class DeployRequest:
    package: Path
    name: PackageName
    applications: Path
    keep: int = DEFAULT_KEEP
    sha1: str | None = None
    sha256: str | None = None
    variables: Mapping[str, str] = attrs.field(factory=dict)
    substitute: tuple[str, ...] = ()
    limits: PackageLimits = PackageLimits()


def _facts(store: ReleaseStore, version: str, previous: str | None) -> dict[str, str]:
    """
    What scripts and placeholders learn about the deployment itself.
    """
    return {
        "TentaclePackageId": store.package_id,
        "TentaclePackageVersion": version,
        "TentacleReleaseDirectory": str(store.root / version),
        "TentacleCurrentLink": str(store.root / "current"),
        "TentaclePreviousVersion": previous or "",
    }


def _environment(variables: Mapping[str, str], facts: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(variables)
    env.update(facts)
    return env


def _failed(folder: Path | None, environment: dict[str, str], error: Exception) -> None:
    """
    Report the failure and run C{DeployFailed.sh}; its own failure is
    reported, but the deployment has failed either way.
    """
    warn(f"Deployment failed: {error}")
    if folder is None or not folder.is_dir():
        return
    environment = dict(environment, TentacleDeployError=str(error))
    try:
        run_convention(folder, DEPLOY_FAILED, environment)
    except (ScriptFailed, OSError) as e:
        warn(f"{DEPLOY_FAILED}: {e}")


def deploy(request: DeployRequest) -> int:
    """
    Deploy one package (see the module's docstring); the exit status.
    """
    name = request.name
    try:
        sha1 = verify_hashes(request.package, request.sha1, request.sha256)
    except (PackageError, OSError) as e:
        warn(f"Deployment failed: {e}")
        return EXIT_FAILED
    store = ReleaseStore(request.applications, name.id)
    with store.locked(lambda: say(f"Waiting for another deployment of {name.id} to finish")):
        try:
            store.clean_leftovers()
            previous = store.current_version()
            existing = store.find(name.version)
        except (ReleaseError, OSError) as e:
            warn(f"Deployment failed: {e}")
            return EXIT_FAILED
        facts = _facts(store, name.version, previous)
        environment = _environment(request.variables, facts)
        folder: Path | None = None
        fresh = activated = False
        try:
            if existing is not None and existing.sha1 == sha1:
                say(f"{name.id} {name.version} is already extracted at {existing.path}; deploying it again")
                folder = existing.path
            else:
                if existing is not None and existing.current:
                    raise ReleaseError(
                        f"{name.id} {name.version} is live and was deployed from a different package "
                        f"(SHA-1 {existing.sha1 or 'unknown'}); deploy the change as a new version"
                    )
                say(f"Extracting {request.package.name} to {store.root / name.version}")
                temp = store.new_extract_folder()
                try:
                    extract(request.package, name.kind, temp, request.limits)
                    sync_tree(temp)  # on disk before it can become current
                    if existing is not None:
                        store.remove(name.version)
                    folder = store.install(temp, name.version)
                    fresh = True
                finally:
                    if temp.exists():
                        remove_tree(temp)
            run_convention(folder, PRE_DEPLOY, environment)
            if request.substitute:
                _substitute(folder, request.substitute, {**request.variables, **facts})
            run_convention(folder, DEPLOY, environment)
            store.activate(name.version)
            activated = True
            store.record(name.version, sha1)
            say(f"Activated {name.id} {name.version}: {store.root / 'current'} -> {name.version}")
            run_convention(folder, POST_DEPLOY, environment)
        except (PackageError, ReleaseError, ScriptFailed, SubstitutionError, OSError) as e:
            _failed(folder, environment, e)
            if fresh and not activated and folder is not None:
                remove_tree(folder)
            if not activated:
                say(f"{store.root / 'current'} still points to {previous or 'nothing'}")
            return EXIT_FAILED
        except BaseException:
            if fresh and not activated and folder is not None:
                remove_tree(folder)  # cancelled: leave no half-deployed release behind
            raise
        try:
            deleted = store.prune(request.keep)
        except (ReleaseError, OSError) as e:
            warn(f"Deployed, but old releases could not be deleted: {e}")
            return EXIT_FAILED
        for version in deleted:
            say(f"Deleted old release {version}")
        say(f"Deployed {name.id} {name.version}")
        return 0


def _substitute(folder: Path, patterns: Sequence[str], variables: Mapping[str, str]) -> None:
    files, unmatched = files_to_substitute(folder, patterns)
    for pattern in unmatched:
        warn(f"Substitution: nothing matches {pattern!r}")
    for path in files:
        changed = substitute_file(path, variables)
        relative = path.relative_to(os.path.realpath(folder))
        say(f"Substituted variables in {relative}" + ("" if changed else " (no change)"))


def rollback(
    applications: Path, package_id: str, to: str | None = None, variables: Mapping[str, str] | None = None
) -> int:
    """
    Re-activate the release deployed before the current one (or C{to}) and
    run its C{PostDeploy.sh} again; the exit status.
    """
    store = ReleaseStore(applications, package_id)
    if not store.root.is_dir():
        warn(f"Rollback failed: there are no releases of {package_id} in {applications}")
        return EXIT_FAILED
    with store.locked(lambda: say(f"Waiting for another deployment of {package_id} to finish")):
        try:
            current = store.current_version()
            if to is not None:
                target = store.find(to)
                if target is None:
                    raise ReleaseError(f"there is no release {to} of {package_id} to roll back to")
            elif current is None:
                raise ReleaseError(f"no release of {package_id} is current, so there is nothing to roll back from")
            else:
                target = store.previous(current)
                if target is None:
                    raise ReleaseError(f"{package_id} {current} is the oldest release kept; there is nothing earlier")
        except (ReleaseError, PackageError, OSError) as e:
            warn(f"Rollback failed: {e}")
            return EXIT_FAILED
        if target.version == current:
            say(f"{package_id} {current} is already current")
            return 0
        environment = _environment(variables or {}, _facts(store, target.version, current))
        try:
            store.activate(target.version)
            say(f"Rolled back {package_id}: {store.root / 'current'} -> {target.version} (was {current or 'nothing'})")
            run_convention(target.path, POST_DEPLOY, environment)
        except (ReleaseError, ScriptFailed, OSError) as e:
            _failed(target.path, environment, e)
            return EXIT_FAILED
        return 0
