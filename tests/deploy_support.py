"""
A sample package for deployment tests, built on the fly: all four
convention scripts, each appending a marker line to C{$TentacleHome/markers.log}
so a test can tell what ran, in which order, where, and what C{current}
pointed to at the time.

Variables steer it: C{FAIL_DEPLOY=yes} makes C{Deploy.sh} exit 7,
C{FAIL_POST=yes} makes C{PostDeploy.sh} exit 9, C{BLOCK=yes} makes
C{Deploy.sh} print C{started} and wait until it is killed.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Mapping

_MARK = (
    'echo "{step} $TentaclePackageVersion in=$(basename "$PWD") '
    'current=$(readlink "$TentacleCurrentLink" || echo none)" >> "$TentacleHome/markers.log"\n'
)

SCRIPTS: dict[str, str] = {
    "PreDeploy.sh": _MARK.format(step="PreDeploy") + 'echo "pre-deploy says hello"\n',
    "Deploy.sh": (
        _MARK.format(step="Deploy")
        + 'echo "deploying $TentaclePackageVersion greeting=${Greeting:-none}"\n'
        + 'echo "a warning" >&2\n'
        + '[ "${BLOCK:-}" != yes ] || { echo started; exec sleep 3600; }\n'
        + '[ "${FAIL_DEPLOY:-}" != yes ] || exit 7\n'
    ),
    "PostDeploy.sh": (
        _MARK.format(step="PostDeploy")
        + 'echo "post-deploy done"\n'
        + '[ "${FAIL_POST:-}" != yes ] || exit 9\n'
    ),
    "DeployFailed.sh": (
        'echo "DeployFailed $TentaclePackageVersion error=$TentacleDeployError" >> "$TentacleHome/markers.log"\n'
    ),
}

FILES: dict[str, str] = {
    "config/app.conf": "greeting=#{Greeting}\nport=#{Port}\nkept=#{NotAVariable}\nliteral=##{Greeting}\n",
    "config/other.txt": "untouched=#{Greeting}\n",
    "site/index.html": "<h1>hello</h1>\n",
}


def sample_package(
    folder: Path,
    version: str,
    package_id: str = "webapp",
    extension: str = ".tar.gz",
    files: Mapping[str, str] | None = None,
    scripts: Mapping[str, str] | None = None,
) -> Path:
    """
    C{<folder>/<id>.<version><extension>}, with the convention scripts and
    a few files; C{files} adds to or replaces the defaults.
    """
    content = {**SCRIPTS, **(scripts or {}), **FILES, **(files or {}), "VERSION": version + "\n"}
    path = folder / f"{package_id}.{version}{extension}"
    if extension in (".zip", ".nupkg"):
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in content.items():
                zf.writestr(name, text)
    else:
        with tarfile.open(path, "w:gz") as tar:
            for name, text in content.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o755 if name.endswith(".sh") else 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


def markers(home: Path) -> list[str]:
    path = home / "markers.log"
    return path.read_text().splitlines() if path.exists() else []
