"""Object ids in OpenAI's style (`file-...`, `ftjob-...`) and API keys, which are stored only as hashes."""

from __future__ import annotations

import hashlib
import secrets
import string
import time

_ALPHABET = string.ascii_letters + string.digits
KEY_PREFIX = "tl-"


def new_id(prefix: str, n: int = 24) -> str:
    return f"{prefix}-{''.join(secrets.choice(_ALPHABET) for _ in range(n))}"


def now() -> float:
    return time.time()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # A plain SHA-256 is enough here (unlike passwords): keys carry 256 random bits, so they cannot be guessed from
    # the hash, and a deterministic hash lets a request find its key with one indexed lookup.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
