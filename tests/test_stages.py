"""Stage logic without Redis or Ray: ingest from a folder, detect+matte."""

import http.server
import threading
import time

import cv2
import numpy as np
import pytest

from bench.chaos import png_claiming
from schemas import CameraFrame
from tests.synthetic import one_camera_video
from workers.contract import CropSpec
from workers.frontend import sources
from workers.frontend.sources import is_live, open_source
from workers.frontend.stages import CameraIngest, DetectMatte, NoProductFound
from workers.images import ImageError, decode_image, decode_with_alpha
from workers.simulation.simulate import LineSpec, Scene, belt_texture, render_camera


def _gated_frame(spec) -> CameraFrame:
    _, frame = next(render_camera(spec, Scene([]), 0))  # the empty belt
    frame[40:100, 60:160] = 200  # a bright product on the dark belt
    mask = np.zeros(frame.shape[:2], np.uint8)
    mask[40:100, 60:160] = 255
    ok, jpeg = cv2.imencode(".jpg", frame)
    ok, png = cv2.imencode(".png", mask)
    return CameraFrame(
        line="l",
        camera="cam0",
        sequence=3,
        product_seq=0,
        timestamp=1.0,
        codec="jpeg",
        shape=frame.shape,
        image=jpeg.tobytes(),
        mask=png.tobytes(),
    )


def test_detect_matte_crops_the_product_and_sends_the_mask_as_alpha():
    spec = LineSpec(products=1, width=240, height=160, lead_frames=1, gap_frames=0)
    view = DetectMatte(crops=CropSpec(mask_shrink=0.1)).process(_gated_frame(spec))
    assert abs(view.bbox.x - 55) <= 3 and abs(view.bbox.w - 110) <= 4
    rgb, alpha = decode_with_alpha(view.image)
    assert alpha is not None and rgb.shape[:2] == alpha.shape == view.shape[:2]
    assert 0.5 < view.mask_coverage < 0.7 and view.product_id == "l:0"
    assert set(view.stage_ms) == {"decode", "detect", "matte"}


def test_a_view_larger_than_the_cap_is_scaled_down_its_box_kept_in_frame_pixels():
    spec = LineSpec(products=1, width=240, height=160, lead_frames=1, gap_frames=0)
    full = DetectMatte(crops=CropSpec(mask_shrink=0.1)).process(_gated_frame(spec))
    capped = DetectMatte(crops=CropSpec(mask_shrink=0.1, view_max_side=48)).process(
        _gated_frame(spec)
    )
    assert capped.bbox == full.bbox and max(full.shape[:2]) > 48
    assert max(capped.shape[:2]) == 48
    assert abs(capped.shape[1] / capped.shape[0] - full.shape[1] / full.shape[0]) < 0.05
    rgb, alpha = decode_with_alpha(capped.image)
    assert rgb.shape[:2] == alpha.shape == capped.shape[:2]
    assert abs(capped.mask_coverage - full.mask_coverage) < 0.05


def test_detect_matte_refuses_corrupt_frames_and_empty_belts():
    spec = LineSpec(products=1, width=240, height=160, lead_frames=1, gap_frames=0)
    frame = _gated_frame(spec)
    with pytest.raises(ImageError):
        DetectMatte().process(frame.model_copy(update={"image": frame.image[:50]}))
    empty = np.zeros((160, 240), np.uint8)
    ok, png = cv2.imencode(".png", empty)
    with pytest.raises(NoProductFound):
        DetectMatte().process(frame.model_copy(update={"mask": png.tobytes()}))


def test_images_claiming_too_many_pixels_are_refused_from_their_header():
    spec = LineSpec(products=1, width=240, height=160, lead_frames=1, gap_frames=0)
    frame = _gated_frame(spec)
    started = time.perf_counter()
    with pytest.raises(ImageError, match="not a readable image"):  # Pillow's own bomb limit
        decode_image(png_claiming(30_000, 30_000), "bomb.png")
    with pytest.raises(ImageError, match="max_image_pixels"):
        decode_image(png_claiming(5_000, 5_000), "big.png", max_pixels=1_000_000)
    assert time.perf_counter() - started < 1.0  # nothing was decoded
    with pytest.raises(ImageError, match="240x160 pixels, more than the 10,000 allowed"):
        DetectMatte(max_pixels=10_000).process(frame)
    bomb_mask = frame.model_copy(update={"mask": png_claiming(30_000, 30_000)})
    with pytest.raises(ImageError, match="mask"):
        DetectMatte().process(bomb_mask)


def test_ingest_from_a_folder_skips_corrupt_frames_and_fires_once_per_product(tmp_path):
    spec = LineSpec(products=2, cameras=1, width=240, height=160, seed=2)
    from tests.synthetic import make_dataset
    from workers.datasets import list_train_samples
    from workers.simulation.simulate import plan_line

    data = make_dataset(tmp_path / "tiles", n_train=4, n_good=1, n_defect=1)
    scene = plan_line(list_train_samples(data), [], LineSpec(**{**spec.__dict__, "defect_rate": 0}))
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in render_camera(spec, scene, 0):
        cv2.imwrite(str(folder / f"{index:05d}.png"), frame)
    (folder / "00005.png").write_bytes(b"corrupt")
    ingest = CameraIngest("l", "cam0", str(folder))
    frames = list(ingest.frames())
    assert [f.product_seq for f in frames] == [0, 1]
    assert ingest.stats.corrupt_frames == 1 and all(f.mask for f in frames)
    assert belt_texture(spec, 0).shape[:2] == (160, 240)


@pytest.mark.parametrize("codec", ["mjpeg", "mp4v"])
def test_a_frame_stride_yields_every_nth_frame_of_a_video_as_decoded_in_full(tmp_path, codec):
    from workers.frontend.detect import read_frames

    video = one_camera_video(tmp_path, 2, codec)
    every = dict(read_frames(video))  # FFmpeg decodes every frame
    strided = list(open_source(str(video), stride=3))
    assert [f.index for f in strided] == list(range(0, len(every), 3))
    for f in strided:
        # MJPEG frames come as JPEG packets, decoded by OpenCV's libjpeg instead of FFmpeg.
        assert np.abs(f.image.astype(int) - every[f.index]).mean() < 1.0
        # ... and keep them, to be sent on as they are; other codecs have nothing to keep.
        assert (f.jpeg is not None) == (codec == "mjpeg")
        if f.jpeg is not None:
            assert np.array_equal(cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), 1), f.image)
    with pytest.raises(ValueError, match="stride"):
        open_source(str(video), stride=0)


def test_mjpeg_frames_decode_scaled_down_for_the_gate_and_keep_their_full_jpeg(tmp_path):
    video = one_camera_video(tmp_path, 2, "mjpeg")
    full = list(open_source(str(video)))
    reduced = list(open_source(str(video), max_width=100))
    assert len(reduced) == len(full)
    for f, r in zip(full, reduced, strict=True):
        assert f.shape == r.shape == (160, 240, 3)
        assert r.image.shape == (40, 60, 3)  # 240 / 4: the smallest factor to 100 px or less
        assert r.jpeg == f.jpeg  # the camera's frame travels on in full
        area = cv2.resize(f.image, (60, 40), interpolation=cv2.INTER_AREA)
        assert np.abs(r.image.astype(int) - area).mean() < 3.0


def test_the_packet_decoder_follows_a_change_of_resolution():
    from workers.frontend.sources import _PacketDecoder

    decoder = _PacketDecoder(max_width=50)
    for shape, expected in [((80, 120), (20, 30)), ((80, 120), (20, 30)), ((200, 400), (25, 50))]:
        ok, packet = cv2.imencode(".jpg", np.full(shape + (3,), 99, np.uint8))
        image, full = decoder.decode(packet)
        assert image.shape[:2] == expected and full == shape + (3,)
    assert decoder.decode(np.frombuffer(b"not a jpeg", np.uint8))[0] is None


def test_a_frame_stride_skips_image_files_without_reading_them(tmp_path):
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((40, 60, 3), 20 * i, np.uint8))
    (tmp_path / "001.png").write_bytes(b"corrupt, and skipped")
    frames = list(open_source(str(tmp_path), stride=2))
    assert [f.index for f in frames] == [0, 2, 4]
    assert [int(f.image[0, 0, 0]) for f in frames] == [0, 40, 80]


def test_a_gated_jpeg_frame_is_sent_on_as_the_camera_encoded_it(tmp_path):
    from tests.synthetic import make_dataset
    from workers.datasets import list_train_samples
    from workers.simulation.simulate import plan_line

    spec = LineSpec(products=2, cameras=1, defect_rate=0, width=240, height=160, seed=2)
    data = make_dataset(tmp_path / "tiles", n_train=4, n_good=1, n_defect=1)
    scene = plan_line(list_train_samples(data), [], spec)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in render_camera(spec, scene, 0):
        cv2.imwrite(str(folder / f"{index:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 97])
    frames = list(CameraIngest("l", "cam0", str(folder)).frames())
    assert [f.product_seq for f in frames] == [0, 1]
    for f in frames:  # no second, lossy encoding on the way
        assert f.image == (folder / f"{f.sequence:05d}.jpg").read_bytes()


def test_ingest_with_a_frame_stride_still_fires_once_per_product(tmp_path):
    video = one_camera_video(tmp_path, 6, "mjpeg")
    ingest = CameraIngest("l", "cam0", str(video), frame_stride=2)
    frames = list(ingest.frames())
    assert [f.product_seq for f in frames] == list(range(6))
    assert all(f.sequence % 2 == 0 for f in frames)
    # The gate saw quarter-size frames; what goes on is the camera's frame and a mask to match.
    for f in frames:
        mask = cv2.imdecode(np.frombuffer(f.mask, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert f.shape == (160, 240, 3) and mask.shape == (160, 240)
    recorded = cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT)
    assert ingest.stats.frames == -(-int(recorded) // 2)
    with pytest.raises(ValueError, match="frame_stride"):
        CameraIngest("l", "cam0", str(video), frame_stride=0)


def test_a_live_stream_that_drops_is_reopened_and_numbers_its_products_on(
    tmp_path, http_server, caplog
):
    video = one_camera_video(tmp_path, 2, "mjpeg")
    url = f"http://127.0.0.1:{http_server.server_port}/{video.relative_to(tmp_path)}"
    assert is_live(url) and not is_live(str(video)) and not is_live(f"file://{video}")
    ingest = CameraIngest("l", "cam0", url)
    stopping_at = [float("inf")]
    frames = ingest.frames(should_stop=lambda: time.monotonic() > stopping_at[0])
    products = [next(frames) for _ in range(6)]  # the recording's 2 products, 3 times over
    assert [f.product_seq for f in products] == list(range(6))
    sequences = [f.sequence for f in products]
    assert sequences == sorted(set(sequences))  # frames numbered on, not from 0 again
    assert ingest.stats.reconnects == 2
    assert "l: camera cam0 dropped (the stream ended): reopening in 0.5 s" in caplog.text
    # The server goes away: the camera keeps trying, and stops when told to.
    http_server.shutdown()
    http_server.server_close()
    stopping_at[0] = time.monotonic() + 2.0
    assert list(frames) == []
    assert time.monotonic() - stopping_at[0] < 0.5
    assert ingest.stats.reconnects >= 4 and "cannot open this source" in caplog.text


def test_a_live_stream_that_stalls_is_given_up_on_not_waited_for(monkeypatch):
    # A server that answers, sends four bytes and then nothing: FFmpeg alone waits for ever.
    class Stalling(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "video/x-msvideo")
            self.end_headers()
            self.wfile.write(b"RIFF")
            self.wfile.flush()
            time.sleep(10)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(sources, "LIVE_TIMEOUT_MS", 1000)
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot open"):
        open_source(f"http://127.0.0.1:{server.server_port}/belt.avi")
    assert time.monotonic() - start < 3
    server.shutdown()


def test_cameras_replayed_from_one_epoch_show_each_product_together(tmp_path):
    """Readers started 0.3 s apart deliver each product at the same moment: the later one reads
    on without pausing until it is back on the shared schedule."""
    import threading
    import time

    video = one_camera_video(tmp_path, 2, "mjpeg")
    fps, epoch = 100.0, time.time()
    delivered: dict[str, dict[int, float]] = {"early": {}, "late": {}}
    stamped: dict[str, dict[int, float]] = {"early": {}, "late": {}}
    due: dict[int, float] = {}

    def read(name: str, delay: float) -> None:
        time.sleep(delay)
        ingest = CameraIngest("l", name, str(video), fps=fps)
        for f in ingest.frames(replay_epoch=epoch):
            delivered[name][f.product_seq] = time.time()
            stamped[name][f.product_seq] = f.timestamp
            due[f.product_seq] = epoch + f.sequence / fps

    readers = [threading.Thread(target=read, args=a) for a in (("early", 0.0), ("late", 0.3))]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    assert sorted(delivered["early"]) == sorted(delivered["late"]) == [0, 1]
    for seq in (0, 1):
        assert abs(delivered["early"][seq] - delivered["late"][seq]) < 0.1
        # Never before the frame is due: the recording still plays at the camera's rate.
        assert min(delivered["early"][seq], delivered["late"][seq]) >= due[seq]
        # Each frame is stamped with when it was due (the line's clock), by either reader.
        assert stamped["early"][seq] == stamped["late"][seq] == pytest.approx(due[seq])


def test_sources_that_do_not_exist_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "nothing.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_source(str(tmp_path / "empty"))


def test_a_resolution_change_restarts_the_background_model_and_goes_on(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        size = (120, 160) if i < 3 else (90, 120)
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full(size + (3,), 80, np.uint8))
    ingest = CameraIngest("l", "cam0", str(folder))
    assert list(ingest.frames()) == []
    assert ingest.stats.frames == 6 and ingest.stats.resolution_changes == 1


def test_a_cameras_password_never_shows_in_an_error():
    assert (
        sources.shown("rtsp://admin:s3cret@10.0.0.5/stream1") == "rtsp://admin:***@10.0.0.5/stream1"
    )
    assert sources.shown("/videos/cam0.avi") == "/videos/cam0.avi"
    with pytest.raises(ValueError) as info:
        list(open_source("http://admin:s3cret@127.0.0.1:1/cam.mjpg"))
    assert "s3cret" not in str(info.value) and "admin:***@127.0.0.1" in str(info.value)
