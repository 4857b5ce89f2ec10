"""The verdict join without Redis or Ray: one verdict per product, incomplete ones named, and
cameras whose product numbers fall out of step re-synchronised by capture time."""

import pytest

from schemas import NoProduct, ViewScore
from workers.line.join import VerdictJoin

CAMS = ["cam0", "cam1", "cam2", "cam3"]


def score(seq, camera, value=0.1, threshold=1.0, captured_at=None):
    return ViewScore(
        product_id=f"l:{seq}",
        line="l",
        camera=camera,
        product_seq=seq,
        captured_at=100.0 + seq if captured_at is None else captured_at,
        score=value,
        threshold=threshold,
        is_defect=value >= threshold,
        model_version="m",
    )


def verdicts(settled):
    return [s.verdict for s in settled if s.verdict is not None]


def test_a_product_is_defective_if_any_view_is_and_good_only_if_all_are_good():
    join = VerdictJoin("l", CAMS)
    assert [join.add(score(0, c), now=1.0) for c in CAMS[:3]] == [[], [], []]
    [good] = verdicts(join.add(score(0, "cam3"), now=1.0))
    assert good.decision == "good" and good.status == "complete" and len(good.views) == 4
    for c in CAMS[:3]:
        join.add(score(1, c), now=2.0)
    [bad] = verdicts(join.add(score(1, "cam3", value=5.0), now=2.0))
    assert bad.decision == "defect" and bad.product_id == "l:1"


def test_a_view_delivered_twice_counts_once_and_both_deliveries_come_back_with_the_verdict():
    join = VerdictJoin("l", CAMS)
    join.add(score(0, "cam0"), now=0, receipt="a")
    assert join.add(score(0, "cam0"), now=0, receipt="b") == []
    assert join.duplicates == 1 and join.pending_products == [0]
    for i, c in enumerate(CAMS[1:]):
        settled = join.add(score(0, c), now=0, receipt=i)
    [done] = settled
    assert len(done.verdict.views) == 4 and sorted(map(str, done.receipts)) == [
        "0",
        "1",
        "2",
        "a",
        "b",
    ]


def test_a_silent_camera_makes_an_incomplete_verdict_naming_it(caplog):
    join = VerdictJoin("l", CAMS, timeout_s=5)
    for c in CAMS[:3]:
        join.add(score(0, c), now=0)
    assert join.expire(now=4.9) == []
    [verdict] = verdicts(join.expire(now=5.0))
    assert verdict.status == "incomplete" and verdict.missing_cameras == ["cam3"]
    assert verdict.decision == "unknown" and "cam3" in verdict.reason
    assert "l: product 0 incomplete: no view from cam3 within 5 s" in caplog.text


def test_a_backlog_does_not_expire_products_but_a_skipped_product_does():
    join = VerdictJoin("l", CAMS, timeout_s=5, reorder_window=2)
    for c in CAMS[:3]:
        join.add(score(0, c), now=0)
    join.add(score(5, "cam3"), now=0.5)  # cam3 is alive, merely late for product 0 ...
    join.add(score(0, "cam3"), now=9.0)  # ... and its view comes: complete
    assert join.pending_products == [5]
    for c in CAMS[:3]:
        join.add(score(1, c), now=10)
    join.add(score(3, "cam3"), now=14)  # cam3 delivers later products, never product 1
    assert join.expire(now=14.9) == []
    by_seq = {v.product_seq: v for v in verdicts(join.expire(now=15.0))}
    assert by_seq[1].missing_cameras == ["cam3"]
    assert by_seq[5].missing_cameras == ["cam0", "cam1", "cam2"]  # silent since t = 10


def test_a_view_matching_no_product_in_time_is_left_out_and_named():
    # cam3's clock runs 0.5 s ahead: its views fall between the line's products (1 s apart).
    join = VerdictJoin("l", CAMS, max_spread_s=0.3)
    for c in CAMS[:3]:
        join.add(score(1, c, captured_at=101.0 + 0.1 * (c == "cam1")), now=0)
    # The product waits while cam3's view may still find its own product ...
    assert join.add(score(1, "cam3", value=5.0, captured_at=101.5), now=0) == []
    # ... and gives up once the other cameras have delivered what they captured after it.
    for c in CAMS[:2]:
        assert join.add(score(2, c), now=1) == []
    [verdict] = verdicts(join.add(score(2, "cam2"), now=1))
    assert verdict.product_seq == 1 and verdict.status == "incomplete"
    assert verdict.missing_cameras == ["cam3"]
    assert verdict.decision == "unknown"  # the defect cam3 saw is not this product's
    assert "cam3 out of step (+0.45 s)" in verdict.reason and join.out_of_step == 1
    assert join.resynchronised == {}
    assert verdict.latency_ms["camera_spread"] == pytest.approx(100.0)  # of the views kept
    # Without a tolerance the four views join, as before.
    join = VerdictJoin("l", CAMS)
    for c in CAMS[:3]:
        join.add(score(1, c, captured_at=101.0), now=0)
    assert verdicts(join.add(score(1, "cam3", captured_at=102.0), now=0))[0].status == "complete"


def run_line(join, cam3_views, products, order="capture"):
    """Feed ``products`` (seq -> capture time) from cam0-2 numbered by the line, and cam3's
    ``(its number, capture time, score)`` views; returns every verdict, by product."""
    feed = [(t, c, score(q, c, captured_at=t)) for q, t in products.items() for c in CAMS[:3]]
    feed += [(t, "cam3", score(n, "cam3", value=v, captured_at=t)) for n, t, v in cam3_views]
    if order == "capture":
        feed.sort(key=lambda f: f[0])
    else:  # cam3's scorer far ahead of the others'
        feed.sort(key=lambda f: (f[1] != "cam3", f[0]))
    settled = []
    for i, (_, _, view) in enumerate(feed):  # as the aggregator: each view, then the expired
        settled += join.add(view, now=i * 0.01, receipt=(view.camera, view.product_seq))
        settled += join.expire(now=i * 0.01)
    join.flushed = join.pending_products
    settled += join.expire(now=1000.0, flush=True)
    out = {}
    for v in verdicts(settled):
        assert v.product_seq not in out, "two verdicts for one product"
        out[v.product_seq] = v
    receipts = [r for s in settled for r in s.receipts]
    assert sorted(receipts) == sorted({(c, s.product_seq) for _, c, s in feed}), "acks"
    return out


@pytest.mark.parametrize("order", ["capture", "cam3 first"])
def test_a_camera_that_missed_a_product_is_re_synchronised_by_capture_time(order, caplog):
    # cam3 missed product 2: its "2" is the line's 3, and so on. It saw product 4's defect.
    products = {q: 100.0 + 1.7 * q for q in range(7)}
    cam3 = [(0, products[0], 0.1), (1, products[1], 0.1)]
    cam3 += [(q - 1, products[q], 5.0 if q == 4 else 0.1) for q in range(3, 7)]
    join = VerdictJoin("l", CAMS, max_spread_s=0.5)
    out = run_line(join, cam3, products, order)
    assert sorted(out) == list(range(7))
    assert out[2].status == "incomplete" and out[2].missing_cameras == ["cam3"]
    assert "cam3 did not see it" in out[2].reason
    assert join.flushed == []  # every verdict out as soon as its views were in: no timeout
    for q in (0, 1, 3, 4, 5, 6):
        assert out[q].status == "complete", out[q].reason
    assert [q for q, v in out.items() if v.decision == "defect"] == [4]
    assert join.resynchronised == {"cam3": 1} and join.line_seq("cam3", 5) == 6
    assert "cam3 re-synchronised by capture time: its product 2 is the line's 3 (+1)" in caplog.text


def test_a_join_restored_from_anothers_steps_numbers_the_cameras_as_it_did():
    products = {q: 100.0 + 1.7 * q for q in range(7)}
    cam3 = [(0, products[0], 0.1), (1, products[1], 0.1)]
    cam3 += [(q - 1, products[q], 0.1) for q in range(3, 7)]
    first = VerdictJoin("l", CAMS, max_spread_s=0.5)
    run_line(first, cam3, products)
    assert first.steps == {"cam3": [(2, 1)]}
    # As kept in Redis (JSON), with a camera the restarted line no longer has.
    kept = {"cam3": [[2, 1]], "cam9": [[0, 5]]}
    restarted = VerdictJoin("l", CAMS, max_spread_s=0.5)
    restarted.restore_steps(kept)
    assert restarted.steps == first.steps
    assert [restarted.line_seq("cam3", n) for n in (1, 2, 5)] == [1, 3, 6]
    assert restarted.line_seq("cam0", 5) == 5


def test_a_camera_that_saw_a_product_twice_is_re_synchronised_and_its_second_view_dropped():
    products = {q: 100.0 + 1.7 * q for q in range(6)}
    cam3 = [(0, products[0], 0.1), (1, products[1], 0.1), (2, products[2], 0.1)]
    cam3 += [(3, products[2] + 0.2, 5.0)]  # product 2 again (its defect: not another product's)
    cam3 += [(q + 1, products[q], 0.1) for q in range(3, 6)]
    join = VerdictJoin("l", CAMS, max_spread_s=0.5)
    out = run_line(join, cam3, products)
    assert sorted(out) == list(range(6))
    assert all(v.status == "complete" for v in out.values())
    assert [q for q, v in out.items() if v.decision == "defect"] == []
    assert join.resynchronised == {"cam3": 1} and join.duplicates == 1


def test_a_restarted_camera_numbering_anew_is_re_synchronised_by_capture_time():
    # cam3 restarts after product 2 and numbers from 50; it is back for product 5.
    products = {q: 100.0 + 1.7 * q for q in range(10)}
    cam3 = [(q, products[q], 0.1) for q in range(3)]
    cam3 += [(50 + q - 5, products[q], 5.0 if q == 8 else 0.1) for q in range(5, 10)]
    join = VerdictJoin("l", CAMS, max_spread_s=0.5)
    out = run_line(join, cam3, products)
    assert sorted(out) == list(range(10))
    assert [q for q, v in out.items() if v.status == "incomplete"] == [3, 4]
    assert [q for q, v in out.items() if v.decision == "defect"] == [8]
    assert join.line_seq("cam3", 53) == 8


def test_views_from_an_unknown_camera_are_counted_logged_and_dropped(caplog):
    join = VerdictJoin("l", CAMS)
    [dropped] = join.add(score(0, "cam9"), now=0, receipt="x")
    assert dropped.verdict is None and dropped.receipts == ["x"] and join.unknown_camera == 1
    assert "from camera cam9, not one of the line's" in caplog.text


def test_a_tolerance_not_under_half_the_time_between_products_is_warned_of(caplog):
    join = VerdictJoin("l", CAMS, max_spread_s=0.3)
    for q in range(33):  # products every 0.5 s: a view could be within 0.3 s of two
        for c in CAMS:
            join.add(score(q, c, captured_at=100.0 + 0.5 * q), now=q)
    warnings = [r.getMessage() for r in caplog.records if "max_camera_spread_s" in r.getMessage()]
    assert warnings == [
        "l: max_camera_spread_s 0.3 s is not under half the time between products (median "
        "0.50 s): a view may be joined to the wrong product"
    ]
    caplog.clear()
    join = VerdictJoin("l", CAMS, max_spread_s=0.3)
    for q in range(33):  # every 1.7 s: fine
        for c in CAMS:
            join.add(score(q, c, captured_at=100.0 + 1.7 * q), now=q)
    assert "max_camera_spread_s" not in caplog.text


def no_product(seq, camera):
    return NoProduct(line="l", camera=camera, product_seq=seq, captured_at=100.0 + seq)


def test_a_number_every_camera_saw_no_product_at_is_decided_without_a_verdict():
    join = VerdictJoin("l", CAMS)
    for c in CAMS[:3]:
        assert join.add(no_product(0, c), now=1.0, receipt=c) == []
    [settled] = join.add(no_product(0, "cam3"), now=1.0, receipt="cam3")
    assert settled.verdict is None and settled.no_product == 0
    assert sorted(settled.receipts) == CAMS  # every notice is acknowledged with it
    # A camera that saw a glove over a product it could not make out: the others' views judge.
    for c in CAMS[:3]:
        join.add(score(1, c), now=2.0)
    [half] = verdicts(join.add(no_product(1, "cam3"), now=2.0))
    assert half.status == "incomplete" and half.missing_cameras == ["cam3"]
    assert "cam3 saw no product there" in half.reason and half.decision == "unknown"
    # Some cameras said no product, the others never sent anything: given up on, no verdict.
    for c in CAMS[:2]:
        join.add(no_product(2, c), now=3.0)
    [given_up] = join.expire(now=3.0, flush=True)
    assert given_up.verdict is None and given_up.no_product == 2
    assert join.pending_products == []
