"""Counting products by tracking them: made-up detections, then a camera's recording of a short
scene where products touch and gloves ride through, with a detector that makes no mistakes."""

import cv2
import numpy as np
import pytest

from tests.synthetic import TruthDetector, touching_scene_line
from workers.frontend.detect import Detection, triggering_product
from workers.frontend.stages import CameraIngest
from workers.frontend.tracking import ProductTracks
from workers.simulation.simulate import camera_videos

WIDTH = 480


def _boxes(frame: int, products: list[tuple[float, int, float]]) -> list[tuple[int, int, int, int]]:
    """Each product's box on ``frame``: (left edge on frame 0, width, pixels per frame)."""
    return [(int(x0 + speed * frame), 100, w, 60) for x0, w, speed in products]


def _run(tracks: ProductTracks, frames: dict[int, list[Detection]]) -> dict[int, list]:
    """Frame -> the boxes counted on it."""
    counted = {}
    for index in sorted(frames):
        crossed = tracks.update(index, frames[index], WIDTH)
        if crossed:
            counted[index] = [d.bbox for _, d in crossed]
    return counted


def test_touching_products_moving_most_of_their_width_per_frame_count_apart():
    # Two small products nose to tail at 26 px per frame, each moving over two thirds of its
    # width between frames (their boxes on two frames hardly overlap), then a large one.
    products = [(-40.0, 38, 26.0), (-78.0, 38, 26.0), (-700.0, 180, 33.0)]
    frames = {
        f: [Detection(b, 0.9) for b in _boxes(f, products) if b[0] + b[2] > 0 and b[0] < WIDTH]
        for f in range(40)
    }
    counted = _run(ProductTracks(), frames)
    centres = {f: [x + w / 2 for x, _, w, _ in boxes] for f, boxes in counted.items()}
    assert len([c for cs in centres.values() for c in cs]) == 3
    # Each on the frame its centre first reached the centre line.
    for x0, w, speed in products:
        crossing = next(f for f in range(40) if x0 + speed * f + w / 2 >= WIDTH / 2)
        assert any(abs(c - (x0 + speed * crossing + w / 2)) < 1 for c in centres[crossing])


def test_noise_pieces_and_a_missed_frame_count_nothing_twice_and_nothing_false():
    product = [(-60.0, 120, 20.0)]
    frames = {}
    for f in range(40):
        (box,) = _boxes(f, product)
        # The detector misses it on the frame its centre reaches the line (frame 12).
        found = [] if f == 12 else [Detection(box, 0.9)]
        # A piece of it boxed too, mostly inside its box and less confident.
        found.append(Detection((box[0] + 10, box[1] + 5, 50, 40), 0.7))
        frames[f] = found
    # A weak box on a glove crossing the centre: it starts no track.
    for f in range(8, 20):
        frames[f].append(Detection((int(100 + 15 * f), 20, 30, 30), 0.4))
    # A confident box on one frame alone (the detector's noise): never confirmed.
    frames[12].append(Detection((235, 200, 30, 30), 0.95))
    counted = _run(ProductTracks(), frames)
    assert counted == {13: [_boxes(13, product)[0]]}


@pytest.fixture(scope="module")
def touching_line(tmp_path_factory):
    return touching_scene_line(tmp_path_factory.mktemp("touching-line"))


def test_tracking_counts_touching_products_apart_where_the_motion_gate_counts_them_once(
    touching_line,
):
    line_dir, manifest = touching_line
    video = str(camera_videos(line_dir)["cam0"])
    truth = TruthDetector(line_dir, manifest, "cam0")
    products = {
        tuple(b): p["seq"]
        for p in manifest["products"]
        for b in p["views"]["cam0"]["bboxes"].values()
    }

    def views(ingest: CameraIngest) -> tuple[list[int], int]:
        """Views per product, and views of things that are not products, each judged as the
        detect stage judges a gated frame (the product under the frame's mask nearest the
        centre line)."""
        seen, not_products = [0] * len(manifest["products"]), 0
        for frame in ingest.frames():
            bgr = cv2.imdecode(np.frombuffer(frame.image, np.uint8), cv2.IMREAD_COLOR)
            mask = cv2.imdecode(np.frombuffer(frame.mask, np.uint8), cv2.IMREAD_GRAYSCALE)
            product = triggering_product(truth.detect(bgr), mask)
            if product is None:
                not_products += 1
            else:
                seen[products[product.bbox]] += 1
        return seen, not_products

    by_blobs, on_things = views(CameraIngest("l", "cam0", video))
    by_tracks, none = views(CameraIngest("l", "cam0", video, tracker=truth))
    # The gate fired once for touching products and on the gloves and tools too.
    assert min(by_blobs) == 0 and on_things > 0, (by_blobs, on_things)
    assert by_tracks == [1] * len(by_tracks) and none == 0, by_tracks
