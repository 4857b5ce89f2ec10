"""The settings reference (docs/configuration.md), written from the settings models themselves,
so that it cannot drift from the code (tests/test_docs.py checks it is current)."""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from cluster.runtime.settings import (
    CameraConfig,
    LineConfig,
    ReplicaConfig,
    ResourceConfig,
    RetrainConfig,
    SampleConfig,
    Settings,
)

# (model, where it sits in the YAML file), in the order a reader meets them.
SECTIONS: list[tuple[type[BaseModel], str]] = [
    (Settings, "top level"),
    (LineConfig, "`lines[]`"),
    (CameraConfig, "`lines[].cameras[]`"),
    (ReplicaConfig, "`lines[].replicas`"),
    (RetrainConfig, "`lines[].retrain`"),
    (ResourceConfig, "`lines[].resources`"),
    (SampleConfig, "`samples`"),
]

INTRO = """# Configuration reference

Generated from the settings models (`cluster/runtime/settings.py`) by
`defectflow config-reference --out docs/configuration.md`; `tests/test_docs.py` fails when it is
stale. How to use them: a YAML line file (`defectflow run --config FILE`), and `DEFECTFLOW_*`
environment variables, which win over the file (nested fields with `__`, for example
`DEFECTFLOW_SAMPLES__MAX_AGE_H=48`). A wrong value is refused at start with the file and the
field. Examples: `deploy/lines/example.yaml` (the demo's line) and `deploy/lines/factory.yaml`
(two production lines).
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        optional = type(None) in typing.get_args(annotation)
        return " \\| ".join(names) + (" \\| null" if optional else "")
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation)).replace("SecretStr", "secret")


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return ""
    value = field.default
    return f"`{json.dumps(value if isinstance(value, int | float | str | bool) else str(value))}`"


def _limits(field: FieldInfo) -> str:
    bounds = []
    for meta in field.metadata:
        for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, name, None) is not None:
                bounds.append(f"{sign} {getattr(meta, name)}")
    return f" ({', '.join(bounds)})" if bounds else ""


def render() -> str:
    out = [INTRO]
    for model, where in SECTIONS:
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        out.append(f"\n## {where}\n")
        if doc and model is not Settings:
            out.append(f"\n{doc}\n")
        out.append("\n| setting | type | default | what |\n|---|---|---|---|\n")
        for name, field in model.model_fields.items():
            env = f" (`DEFECTFLOW_{name.upper()}`)" if model is Settings else ""
            what = (field.description or "").replace("\n", " ") + _limits(field)
            out.append(
                f"| `{name}`{env} | {_type_name(field.annotation)} | {_default(field)} | {what} |\n"
            )
    return "".join(out)
