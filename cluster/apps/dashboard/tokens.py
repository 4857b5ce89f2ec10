"""Who may use the dashboard: named QA tokens.

A token file (YAML) lists one entry per person or station; only each token's sha256 is kept,
so a copy of the file lets nobody in. ``defectflow qa-token NAME --tokens FILE`` adds one and
prints its token, once::

    - name: alice
      sha256: 3f5c...            # of the token
      may_replace: true          # may overwrite a label QA already gave

A label's ``by`` is the name of the token that wrote it. With a token file, every read needs a
token too (crops and verdicts are the plant's data); without one, the dashboard makes a single
token for the session, for labelling, and serves reads on this machine only.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError


class TokenFileError(ValueError):
    """A token file that cannot be read; the message says why."""


@dataclass(frozen=True)
class Holder:
    name: str
    may_replace: bool


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    may_replace: bool = False


def _digest(token: str) -> str:
    # Any header text hashes (surrogates included): a strange token is refused, never a 500.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class QaTokens:
    """The tokens the dashboard accepts; ``guards_reads``: reads need one too."""

    def __init__(self, holders: dict[str, Holder], guards_reads: bool):
        self._by_digest = holders
        self.guards_reads = guards_reads

    @classmethod
    def load(cls, path: Path) -> QaTokens:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or []
            entries = [_Entry.model_validate(e) for e in raw]
        except OSError as exc:
            raise TokenFileError(f"{path}: {exc.strerror or exc}") from None
        except (yaml.YAMLError, ValidationError, TypeError) as exc:
            raise TokenFileError(f"{path}: not a token file ({exc})") from None
        if not entries:
            raise TokenFileError(f"{path}: no tokens")
        return cls({e.sha256: Holder(e.name, e.may_replace) for e in entries}, guards_reads=True)

    @classmethod
    def session(cls, name: str = "dashboard") -> tuple[QaTokens, str]:
        """One token for this session only (labelling, replacing too); reads stay open."""
        token = secrets.token_urlsafe(18)
        return cls({_digest(token): Holder(name, True)}, guards_reads=False), token

    def holder(self, token: str) -> Holder | None:
        return self._by_digest.get(_digest(token)) if token else None


def add_token(path: Path, name: str, may_replace: bool) -> str:
    """Add a new token for ``name`` to the file (created 0600), returning the token."""
    path = Path(path)
    entries = (yaml.safe_load(path.read_text()) or []) if path.exists() else []
    if any(e.get("name") == name for e in entries):
        raise TokenFileError(f"{path}: {name} has a token already")
    token = secrets.token_urlsafe(24)
    entries.append(_Entry(name=name, sha256=_digest(token), may_replace=may_replace).model_dump())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(entries, f, sort_keys=False)
    return token
