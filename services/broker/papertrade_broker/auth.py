"""API keys: generation, salted scrypt hashes, and a verified-key cache so a request costs no scrypt."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

_KEY_ALPHABET = string.ascii_uppercase + string.digits
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1


def new_key_pair() -> tuple[str, str]:
    """(key id, secret): Alpaca-like, `PK` + 18 characters and a 40-character secret."""
    key_id = "PK" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(18))
    secret = secrets.token_urlsafe(30)[:40]
    return key_id, secret


def hash_secret(secret: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    """(salt, scrypt hash) of a secret."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return salt, digest


def verify_secret(secret: str, salt: bytes, expected: bytes) -> bool:
    _, digest = hash_secret(secret, salt)
    return hmac.compare_digest(digest, expected)


def fingerprint(key_id: str, secret: str) -> bytes:
    """A fast digest of a presented key pair, for the cache of pairs already verified by scrypt."""
    return hashlib.sha256(key_id.encode() + b"\0" + secret.encode()).digest()
