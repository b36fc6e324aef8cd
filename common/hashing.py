"""Hash types, hash-sum normalisation and hashing while bytes stream."""
from __future__ import annotations

import hashlib
import string
from typing import BinaryIO, Callable

from common.errors import BadRequest

# Names clients may send; all are in hashlib on every platform.
HASH_TYPES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512",
              "sha3_256", "sha3_512", "blake2b", "blake2s")
DEFAULT_HASH_TYPE = "sha1"
_HEX = frozenset(string.hexdigits)
CHUNK_SIZE = 1024 * 1024


def normalise_hashtype(hashtype: object) -> str:
    """Lower-case a hash type name and check it is one we support (``unsupported_hashtype``)."""
    name = str(hashtype or "").strip().lower().replace("-", "_")
    if name == "sha3-256":
        name = "sha3_256"
    if name not in HASH_TYPES:
        raise BadRequest(f"hash type {hashtype!r} is not supported (use one of {', '.join(HASH_TYPES)})",
                         code="unsupported_hashtype")
    return name


def normalise_hashsum(hashsum: object, hashtype: str | None = None) -> str:
    """Strip an optional ``type:`` prefix and lower-case; non-hex gives ``invalid_hashsum``."""
    text = str(hashsum or "").strip()
    prefix, sep, rest = text.partition(":")
    if sep and (hashtype is None or prefix.strip().lower().replace("-", "_") == hashtype):
        text = rest.strip()
    if not text or not set(text) <= _HEX:
        raise BadRequest(f"hash sum {str(hashsum)[:80]!r} is not hexadecimal", code="invalid_hashsum")
    return text.lower()


def new_hasher(hashtype: str):
    return hashlib.new(normalise_hashtype(hashtype))


# Hex digits of a digest per hash type. The archive computes each type's full digest
# (blake2 at its default size too), so a shorter sum could never match: every caller
# demands exactly this length.
HEX_LENGTHS = {name: hashlib.new(name).digest_size * 2 for name in HASH_TYPES}


def check_digest_length(hashtype: str, hashsum: str) -> None:
    """BadRequest ``invalid_hashsum`` unless ``hashsum`` has the length a ``hashtype`` digest has."""
    expected = HEX_LENGTHS[normalise_hashtype(hashtype)]
    if len(hashsum) != expected:
        raise BadRequest(f"a {hashtype} sum has {expected} hex digits, not {len(hashsum)}", code="invalid_hashsum")


class HashingReader:
    """File-like wrapper that counts (and, given a hash type, hashes) every byte read through it.

    Given a ``length`` it reports ``len()`` so ``requests`` sends a Content-Length
    and streams the body instead of loading it, and it never reads past that many bytes
    (a slice of a larger file reads as a body of its own).
    """

    def __init__(self, raw: BinaryIO, hashtype: str | None = None, length: int | None = None,
                 on_read: Callable[[int], None] | None = None):
        self._raw = raw
        self.hasher = new_hasher(hashtype) if hashtype else None
        self.length = length
        self.bytes_read = 0
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        size = size if size and size > 0 else CHUNK_SIZE
        if self.length is not None:
            size = min(size, self.length - self.bytes_read)
            if size <= 0:
                return b""
        data = self._raw.read(size)
        if data:
            if self.hasher is not None:
                self.hasher.update(data)
            self.bytes_read += len(data)
            if self._on_read:
                self._on_read(len(data))
        return data

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("length unknown")
        return self.length

    def __iter__(self):
        while True:
            chunk = self.read(CHUNK_SIZE)
            if not chunk:
                return
            yield chunk

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def hash_file(path, hashtype: str = DEFAULT_HASH_TYPE) -> str:
    hasher = new_hasher(hashtype)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
            hasher.update(chunk)
    return hasher.hexdigest()
