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
