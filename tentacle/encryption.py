"""
Sensitive script files, encrypted as Tentacle's C{AesEncryption} does.

Octopus Server sends a file that holds secrets (a deployment's sensitive
variables) with a C{ScriptFile.EncryptionPassword}.  Tentacle never writes
such a file in the clear: it reads the stream as text and stores

    C{"IV__"} + a random 16-byte IV + AES-128-CBC/PKCS#7(UTF-8 of the text)

under the key PBKDF2-HMAC-SHA1(password, salt C{"Octopuss"}, 1000
iterations, 16 bytes).  Calamari (or C{python -m tentacle.deploy}) decrypts
it with the same password, which only the script is given.

"Read as text" is .NET's default C{StreamReader}: UTF-8, unless the stream
starts with a UTF-16 or UTF-32 byte order mark; any BOM is consumed, and
bytes that do not decode become U+FFFD.  The text is re-encoded as UTF-8
without a BOM.

Everything here streams: memory does not grow with the file.
"""

from __future__ import annotations

import codecs
import io
import os
import secrets
import shlex
from typing import IO

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

__all__ = [
    "IV_PREFIX",
    "PASSWORD_VARIABLE",
    "DecryptionError",
    "EncryptingReader",
    "decrypt",
    "derive_key",
    "encrypt",
    "is_encrypted",
    "new_password",
    "password_prelude",
]

SALT = b"Octopuss"
ITERATIONS = 1000
KEY_BYTES = 16
IV_PREFIX = b"IV__"
BLOCK_BYTES = 16
HEADER_BYTES = len(IV_PREFIX) + BLOCK_BYTES

#: Where our client's scripts find the password of the files it sent
#: encrypted.  The script body sets it (see L{password_prelude}): the agent
#: runs only what the server sends, and arguments would show in C{ps}.
PASSWORD_VARIABLE = "TENTACLE_FILES_PASSWORD"


class DecryptionError(ValueError):
    """
    The bytes are not an encrypted file, or the password is wrong.
    """


def derive_key(password: str) -> bytes:
    """
    C{Rfc2898DeriveBytes(password, "Octopuss", 1000).GetBytes(16)}.
    """
    kdf = PBKDF2HMAC(algorithm=hashes.SHA1(), length=KEY_BYTES, salt=SALT, iterations=ITERATIONS)
    return kdf.derive(password.encode("utf-8"))


# What .NET's StreamReader recognises, in the order it checks: four bytes
# FF FE 00 00 are UTF-32 LE, not UTF-16 LE followed by a NUL.
_BYTE_ORDER_MARKS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_BOM_LOOKAHEAD = 4


class _TextToUtf8:
    """
    Bytes in any encoding StreamReader detects, to UTF-8, incrementally.
    """

    def __init__(self) -> None:
        self._head = b""
        self._decoder: codecs.IncrementalDecoder | None = None

    def _start(self) -> bytes:
        head, self._head = self._head, b""
        encoding = "utf-8"
        for bom, name in _BYTE_ORDER_MARKS:
            if head.startswith(bom):
                encoding, head = name, head[len(bom):]
                break
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        return head

    def feed(self, data: bytes, final: bool = False) -> bytes:
        if self._decoder is None:
            self._head += data
            if len(self._head) < _BOM_LOOKAHEAD and not final:
                return b""
            data = self._start()
        assert self._decoder is not None
        # Undecodable bytes are U+FFFD already, so this cannot fail.
        return self._decoder.decode(data, final).encode("utf-8")


class _Encryptor:
    """
    UTF-8 plaintext to AES-128-CBC with PKCS#7 padding, incrementally.
    """

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._cipher: CipherContext = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        self._padder = padding.PKCS7(BLOCK_BYTES * 8).padder()

    def feed(self, data: bytes) -> bytes:
        return self._cipher.update(self._padder.update(data))

    def finish(self) -> bytes:
        return self._cipher.update(self._padder.finalize()) + self._cipher.finalize()


class EncryptingReader:
    """
    A readable file of the encrypted form of C{source}'s text: hand it to
    whatever copies a file in chunks.

    @param iv: fixed only by tests; Tentacle draws a fresh one each time.
    """

    def __init__(
        self,
        source: IO[bytes],
        password: str,
        iv: bytes | None = None,
        chunk: int = 65536,
    ) -> None:
        iv = os.urandom(BLOCK_BYTES) if iv is None else iv
        if len(iv) != BLOCK_BYTES:
            raise ValueError("the IV is 16 bytes")
        self._source = source
        self._chunk = chunk
        self._text = _TextToUtf8()
        self._encryptor = _Encryptor(derive_key(password), iv)
        self._ready = IV_PREFIX + iv
        self._done = False

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._ready]
            self._ready = b""
            while not self._done:
                parts.append(self._produce())
            return b"".join(parts)
        while len(self._ready) < size and not self._done:
            self._ready += self._produce()
        out, self._ready = self._ready[:size], self._ready[size:]
        return out

    def _produce(self) -> bytes:
        data = self._source.read(self._chunk)
        if data:
            return self._encryptor.feed(self._text.feed(data))
        self._done = True
        return self._encryptor.feed(self._text.feed(b"", final=True)) + self._encryptor.finish()


def encrypt(plaintext: bytes, password: str, iv: bytes | None = None) -> bytes:
    """
    The whole file Tentacle writes for C{plaintext}, at once.
    """
    return EncryptingReader(io.BytesIO(plaintext), password, iv).read()


def decrypt(data: bytes, password: str) -> str:
    """
    The text of an encrypted file, as C{AesEncryption.Decrypt} returns it.

    @raise DecryptionError: not an encrypted file, or the wrong password.
    """
    if len(data) < HEADER_BYTES + BLOCK_BYTES or (len(data) - HEADER_BYTES) % BLOCK_BYTES:
        raise DecryptionError("this is not an encrypted file (wrong length)")
    if not data.startswith(IV_PREFIX):
        raise DecryptionError("this is not an encrypted file (no IV__ header)")
    iv = data[len(IV_PREFIX):HEADER_BYTES]
    decryptor = Cipher(algorithms.AES(derive_key(password)), modes.CBC(iv)).decryptor()
    padded = decryptor.update(data[HEADER_BYTES:]) + decryptor.finalize()
    unpadder = padding.PKCS7(BLOCK_BYTES * 8).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionError("the password is wrong, or the file is damaged") from None
    # StreamReader(stream, Encoding.UTF8): a BOM would be consumed.
    return plain.decode("utf-8", "replace").removeprefix("\ufeff")


def is_encrypted(data: bytes) -> bool:
    """
    Whether C{data} starts like an encrypted file (no JSON or script does).
    """
    return data.startswith(IV_PREFIX)


def new_password() -> str:
    """
    A fresh password for one call's files: 192 random bits, URL-safe text.
    """
    return secrets.token_urlsafe(24)


def password_prelude(password: str) -> str:
    """
    The bash line a script body starts with so the script, and only its
    processes, can decrypt its files: C{export TENTACLE_FILES_PASSWORD=...}.
    """
    return f"export {PASSWORD_VARIABLE}={shlex.quote(password)}\n"


def main(argv: list[str] | None = None) -> int:
    """
    C{python -m tentacle.encryption FILE}: print the text of a file the
    agent stored encrypted, with the password in C{$TENTACLE_FILES_PASSWORD}.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tentacle.encryption FILE", file=sys.stderr)
        return 2
    password = os.environ.get(PASSWORD_VARIABLE)
    if password is None:
        print(f"error: ${PASSWORD_VARIABLE} is not set", file=sys.stderr)
        return 1
    try:
        with open(args[0], "rb") as f:
            text = decrypt(f.read(), password)
    except (OSError, DecryptionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
