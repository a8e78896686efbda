"""API keys in the task store's database: create (the secret is shown once), verify, list, revoke.

Only a secret's SHA-256 is stored; ``verify_key`` looks a key up by that hash.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from imagegenx.storage.database import EngineStore
from imagegenx.storage.schema import api_keys_table
from imagegenx.types import ApiKey, Tier

__all__ = ["KEY_PREFIX", "ApiKeyStore"]

KEY_PREFIX = "igx_"

_k = api_keys_table.c


class ApiKeyStore(EngineStore):
    """The API-key operations of the store (``TaskStore`` adds the tasks)."""

    def create_key(
        self, name: str, tier: Tier, rate_limit_per_s: float, queue_quota: int
    ) -> tuple[ApiKey, str]:
        """A new key and its secret ``igx_<key_id>_<32 random chars>``. The secret is shown this once:
        only its SHA-256 is stored.
        """
        key = ApiKey(
            key_id=secrets.token_hex(8),
            name=name,
            tier=Tier(tier),
            rate_limit_per_s=float(rate_limit_per_s),
            queue_quota=int(queue_quota),
            created_at=time.time(),
        )
        secret = f"{KEY_PREFIX}{key.key_id}_{secrets.token_urlsafe(24)}"  # 24 bytes → 32 chars
        row = {
            "key_id": key.key_id,
            "name": key.name,
            "secret_hash": _hash_secret(secret),
            "tier": key.tier.value,
            "rate_limit_per_s": key.rate_limit_per_s,
            "queue_quota": key.queue_quota,
            "created_at": key.created_at,
            "revoked_at": None,
        }
        with self._tx() as conn:
            conn.execute(sa.insert(api_keys_table), row)
        return key, secret

    def verify_key(self, secret: str) -> ApiKey | None:
        """The key a secret belongs to, or None if unknown or revoked. Looks up by hash."""
        if not secret.startswith(KEY_PREFIX):
            return None
        stmt = sa.select(api_keys_table).where(
            _k.secret_hash == _hash_secret(secret), _k.revoked_at.is_(None)
        )
        with self._tx(read_only=True) as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else _api_key(row)

    def list_keys(self) -> list[ApiKey]:
        """All keys, revoked ones included, oldest first."""
        stmt = sa.select(api_keys_table).order_by(_k.created_at, _k.key_id)
        with self._tx(read_only=True) as conn:
            return [_api_key(r) for r in conn.execute(stmt).mappings()]

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; False if it does not exist or was revoked already."""
        now = time.time()
        stmt = (
            sa.update(api_keys_table)
            .where(_k.key_id == key_id, _k.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        return self._changed(stmt)


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _api_key(row: Mapping[str, Any]) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        name=row["name"],
        tier=Tier(row["tier"]),
        rate_limit_per_s=row["rate_limit_per_s"],
        queue_quota=row["queue_quota"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
