"""The two secrets: the user-token key and the internal-call (Standard Webhooks) key.

Set them with `LEDGER_JWT_SECRET` and `LEDGER_INTERNAL_SECRET`. In
development, a missing one is generated once by the server and kept in
`<data dir>/dev-secrets.json` (mode 0600), so `usage-ledger token` and the
server agree across restarts; the CLI only reads that file (secrets it made
itself would be ones no server knows). Production refuses generated secrets
(see `Settings`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import Settings

DEV_SECRETS_FILE = "dev-secrets.json"
SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Secrets:
    jwt_secret: str
    internal_secret: str

    def __repr__(self) -> str:
        return "Secrets(<redacted>)"


def new_internal_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def new_jwt_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


class SecretsMissing(Exception):
    """No secret is configured and no server has generated development ones in this data dir."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


def resolve_secrets(settings: Settings, *, create: bool = True) -> Secrets:
    """The configured secrets, with the development ones for whatever is unset: generated unless
    `create` is False (then `SecretsMissing` if there are none yet). Blocking (file I/O)."""
    jwt_secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
    internal_secret = settings.internal_secret.get_secret_value() if settings.internal_secret else None
    if jwt_secret is not None and internal_secret is not None:
        return Secrets(jwt_secret=jwt_secret, internal_secret=internal_secret)
    assert settings.env != "production", "Settings refuses production without secrets"
    path = settings.data_dir / DEV_SECRETS_FILE
    stored = _load_or_create(path) if create else _read(path)
    if stored is None:
        raise SecretsMissing(path)
    return Secrets(
        jwt_secret=jwt_secret or stored["jwt_secret"],
        internal_secret=internal_secret or stored["internal_secret"],
    )


def _load_or_create(path: Path) -> dict[str, str]:
    existing = _read(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"jwt_secret": new_jwt_secret(), "internal_secret": new_internal_secret()}
    # Written to a private temp file, then linked into place: never world-readable,
    # never half-written, and when two processes race, both end up with the first one's.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        with contextlib.suppress(FileExistsError):  # another process won the race: use its secrets
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    stored = _read(path)
    assert stored is not None, f"{path} was just written"
    return stored


def _read(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or not {"jwt_secret", "internal_secret"} <= data.keys():
        raise ValueError(f"{path} is not a usage-ledger secrets file; move it away to regenerate")
    return {key: str(data[key]) for key in ("jwt_secret", "internal_secret")}
