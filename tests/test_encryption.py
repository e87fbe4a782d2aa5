"""
Encrypted script files against two independent references: the bytes .NET
wrote under Mono (C{tests/vectors/encryption_vectors.json}, from
C{Rfc2898DeriveBytes} and C{Aes} as Tentacle's C{AesEncryption} uses them),
and OpenSSL's own PBKDF2 and AES-128-CBC.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tentacle.encryption import (
    IV_PREFIX,
    DecryptionError,
    EncryptingReader,
    decrypt,
    derive_key,
    encrypt,
)

VECTORS: list[dict[str, Any]] = json.loads(
    FilePath(__file__).sibling("vectors").child("encryption_vectors.json").getContent()
)
OPENSSL = shutil.which("openssl")


def b64(text: str) -> bytes:
    return base64.b64decode(text)


def expected_text(raw: bytes) -> str:
    """
    What StreamReader makes of the vectors' inputs (all valid in their
    encodings).
    """
    for bom, encoding in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if raw.startswith(bom):
            return raw[len(bom):].decode(encoding)
    return raw.decode("utf-8")


class DotNetVectorTests(SynchronousTestCase):
    def test_keys(self) -> None:
        for case in VECTORS:
            self.assertEqual(derive_key(case["password"]), b64(case["key"]), case["name"])

    def test_encrypted_bytes(self) -> None:
        for case in VECTORS:
            ours = encrypt(b64(case["input"]), case["password"], iv=b64(case["iv"]))
            self.assertEqual(ours, b64(case["output"]), case["name"])

    def test_any_chunking(self) -> None:
        """
        The stream is converted in pieces: where they split (inside a BOM,
        a UTF-8 sequence or a UTF-16 pair) changes nothing.
        """
        for case in VECTORS:
            for chunk in (1, 2, 3, 5):
                reader = EncryptingReader(
                    io.BytesIO(b64(case["input"])), case["password"], b64(case["iv"]), chunk=chunk
                )
                pieces = []
                while piece := reader.read(7):
                    pieces.append(piece)
                self.assertEqual(b"".join(pieces), b64(case["output"]), (case["name"], chunk))

    def test_decrypt(self) -> None:
        for case in VECTORS:
            self.assertEqual(
                decrypt(b64(case["output"]), case["password"]),
                expected_text(b64(case["input"])),
                case["name"],
            )


class OpenSSLTests(SynchronousTestCase):
    """
    The same construction, computed by OpenSSL from the description alone.
    """

    def setUp(self) -> None:
        if OPENSSL is None:
            self.skipTest("openssl is not installed")

    def openssl(self, *args: str, data: bytes = b"") -> bytes:
        assert OPENSSL is not None
        return subprocess.run([OPENSSL, *args], input=data, capture_output=True, check=True).stdout

    def test_key(self) -> None:
        for password in ("purple-monkey-dishwasher", "Pa\u00df w\u00f6rd \u2603", ""):
            out = self.openssl(
                "kdf", "-keylen", "16", "-kdfopt", "digest:SHA1",
                "-kdfopt", "hexpass:" + password.encode("utf-8").hex(),
                "-kdfopt", "salt:Octopuss", "-kdfopt", "iter:1000", "PBKDF2",
            )
            self.assertEqual(derive_key(password).hex(), out.decode().strip().replace(":", "").lower())

    def test_ciphertext(self) -> None:
        password = "s3cr3t"
        iv = bytes(range(16))
        plaintext = "line one\nzwei: \u00e9\u00e8 \u2603\n".encode() * 5000
        ours = encrypt(plaintext, password, iv=iv)
        self.assertEqual(ours[:4], IV_PREFIX)
        self.assertEqual(ours[4:20], iv)
        theirs = self.openssl(
            "enc", "-aes-128-cbc", "-K", derive_key(password).hex(), "-iv", iv.hex(), data=plaintext
        )
        self.assertEqual(ours[20:], theirs)


class DecryptErrorTests(SynchronousTestCase):
    def test_not_encrypted(self) -> None:
        self.assertRaises(DecryptionError, decrypt, b"{}", "p")
        self.assertRaises(DecryptionError, decrypt, b"XX__" + bytes(32), "p")
        self.assertRaises(DecryptionError, decrypt, IV_PREFIX + bytes(17), "p")

    def test_wrong_password(self) -> None:
        data = encrypt(b'{"secret": "value"}', "right", iv=bytes(16))
        self.assertRaises(DecryptionError, decrypt, data, "wrong")

    def test_fresh_iv_each_time(self) -> None:
        self.assertNotEqual(encrypt(b"x", "p"), encrypt(b"x", "p"))
