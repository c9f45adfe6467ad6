"""Browser sessions: random tokens kept in Redis with a TTL, revoked at /logout.

The cookie holds the token, never the API key. Redis holds only the token's sha256 (so a
look at Redis gives no usable cookie) and the sha256 of the key it was opened with, so that a
key removed from the configuration ends its sessions too:

    vitaudit:session:{sha256(token)}   sha256(api key), expiring after SESSION_TTL_S
"""

from __future__ import annotations

import hashlib
import secrets

from redis import Redis

from service.settings import Settings

SESSION_KEY = "vitaudit:session:{digest}"
# A working day and a night: a browser left signed in is signed out by the next morning.
SESSION_TTL_S = 12 * 3600
TOKEN_BYTES = 32  # 256 random bits; the cookie value is their unpadded base64url


def _key(token: str) -> str:
    return SESSION_KEY.format(digest=hashlib.sha256(token.encode()).hexdigest())


def open_session(redis: Redis, key_hash: str) -> str:
    """A new session token for the API key whose sha256 is ``key_hash``."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    redis.set(_key(token), key_hash, ex=SESSION_TTL_S)
    return token


def session_tenant(redis: Redis, token: str, settings: Settings) -> str | None:
    """The tenant of a live session, or None (unknown, expired or revoked token, or a key
    no longer configured)."""
    if not token or len(token) > 4 * TOKEN_BYTES:
        return None
    key_hash = redis.get(_key(token))
    return settings.api_key_hashes.get(key_hash.decode()) if key_hash else None


def revoke_session(redis: Redis, token: str) -> None:
    redis.delete(_key(token))
