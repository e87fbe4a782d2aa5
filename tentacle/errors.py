"""
Operating-system errors as sentences a person can act on, for both CLIs:
C{[Errno 2] No such file or directory: 'x'} becomes C{x does not exist}.
"""

from __future__ import annotations

import errno

_SENTENCES = {
    errno.ENOENT: "{name} does not exist",
    errno.EACCES: "permission denied for {name} (run as its owner, or fix its permissions)",
    errno.EPERM: "{name}: the operation is not permitted (run as its owner, or as root)",
    errno.EEXIST: "{name} already exists",
    errno.EISDIR: "{name} is a folder, not a file",
    errno.ENOTDIR: "a part of {name} is a file, not a folder",
    errno.ENOSPC: "there is no space left on the device holding {name}",
    errno.EDQUOT: "the disk quota is exhausted for {name}",
    errno.EROFS: "{name} is on a read-only file system",
    errno.ENAMETOOLONG: "the name {name} is too long",
    errno.ELOOP: "{name} leads to a loop of symbolic links",
    errno.EMFILE: "too many files are open (raise 'ulimit -n')",
    errno.ECONNREFUSED: "the connection to {name} was refused: nothing listens there",
    errno.ETIMEDOUT: "the connection to {name} timed out",
    errno.EHOSTUNREACH: "{name} cannot be reached (no route to the host)",
    errno.ENETUNREACH: "{name} cannot be reached (the network is unreachable)",
    errno.EADDRINUSE: "{name} is already in use",
    errno.EADDRNOTAVAIL: "{name} is not an address of this machine",
}


def describe_os_error(error: OSError, name: object = None) -> str:
    """
    One sentence for C{error}, naming the file (or C{name}, when given).
    """
    subject = name if name is not None else error.filename
    template = _SENTENCES.get(error.errno) if error.errno is not None else None
    if template is not None:
        return template.format(name=subject if subject is not None else "it")
    text = error.strerror or str(error)
    text = text[:1].lower() + text[1:]
    return f"{subject}: {text}" if subject is not None else text


def failure_sentence(error: BaseException) -> str:
    """
    A command's failure as one sentence: an OS error worded as
    L{describe_os_error} words it, any other as it says itself.
    """
    return describe_os_error(error) if isinstance(error, OSError) else str(error)
