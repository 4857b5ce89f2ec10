import json

import jsonschema
import pytest
from hypothesis import given, settings

from schemas import STREAM_MESSAGES, CameraFrame, SchemaError, Verdict
from tests.messages import any_message, frame


@settings(max_examples=300, deadline=None)
@given(any_message)
def test_every_message_round_trips_through_a_stream_entry(message):
    entry = message.to_entry()
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in entry.items())
    assert type(message).from_entry(entry) == message


@settings(max_examples=100, deadline=None)
@given(any_message)
def test_meta_validates_against_the_exported_json_schema(message):
    meta = json.loads(message.to_entry()[b"meta"])
    jsonschema.validate(meta, type(message).entry_json_schema())


def test_round_trip_through_real_redis(bus, redis_client):
    message = frame(7)
    bus.publish("s", message)
    [(_, fields)] = redis_client.xrange("s")
    assert CameraFrame.from_entry(fields) == message


def test_image_bytes_travel_raw_not_in_json():
    entry = frame(3).to_entry()
    assert entry[b"image"] == bytes([3] * 4)
    assert "image" not in json.loads(entry[b"meta"])


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda e: e.pop(b"meta"), "meta"),
        (lambda e: e.update({b"meta": b"{not json"}), "meta"),
        (lambda e: e.update({b"meta": b"[1, 2]"}), "meta"),
        (lambda e: e.update({b"v": b"99"}), "v"),
        (lambda e: e.update({b"kind": b"verdict"}), "kind"),
        (lambda e: e.pop(b"image"), "image"),
        (lambda e: e.update({b"image": b"\x00"}), "<message>"),  # raw size no longer matches shape
        (lambda e: e.update({b"surprise": b"1"}), "surprise"),
        (
            lambda e: e.update({b"meta": e[b"meta"].replace(b'"sequence":0', b'"sequence":-1')}),
            "sequence",
        ),
        (
            lambda e: e.update({b"meta": e[b"meta"].replace(b'"camera":"cam0"', b'"camera":""')}),
            "camera",
        ),
    ],
)
def test_invalid_entries_raise_one_error_type_naming_the_field(mutate, field):
    entry = frame(0).to_entry()
    mutate(entry)
    with pytest.raises(SchemaError) as info:
        CameraFrame.from_entry(entry)
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    "change, error",
    [
        ({"decision": "maybe"}, "decision"),
        # The aggregator joins by line and number, QA finds products by id: they must agree.
        ({"product_id": "l:2"}, "product_id 'l:2' does not match line and product_seq"),
        # A number this large would make Redis allocate a huge bitmap of decided products.
        ({"product_id": f"l:{2**32}", "product_seq": 2**32}, "product_seq"),
    ],
)
def test_build_reports_what_is_wrong(change, error):
    fields = dict(
        product_id="l:1",
        line="l",
        product_seq=1,
        decision="good",
        status="complete",
        views=[],
        captured_at=0,
        decided_at=0,
    )
    with pytest.raises(SchemaError, match=error):
        Verdict.build(**fields | change)


def test_non_finite_scores_are_rejected():
    with pytest.raises(SchemaError, match="score"):
        Verdict.build(
            product_id="l:1",
            line="l",
            product_seq=1,
            decision="good",
            status="complete",
            views=[
                {
                    "camera": "c",
                    "score": float("nan"),
                    "threshold": 1,
                    "is_defect": False,
                    "model_version": "m",
                }
            ],
            captured_at=0,
            decided_at=0,
        )


def test_every_kind_has_a_distinct_name_and_a_version():
    kinds = [m.kind for m in STREAM_MESSAGES]
    assert len(set(kinds)) == len(kinds)
    assert all(m.schema_version >= 1 for m in STREAM_MESSAGES)


def verdict_with(regions: list[dict]) -> Verdict:
    view = {"camera": "c", "score": 2.0, "threshold": 1, "is_defect": True, "model_version": "m"}
    return Verdict.build(
        product_id="l:1",
        line="l",
        product_seq=1,
        decision="defect",
        status="complete",
        views=[view | {"regions": regions}, view | {"camera": "d"}],
        captured_at=0,
        decided_at=0,
    )


def test_a_verdict_is_written_at_the_oldest_version_that_holds_its_regions():
    box = {"x": 3, "y": 4, "w": 5, "h": 6}
    region = {"box": box, "frame_box": box | {"x": 103}, "area": 20, "peak": 7.5}
    with_regions = verdict_with([region])
    entry = with_regions.to_entry()
    assert entry[b"v"] == b"2"
    jsonschema.validate(json.loads(entry[b"meta"]), Verdict.entry_json_schema())
    assert Verdict.from_entry(entry) == with_regions
    assert Verdict.from_entry(entry).views[0].regions[0].frame_box.x == 103
    # Without regions, the entry is what version 1 wrote: readers not yet upgraded read it.
    plain = verdict_with([]).to_entry()
    assert plain[b"v"] == b"1"
    v1_view = {"camera", "score", "threshold", "is_defect", "model_version"}
    assert all(set(v) == v1_view for v in json.loads(plain[b"meta"])["views"])
    assert Verdict.from_entry(plain) == verdict_with([])
    # A version 1 entry cannot hold regions; a version this reader does not know is refused.
    forged = entry | {b"v": b"1"}
    with pytest.raises(SchemaError) as info:
        Verdict.from_entry(forged)
    assert info.value.field == "views.0.regions"
    # Outlines make it version 3; a version 2 entry cannot hold them.
    outline = [(3, 4), (8, 4), (8, 10)]
    outlined = verdict_with([region | {"outline": outline, "frame_outline": outline}])
    entry3 = outlined.to_entry()
    assert entry3[b"v"] == b"3"
    jsonschema.validate(json.loads(entry3[b"meta"]), Verdict.entry_json_schema())
    assert Verdict.from_entry(entry3) == outlined
    assert "outline" not in json.loads(entry[b"meta"])["views"][0]["regions"][0]
    with pytest.raises(SchemaError) as info:
        Verdict.from_entry(entry3 | {b"v": b"2"})
    assert info.value.field == "views.0.regions.0.outline"
    with pytest.raises(SchemaError, match="not one of 1, 2, 3"):
        Verdict.from_entry(entry | {b"v": b"4"})
