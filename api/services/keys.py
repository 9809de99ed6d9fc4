"""Organizations and their API keys: creation (for the CLI), revocation, and resolving a presented key.

Keys are random and long, so an unsalted sha256 is enough; only the hash is stored and the plaintext is
shown once. Lookup is by hash, and the final comparison is constant-time. A presented key is looked up on
every request, never cached, so a revoked key stops working at once; only the default organization's id
(requests without a key) is remembered, as organizations are never renamed or deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core.errors import Unauthorized
from api.core.ids import new_id
from api.core.tables import ApiKey, Organization, now

KEY_PREFIX = "sk-svfit-"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def get_or_create_organization(session: Session, name: str) -> Organization:
    """The organization called `name`, created on first use. Safe against a concurrent creator."""
    org = session.scalar(select(Organization).where(Organization.name == name))
    if org is not None:
        return org
    org = Organization(id=new_id("org"), name=name)
    session.add(org)
    try:
        session.commit()
        return org
    except IntegrityError:
        # Another request created it between our select and insert (names are unique).
        session.rollback()
        return session.scalars(select(Organization).where(Organization.name == name)).one()


def create_api_key(session: Session, org_name: str) -> tuple[str, str]:
    """A new key for organization `org_name` (created if needed): (org_id, plaintext key)."""
    org = get_or_create_organization(session, org_name)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), org_id=org.id, key_hash=hash_key(plaintext), prefix=plaintext[:16]))
    session.commit()
    return org.id, plaintext


def revoke_api_key(session: Session, key: str) -> bool:
    """Revoke a key given its id (`key-…`) or its plaintext. False when no live key matched."""
    condition = ApiKey.id == key if key.startswith("key-") else ApiKey.key_hash == hash_key(key)
    api_key = session.scalar(select(ApiKey).where(condition, ApiKey.revoked_at.is_(None)))
    if api_key is None:
        return False
    api_key.revoked_at = now()
    session.commit()
    return True


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: an organization, and the key it presented (None: no key, auth off)."""

    org_id: str
    key_id: str | None = None

    @property
    def rate_limit_key(self) -> str:
        """Limits are per key; requests without one share their organization's buckets."""
        return self.key_id or self.org_id


def usable_key(presented_key: str | None, *, auth_required: bool) -> str | None:
    """The key to check, or None: the request acts as the default organization.

    No key: the default organization when auth is off (loopback), else 401. With auth off, a placeholder
    that is not one of ours (the `openai` client insists on *some* key, e.g. "local") also means no key;
    a key with our prefix is always checked, so a mistyped real key fails loudly instead of silently
    landing in the default organization.
    """
    if presented_key and not auth_required and not presented_key.startswith(KEY_PREFIX):
        presented_key = None
    if not presented_key:
        if auth_required:
            raise Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "(create one with `svfit keys create --org NAME`)."
            )
        return None
    return presented_key


def authenticate(session: Session, presented_key: str) -> Principal:
    """The organization and key that `presented_key` (a key `usable_key` let through) acts as, or 401."""
    presented_hash = hash_key(presented_key)
    api_key = session.execute(
        select(ApiKey.id, ApiKey.org_id, ApiKey.key_hash)
        .where(ApiKey.key_hash == presented_hash, ApiKey.revoked_at.is_(None))
    ).first()
    if api_key is None or not hmac.compare_digest(api_key.key_hash, presented_hash):
        raise Unauthorized("Incorrect API key provided.")
    return Principal(api_key.org_id, api_key.id)


class DefaultOrganization:
    """The organization that requests without a key act as, created on first use and then remembered.

    Organizations are never renamed or deleted, so the id cannot go stale, and a request without a key
    (the loopback default) pays no query for it after the first.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.known_id: str | None = None

    def resolve(self, session: Session) -> str:
        if self.known_id is None:
            self.known_id = get_or_create_organization(session, self.name).id
        return self.known_id
