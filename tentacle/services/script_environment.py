"""
The environment variables every script gets, as Tentacle sets them
(C{Octopus.Tentacle.Core/Util/EnvironmentVariables.cs} and
C{RunAgentCommand}): Calamari and the scripts Octopus Server sends read
them to find the agent's folders, journals, version and proxy.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import SignatureAlgorithmOID

from tentacle import __version__
from tentacle.config import DEFAULT_INSTANCE, ProxySetting

__all__ = [
    "agent_executable",
    "script_variables",
    "signature_algorithm_name",
]

#: .NET's C{Oid.FriendlyName} for the signature algorithms an agent
#: certificate may carry.
_FRIENDLY_NAMES = {
    SignatureAlgorithmOID.RSA_WITH_MD5: "md5RSA",
    SignatureAlgorithmOID.RSA_WITH_SHA1: "sha1RSA",
    SignatureAlgorithmOID.RSA_WITH_SHA224: "sha224RSA",
    SignatureAlgorithmOID.RSA_WITH_SHA256: "sha256RSA",
    SignatureAlgorithmOID.RSA_WITH_SHA384: "sha384RSA",
    SignatureAlgorithmOID.RSA_WITH_SHA512: "sha512RSA",
    SignatureAlgorithmOID.RSASSA_PSS: "RSASSA-PSS",
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: "sha256ECDSA",
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: "sha384ECDSA",
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: "sha512ECDSA",
}


def signature_algorithm_name(certificate: x509.Certificate) -> str:
    """
    What Tentacle puts in C{TentacleCertificateSignatureAlgorithm}: the
    friendly name of its certificate's signature algorithm (C{sha256RSA}
    for the certificates agents make), else the dotted OID.
    """
    oid = certificate.signature_algorithm_oid
    return _FRIENDLY_NAMES.get(oid, oid.dotted_string)


def agent_executable() -> str:
    """
    The C{tentacle} command of this installation: beside the interpreter
    (a virtualenv's C{bin/}), else on PATH, else the interpreter itself.
    """
    beside = Path(sys.executable).parent / "tentacle"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("tentacle") or sys.executable


def _dotnet_bool(value: bool) -> str:
    return "True" if value else "False"


def script_variables(
    *,
    home: Path,
    applications: Path,
    instance_name: str = DEFAULT_INSTANCE,
    signature_algorithm: str = "sha256RSA",
    proxy: ProxySetting = ProxySetting(),
    executable: str | None = None,
) -> dict[str, str]:
    """
    Every variable of Tentacle's list, and C{TentaclePython} (ours: the
    interpreter that runs C{python -m tentacle.deploy}).  Paths are
    absolute.  With no proxy of its own the agent says "use the system's"
    (C{TentacleUseDefaultProxy=True}) and leaves the others empty.
    """
    home = home.absolute()
    executable = executable or agent_executable()
    program_directory = os.path.dirname(executable)
    custom = bool(proxy.host)
    return {
        "TentacleHome": str(home),
        "TentacleApplications": str(applications.absolute()),
        "TentacleJournal": str(home / "DeploymentJournal.xml"),
        "CalamariPackageRetentionJournalPath": str(home / "PackageRetentionJournal.json"),
        "TentacleInstanceName": instance_name,
        "TentacleVersion": __version__,
        "TentacleNetFrameworkDescription": f"{platform.python_implementation()} {platform.python_version()}",
        "TentacleExecutablePath": executable,
        "TentacleProgramDirectoryPath": program_directory,
        "AgentProgramDirectoryPath": program_directory,
        "TentacleCertificateSignatureAlgorithm": signature_algorithm,
        "TentacleUseDefaultProxy": _dotnet_bool(proxy.use_default),
        "TentacleProxyUsername": proxy.username,
        "TentacleProxyPassword": proxy.password,
        "TentacleProxyHost": proxy.host,
        "TentacleProxyPort": str(proxy.port) if custom else "",
        "TentaclePython": sys.executable,
    }
