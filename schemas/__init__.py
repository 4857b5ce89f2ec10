"""Contracts between the stages: pydantic messages and their Redis stream-entry encoding."""

from .base import Message, Part, SchemaError
from .messages import (
    STREAM_MESSAGES,
    BBox,
    CameraFrame,
    Label,
    ModelVersion,
    NoProduct,
    ProductView,
    Region,
    RegionDetail,
    RetrainOutcome,
    RetrainRequest,
    Verdict,
    ViewResult,
    ViewScore,
    make_product_id,
)

__all__ = [
    "STREAM_MESSAGES",
    "BBox",
    "CameraFrame",
    "Label",
    "Message",
    "ModelVersion",
    "NoProduct",
    "Part",
    "ProductView",
    "Region",
    "RegionDetail",
    "RetrainOutcome",
    "RetrainRequest",
    "SchemaError",
    "Verdict",
    "ViewResult",
    "ViewScore",
    "make_product_id",
]
