"""The QA dashboard in a real headless Chromium, during a small `defectflow demo` run.

Needs Debian's `chromium` (`.ci/run` installs it); Playwright drives that binary, nothing is
downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from schemas import Label
from tests.conftest import PASSWORD

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# What a headless Chromium needs on a machine with no network and no display.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (.ci/run installs it)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"demo exited early with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (here: a token is needed)
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def _terminal_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_dashboard_shows_live_verdicts_and_labels_a_product(demo_run, protected_redis, tmp_path):
    """A second demo run, reusing the first's model, against a password-protected Redis named on
    the command line (its password in the settings' environment)."""
    from playwright.sync_api import expect, sync_playwright

    root, args, _ = demo_run
    out = tmp_path / "out"
    shutil.copytree(root / "demo-out" / "model", out / "model")
    server = protected_redis("redis")
    port = free_port()
    demo = [sys.executable, "-m", "cluster", *args[:3], "--out", str(out), "--products", "6"]
    demo += ["--redis", server.url, "--dashboard-port", str(port)]
    tokens = tmp_path / "qa-tokens.yaml"
    made = subprocess.run(
        [sys.executable, "-m", "cluster", "qa-token", "qa-browser", "--tokens", str(tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    token = made.stdout.strip()
    log = (tmp_path / "demo.log").open("w")
    process = subprocess.Popen(
        demo,
        env=os.environ
        | {"DEFECTFLOW_DASHBOARD_TOKENS": str(tokens), "DEFECTFLOW_REDIS_PASSWORD": PASSWORD},
        stdout=log,
        stderr=subprocess.STDOUT,
        # As from a terminal: after the suite's earlier tests (their local Ray clusters), the
        # child was seen never to take Ctrl-C: a signal disposition or mask inherited from
        # this process. The demo gets both as a shell gives them.
        preexec_fn=_terminal_signals,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/api/lines", process, timeout_s=240)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(base + "/")
            # With a token file, nothing is shown before the token is given.
            expect(page.locator("#feed-state")).to_have_text("enter your QA token")
            page.fill("#token", token)
            page.locator("#token").dispatch_event("change")
            # Verdicts arrive while the line runs (live feed) or are listed on load.
            expect(page.locator("#feed tr").first).to_be_visible(timeout=180_000)
            expect(page.locator("#line")).to_have_value("demo")
            first = page.locator("#feed tr a").first
            product_id = first.inner_text()
            first.click()
            expect(page.locator(".view")).to_have_count(4, timeout=30_000)
            # A crop, then its defect map, computed by the model on demand.
            page.locator(".view button").first.click()
            map_image = page.locator("img.map").first
            expect(map_image).to_be_visible(timeout=60_000)
            page.wait_for_function(
                "() => document.querySelector('img.map').naturalWidth > 0", timeout=60_000
            )
            # With a wrong token, labelling is refused; with the right one, saved in its name.
            page.fill("#token", "not-the-token")
            page.locator("#mark-good").click()
            expect(page.locator("#label-result")).to_contain_text("refused", timeout=10_000)
            page.fill("#token", token)
            page.fill("#note", "checked by the browser test")
            page.locator("#mark-good").click()
            expect(page.locator("#label-result")).to_contain_text("saved: good", timeout=10_000)
            expect(page.locator("#current-label")).to_have_text("labelled good")
            page.screenshot(path=str(tmp_path / "product.png"), full_page=True)
            browser.close()

        [(_, fields)] = server.admin.xrange("labels:{demo}")
        label = Label.from_entry(fields)
        assert (label.product_id, label.label) == (product_id, "good")
        assert label.note == "checked by the browser test" and label.by == "qa-browser"
        # The run ends; the dashboard stays up until Ctrl-C.
        deadline = time.monotonic() + 180
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        read = urllib.request.Request(
            f"{base}/api/lines", headers={"Authorization": f"Bearer {token}"}
        )
        urllib.request.urlopen(read, timeout=5).read()
        # The line started afresh on that Redis.
        assert server.admin.xlen("verdicts:{demo}") == 6
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # its threads' stacks, into the log
            time.sleep(2)
            process.kill()
            log.close()
            stacks = (tmp_path / "demo.log").read_text()[-6000:]
            raise AssertionError(
                f"the demo did not stop within 60 s of Ctrl-C:\n{stacks}"
            ) from None
        log.close()
    written = (tmp_path / "demo.log").read_text()
    assert code == 0, written[-3000:]
    assert "reusing model" in written and PASSWORD not in written


def test_a_views_defect_outline_is_drawn_over_its_crop(tmp_path, redis_client):
    import threading

    import numpy as np
    import uvicorn
    from playwright.sync_api import sync_playwright

    from cluster.apps.dashboard.app import create_app
    from cluster.apps.dashboard.tokens import QaTokens
    from cluster.transport.streams import Streams
    from schemas import BBox, Region, Verdict, ViewResult
    from workers.images import encode_png
    from workers.qa.samples import SampleStore

    store = SampleStore(tmp_path / "samples")
    outline = [(20, 10), (60, 30), (40, 70), (10, 50)]
    region = Region(
        box=BBox(x=10, y=10, w=51, h=61),
        frame_box=BBox(x=110, y=60, w=51, h=61),
        area=900,
        peak=4.5,
        outline=outline,
        frame_outline=[(x + 100, y + 50) for x, y in outline],
    )
    view = ViewResult(
        camera="cam0", score=2.0, threshold=1.0, is_defect=True, model_version="m", regions=[region]
    )
    verdict = Verdict(
        product_id="l:1",
        line="l",
        product_seq=1,
        decision="defect",
        status="complete",
        views=[view],
        captured_at=1.0,
        decided_at=2.0,
    )
    store.put_view("l", 1, "cam0", encode_png(np.full((80, 120, 4), 200, np.uint8)))
    store.put_verdict("l", 1, verdict.model_dump_json())
    redis_client.xadd(Streams("l").verdicts, verdict.to_entry())
    app = create_app(lambda line: redis_client, store, QaTokens.session()[0], lines=["l"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/product/l:1")
            polygon = page.wait_for_selector("svg.outlines polygon", state="attached")
            # The polygon's corners, at pixel centres, over the crop it was found in.
            assert polygon.get_attribute("points") == "20.5,10.5 60.5,30.5 40.5,70.5 10.5,50.5"
            svg = page.eval_on_selector("svg.outlines", "s => s.getBoundingClientRect().toJSON()")
            img = page.eval_on_selector(".crop img", "i => i.getBoundingClientRect().toJSON()")
            assert svg == img
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
