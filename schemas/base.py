"""The envelope every stream message shares, and its encoding as a flat Redis stream entry.

A stream entry is a flat map of byte strings. A message becomes:

    kind  -> the message's kind (``frame``, ``view``, ...)
    v     -> the schema version of that kind
    meta  -> every non-binary field, as JSON
    <f>   -> each binary field (an encoded image), raw

Nothing is pickled: a reader in any language needs only JSON and the JSON Schema that
``defectflow schemas`` writes.

Versions: a kind's schema version grows when it gains a field. A reader reads every version from
``oldest_version`` to its own, and a writer writes each message at the oldest version that holds
it (a message that leaves the new field empty is written as before), so that readers not yet
upgraded go on reading every message they can. A rolling upgrade upgrades readers first.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

KIND_FIELD = b"kind"
VERSION_FIELD = b"v"
META_FIELD = b"meta"


class SchemaError(ValueError):
    """A message or stream entry that does not match its schema.

    ``field`` names the offending field (dotted for nested ones), so the reason that lands in the
    dead-letter stream says exactly what was wrong.
    """

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _first_error(exc: ValidationError) -> SchemaError:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "<message>"
    return SchemaError(field, err["msg"])


class Part(BaseModel):
    """A strict, immutable model: unknown fields and non-finite floats are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Message(Part):
    """Base of every message that crosses a stream."""

    kind: ClassVar[str]
    schema_version: ClassVar[int] = 1
    oldest_version: ClassVar[int] = 1
    binary_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls, **fields: Any) -> Self:
        """Validate ``fields`` into a message, raising :class:`SchemaError` on the first bad one."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise _first_error(exc) from None

    def to_entry(self) -> dict[bytes, bytes]:
        meta = self.model_dump(mode="json", exclude=set(self.binary_fields))
        version = self.written_version(meta)
        entry = {
            KIND_FIELD: self.kind.encode(),
            VERSION_FIELD: str(version).encode(),
            META_FIELD: json.dumps(meta, separators=(",", ":"), allow_nan=False).encode(),
        }
        for name in self.binary_fields:
            entry[name.encode()] = getattr(self, name)
        return entry

    @classmethod
    def from_entry(cls, entry: dict[bytes, bytes] | dict[str, Any]) -> Self:
        """Decode a stream entry; any mismatch raises :class:`SchemaError` naming the field."""
        fields = {(k.encode() if isinstance(k, str) else k): v for k, v in entry.items()}
        kind = _text(fields, KIND_FIELD)
        if kind != cls.kind:
            raise SchemaError("kind", f"expected {cls.kind!r}, got {kind!r}")
        version = _text(fields, VERSION_FIELD)
        readable = [str(v) for v in range(cls.oldest_version, cls.schema_version + 1)]
        if version not in readable:
            raise SchemaError(
                "v", f"{cls.kind} schema version {version!r} is not one of {', '.join(readable)}"
            )
        try:
            meta = json.loads(_text(fields, META_FIELD))
        except json.JSONDecodeError as exc:
            raise SchemaError("meta", f"not JSON ({exc.msg})") from None
        if not isinstance(meta, dict):
            raise SchemaError("meta", "not a JSON object")
        cls.check_version(meta, int(version))
        for name in cls.binary_fields:
            if name in meta:
                raise SchemaError(name, "binary field found in meta")
            raw = fields.get(name.encode())
            if raw is None:
                raise SchemaError(name, "missing")
            meta[name] = raw if isinstance(raw, bytes) else str(raw).encode()
        unknown = (
            set(fields)
            - {KIND_FIELD, VERSION_FIELD, META_FIELD}
            - {n.encode() for n in cls.binary_fields}
        )
        if unknown:
            raise SchemaError(sorted(unknown)[0].decode(errors="replace"), "unexpected field")
        try:
            return cls.model_validate(meta)
        except ValidationError as exc:
            raise _first_error(exc) from None

    def written_version(self, meta: dict[str, Any]) -> int:
        """The oldest version that holds this message, ``meta`` cut down to it in place."""
        return self.schema_version

    @classmethod
    def check_version(cls, meta: dict[str, Any], version: int) -> None:
        """Raise :class:`SchemaError` where ``meta`` holds a field its ``version`` has not."""

    @classmethod
    def entry_json_schema(cls) -> dict[str, Any]:
        """JSON Schema of the ``meta`` field, annotated with the layout of the whole entry."""
        schema = cls.model_json_schema(mode="serialization")
        for name in cls.binary_fields:
            schema["properties"].pop(name, None)
            schema["required"] = [r for r in schema.get("required", []) if r != name]
        schema["x-stream-entry"] = {
            "kind": cls.kind,
            "v": str(cls.schema_version),
            "readable_versions": list(range(cls.oldest_version, cls.schema_version + 1)),
            "meta": "UTF-8 JSON object validated by this schema",
            "binary_fields": {n: "raw bytes, a separate stream field" for n in cls.binary_fields},
        }
        return schema


def _text(fields: dict[bytes, Any], name: bytes) -> str:
    raw = fields.get(name)
    if raw is None:
        raise SchemaError(name.decode(), "missing")
    if isinstance(raw, bytes):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise SchemaError(name.decode(), "not UTF-8") from None
    return str(raw)
