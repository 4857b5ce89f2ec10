"""Hypothesis strategies and small factories for the stream messages."""

from __future__ import annotations

import time

from hypothesis import strategies as st

from schemas import (
    BBox,
    CameraFrame,
    Label,
    ModelVersion,
    ProductView,
    Region,
    RetrainOutcome,
    RetrainRequest,
    Verdict,
    ViewResult,
    ViewScore,
    make_product_id,
)
from schemas.messages import MAX_PRODUCT_SEQ

names = st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True)
texts = st.text(min_size=1, max_size=40)
stamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
millis = st.dictionaries(names, st.floats(min_value=0, max_value=1e6), max_size=4)


@st.composite
def raw_images(draw):
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    c = draw(st.sampled_from([1, 3, 4]))
    return {
        "codec": "raw",
        "shape": (h, w, c),
        "image": draw(st.binary(min_size=h * w * c, max_size=h * w * c)),
    }


encoded_images = st.fixed_dictionaries(
    {
        "codec": st.sampled_from(["jpeg", "png"]),
        "shape": st.tuples(st.integers(1, 4000), st.integers(1, 4000), st.sampled_from([1, 3])),
        "image": st.binary(min_size=1, max_size=64),
    }
)
images = st.one_of(raw_images(), encoded_images)
# A product: its line, number and the id they make.
products = st.builds(
    lambda line, seq: {"line": line, "product_seq": seq, "product_id": make_product_id(line, seq)},
    names,
    st.integers(0, MAX_PRODUCT_SEQ - 1),
)
bboxes = st.builds(
    BBox,
    x=st.integers(0, 5000),
    y=st.integers(0, 5000),
    w=st.integers(1, 5000),
    h=st.integers(1, 5000),
)
outlines = st.none() | st.lists(
    st.tuples(st.integers(0, 5000), st.integers(0, 5000)), min_size=1, max_size=32
)
regions = st.lists(
    st.builds(
        Region,
        box=bboxes,
        frame_box=bboxes,
        area=st.integers(1, 10**6),
        peak=finite,
        outline=outlines,
        frame_outline=outlines,
    ),
    max_size=3,
)
view_results = st.builds(
    ViewResult,
    camera=names,
    score=finite,
    threshold=finite,
    is_defect=st.booleans(),
    model_version=texts,
    regions=regions,
)

frames = st.builds(
    lambda img, **kw: CameraFrame(**img, **kw),
    images,
    mask=st.binary(max_size=32),
    line=names,
    camera=names,
    sequence=st.integers(0, 2**53),
    product_seq=st.integers(0, MAX_PRODUCT_SEQ - 1),
    timestamp=stamps,
)
views = st.builds(
    lambda img, product, **kw: ProductView(**img, **product, **kw),
    images,
    products,
    camera=names,
    captured_at=stamps,
    bbox=bboxes,
    mask_coverage=st.floats(0, 1),
    mask_shrink=st.floats(0, 0.49),
    stage_ms=millis,
)
scores = st.builds(
    lambda product, **kw: ViewScore(**product, **kw),
    products,
    camera=names,
    captured_at=stamps,
    score=finite,
    threshold=finite,
    is_defect=st.booleans(),
    model_version=texts,
    defect_map_ref=st.none() | texts,
    regions=regions,
    stage_ms=millis,
)
verdicts = st.builds(
    lambda product, **kw: Verdict(**product, **kw),
    products,
    decision=st.sampled_from(["good", "defect", "unknown"]),
    status=st.sampled_from(["complete", "incomplete", "error"]),
    views=st.lists(view_results, max_size=4),
    missing_cameras=st.lists(names, max_size=4),
    reason=st.none() | texts,
    captured_at=stamps,
    decided_at=stamps,
    latency_ms=millis,
)
labels = st.builds(
    Label,
    line=names,
    product_id=texts,
    camera=st.none() | names,
    label=st.sampled_from(["good", "defect"]),
    by=texts,
    at=stamps,
    note=st.none() | st.text(max_size=100),
)
model_versions = st.builds(
    ModelVersion,
    id=texts,
    path=texts,
    sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    metrics=st.dictionaries(texts, finite, max_size=4),
    threshold=finite,
    created=stamps,
    status=st.sampled_from(["candidate", "active", "retired"]),
    parent=st.none() | texts,
)
retrain_requests = st.builds(RetrainRequest, line=names, by=texts, at=stamps)
retrain_outcomes = st.builds(
    RetrainOutcome,
    line=names,
    at=stamps,
    trigger=texts,
    outcome=st.sampled_from(["promoted", "candidate", "rejected", "not retrained"]),
    why=texts,
    candidate=st.none() | texts,
    parent=st.none() | texts,
    n_new_good_views=st.integers(0, 10_000),
    n_validation=st.integers(0, 10_000),
    candidate_metrics=st.dictionaries(texts, st.none() | finite, max_size=4),
    active_metrics=st.dictionaries(texts, st.none() | finite, max_size=4),
    retrain_seconds=st.none() | st.floats(min_value=0, max_value=1e6),
)
any_message = st.one_of(
    frames, views, scores, verdicts, labels, model_versions, retrain_requests, retrain_outcomes
)


def frame(sequence: int = 0, line: str = "line1", camera: str = "cam0") -> CameraFrame:
    return CameraFrame(
        line=line,
        camera=camera,
        sequence=sequence,
        product_seq=sequence,
        timestamp=time.time(),
        codec="raw",
        shape=(2, 2, 1),
        image=bytes([sequence % 256] * 4),
    )
