"""Defect regions from a map: the threshold from good maps, the patches above it."""

import numpy as np

from workers.differnet.regions import MAX_REGIONS, find_regions, region_threshold


def test_regions_are_the_patches_above_the_threshold_strongest_first():
    rng = np.random.default_rng(0)
    good = [rng.normal(1.0, 0.1, (40, 60)) for _ in range(5)]
    threshold = region_threshold(good)
    assert 1.2 < threshold < 1.5  # about 3 sigma: 0.1 % of good pixels above
    view = rng.normal(1.0, 0.1, (40, 60))
    view[5:9, 10:16] = 3.0
    view[30:32, 40:43] = 2.5  # above the threshold and half-way to the peak
    first, second = find_regions(view, threshold)
    assert (first.x, first.y, first.w, first.h, first.area, first.peak) == (10, 5, 6, 4, 24, 3.0)
    assert (second.x, second.y, second.w, second.h, second.area) == (40, 30, 3, 2, 6)
    # Above the good pixels, but low against this view's peak: not where its defect is.
    view[20, 20] = 1.9
    assert len(find_regions(view, threshold)) == 2
    # A good view has none; a map lit in many places reports the strongest few.
    assert find_regions(good[0], max(threshold, good[0].max() + 1e-6)) == []
    speckled = np.zeros((40, 60))
    speckled[::4, ::4] = np.arange(150).reshape(10, 15)
    regions = find_regions(speckled, 1.0)
    assert len(regions) == MAX_REGIONS
    assert [r.peak for r in regions] == sorted((r.peak for r in regions), reverse=True)


def test_a_regions_outline_follows_its_shape_in_a_few_corners():
    import cv2

    from workers.differnet.regions import MAX_OUTLINE_POINTS

    view = np.zeros((120, 160))
    # A thin crack that wanders across the view: its box is mostly empty, its outline is not.
    xs = np.arange(10, 150)
    ys = (60 + 30 * np.sin(xs / 12)).astype(int)
    for dx in range(-1, 2):
        view[ys + dx, xs] = 2.0
    (crack,) = find_regions(view, 1.0)
    assert 3 <= len(crack.outline) <= MAX_OUTLINE_POINTS
    polygon = np.array(crack.outline, np.float32)
    inside = [
        cv2.pointPolygonTest(polygon, (float(x), float(y)), True)
        for x, y in zip(xs, ys, strict=True)
    ]
    assert min(inside) >= -2.5  # every crack pixel on or within 2.5 px of the outline
    filled = np.zeros_like(view, np.uint8)
    cv2.fillPoly(filled, [polygon.astype(np.int32)], 1)
    assert filled.sum() < 0.3 * crack.w * crack.h  # the polygon, not the box


def test_annotated_videos_draw_a_products_regions_where_it_goes(tmp_path):
    from tests.synthetic import LINE_FRAME, one_camera_video
    from workers.frontend.detect import read_frames
    from workers.simulation.annotate import annotate_video

    video = one_camera_video(tmp_path, products=2)
    width, height = LINE_FRAME["width"], LINE_FRAME["height"]
    x, y = width // 2 - 6, height // 2 - 6  # where product 0 was captured
    region = [(x, y), (x + 12, y), (x + 12, y + 12), (x, y + 12)]
    out = tmp_path / "annotated.mp4"
    decisions = {0: "defect", 1: "good"}

    def magenta(frame):
        b, g, r = (frame[:, :, i].astype(int) for i in range(3))
        return (b > 180) & (r > 180) & (g < 100)

    assert annotate_video(video, out, decisions, regions={0: [region]}) > 0
    drawn = [np.flatnonzero(magenta(f).any(0)) for _, f in read_frames(out)]
    marked = [cols for cols in drawn if len(cols)]
    assert marked, "no region drawn"
    # Drawn in the frames where product 0 is seen, moving with it along the belt.
    assert len({int(cols.min()) for cols in marked}) > 3
    plain = tmp_path / "plain.mp4"
    annotate_video(video, plain, decisions)
    assert not any(magenta(f).any() for _, f in read_frames(plain))
