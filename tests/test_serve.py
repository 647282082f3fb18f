"""`mmgen serve`: the real server (a subprocess, the bundled model) over HTTP, and its page in Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
FAST = {"steps": 4, "max_images": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mmgen serve`` in a subprocess, as a user starts it; stopped at the end."""

    def __init__(self, out: Path):
        self.port = free_port()
        self.out = out
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(self.port), "--out", str(out), "--device", "cpu"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmgen serve exited: {self.proc.stdout.read()}")
            try:
                if self.http.get("/api/info").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError("mmgen serve did not answer within 120 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> str:
        self.http.close()
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve") / "results")
    yield s
    printed = s.stop()
    assert "Traceback" not in printed, printed


def png_data_url(size=48) -> str:
    """A ShapeStories frame (a large red circle on the left) as a user's PNG upload."""
    from mmgen.data.shapes import Frame, render_frame

    buf = io.BytesIO()
    render_frame(Frame("circle", "red", "large", "left", "gray"), size=size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_generate_returns_our_document_with_served_images(server):
    r = server.http.post("/api/generate", json={"prompt": "A small red circle is on the left.", "seed": 3, **FAST})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["segments"][0] == {"type": "text", "text": "A small red circle is on the left.", "source": "prompt"}
    images = [s for s in doc["segments"] if s["type"] == "image"]
    assert 1 <= len(images) <= 2 and all(s["source"] == "generated" for s in images)
    assert doc["meta"]["seed"] == 3 and doc["meta"]["steps"] == 4
    for seg in images:
        got = server.http.get(seg["url"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(got.content)).size == (32, 32)
    # the result is the usual document folder, on disk under --out
    folder = Path(doc["meta"]["folder"])
    assert folder.parent == server.out.resolve() or folder.parent == server.out
    saved = json.loads((folder / "document.json").read_text())
    assert [s["type"] for s in saved["segments"]] == [s["type"] for s in doc["segments"]]
    assert (folder / "index.html").is_file() and (folder / "story.md").is_file()


def test_same_request_same_document_as_the_python_api(server):
    from mmgen import generate

    body = {"prompt": "A large green square is in the center.", "seed": 7, **FAST}
    a, b = server.http.post("/api/generate", json=body).json(), server.http.post("/api/generate", json=body).json()
    assert a["id"] != b["id"]  # two results, two folders
    assert [s.get("text") for s in a["segments"]] == [s.get("text") for s in b["segments"]]
    pngs = [server.http.get(s["url"]).content for s in a["segments"] if s["type"] == "image"]
    assert pngs == [server.http.get(s["url"]).content for s in b["segments"] if s["type"] == "image"]
    # the same thread count as the server process (float sums depend on it, down to a pixel's rounding)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        local = generate([body["prompt"]], seed=7, steps=4, max_images=2, device="cpu")[0]
    finally:
        torch.set_num_threads(threads)
    assert [s.text for s in local.segments] == [s.get("text") for s in a["segments"]]
    for seg, png in zip([s for s in local.segments if s.type == "image"], pngs):
        assert seg.image.tobytes() == Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def test_a_picture_and_a_document_prompt(server):
    picture = png_data_url()
    r = server.http.post("/api/generate", json={"prompt": "", "image": picture, **FAST})
    assert r.status_code == 200, r.text
    assert r.json()["segments"][0]["type"] == "image" and r.json()["segments"][0]["source"] == "prompt"
    doc = {"segments": [{"type": "image", "data": picture}, {"type": "text", "text": "The circle turns blue."},
                        {"type": "image"}]}
    r = server.http.post("/api/generate", json={"prompt": doc, "steps": 4})
    assert r.status_code == 200, r.text
    segs = r.json()["segments"]
    assert [(s["type"], s["source"]) for s in segs] == [("image", "prompt"), ("text", "prompt"), ("image", "generated")]


def test_the_stream_sends_each_segment_then_the_document(server):
    r = server.http.post("/api/jobs", json={"prompt": "A small blue triangle is at the top.", **FAST})
    assert r.status_code == 202, r.text
    job = r.json()
    events = []
    with server.http.stream("GET", job["events"]) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    names = [n for n, _ in events]
    assert names[-1] == "done" and "started" in names
    segments = [d for n, d in events if n == "segment"]
    document = events[-1][1]["document"]
    assert len(segments) == len(document["segments"])  # every segment was streamed before the end
    assert [s["type"] for s in segments] == [s["type"] for s in document["segments"]]
    assert all(s["data"].startswith("data:image/png;base64,") for s in segments if s["type"] == "image")
    assert server.http.get(f"/api/jobs/{job['id']}").json()["state"] == "done"


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "   "}, 400, "empty"),
    ({"prompt": "x" * 100_000}, 413, "characters"),
    ({"prompt": "A red circle.", "image": "data:image/png;base64," + base64.b64encode(b"not a picture").decode()},
     400, "not an image"),
    ({"prompt": "A red circle.", "image": "data:image/png;base64,@@@"}, 400, "base64"),
    ({"prompt": "A red circle.", "seed": -1}, 400, "seed"),
    ({"prompt": "A red circle.", "seed": 1.5}, 400, "integer"),
    ({"prompt": "A red circle.", "sampler": "magic"}, 400, "dpm++"),
    ({"prompt": "A red circle.", "steps": 0}, 400, "steps"),
    ({"prompt": "A red circle.", "max_images": 1000}, 400, "max_images"),
    ({"prompt": "A red circle.", "colour": "red"}, 400, "unknown field"),
    ({"prompt": "A red circle.", "kind": "poem"}, 400, "story, captions, web"),
    ({"prompt": "A red circle.", "sampler": ["dpm++"]}, 400, "a name"),
    ({"prompt": {"segments": [{"type": "image", "path": "/etc/passwd"}]}}, 400, "opens no paths"),
    ({"prompt": {"segments": [{"type": "sound"}]}}, 400, "prompt"),
    ({"prompt": 5}, 400, "sentence or a document"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_get_a_4xx_and_one_line(server, body, status, words):
    r = server.http.post("/api/generate", json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert words in message and "\n" not in message and "Traceback" not in message


def test_bad_bodies_and_paths(server):
    r = server.http.post("/api/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = server.http.post("/api/generate", content=b"x" * (13 * 2**20))
    assert r.status_code == 413
    assert server.http.get("/api/jobs/nope").status_code == 404
    # never a file outside the output folder
    for path in ("/files/../../../../etc/passwd", "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                 "/files/..%2f..%2f..%2fetc%2fpasswd"):
        r = server.http.get(path)
        assert r.status_code == 404 and b"root:" not in r.content
    assert server.http.get("/api/info").status_code == 200  # still serving


def test_localhost_unless_told_otherwise():
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert "127.0.0.1" in result.output


def test_a_flood_is_queued_or_refused_and_the_server_keeps_serving(tmp_path):
    server = Server(tmp_path / "results")
    try:
        before = server.rss_mb()
        slow = {"prompt": "A large red circle is in the center.", "steps": 250, "max_images": 8}

        def post(_):
            with httpx.Client(base_url=server.url, timeout=60) as c:
                r = c.post("/api/jobs", json=slow)
                return r.status_code, r.json()

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(post, range(50)))
        accepted = [a for code, a in answers if code == 202]
        refused = [a for code, a in answers if code == 429]
        assert len(accepted) + len(refused) == 50
        assert 1 <= len(accepted) <= 9, len(accepted)  # one running and at most 8 in line
        assert all("line is full" in a["error"] for a in refused)
        positions = sorted(server.http.get(f"/api/jobs/{a['id']}").json()["position"] for a in accepted)
        assert positions[-1] == len(accepted) - 1 and positions[0] == 0  # each knows its place in line
        assert server.http.get("/api/info", timeout=5).status_code == 200
        assert server.rss_mb() - before < 300, (before, server.rss_mb())
    finally:
        assert "Traceback" not in server.stop()


def test_a_real_browser_writes_a_story_from_a_typed_sentence(server, tmp_path):
    from playwright.sync_api import sync_playwright

    from .browser import launch

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('sampler').options.length > 0")
        assert page.eval_on_selector_all("#sampler option", "os => os.map(o => o.value)") == \
               ["dpm++", "ddim", "ddpm", "euler"]
        # an empty prompt: a message on the page, nothing sent
        page.click("#generate")
        assert "Type a sentence" in page.inner_text("#status")
        # a bad setting: the server's one-line message on the page
        page.fill("#prompt", "A large blue square is in the center.")
        page.fill("#seed", "-4")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.includes('seed')")
        assert page.get_attribute("#status", "class") == "error"
        # a story
        page.fill("#seed", "1")
        page.fill("#steps", "4")
        page.fill("#max_images", "2")
        page.click("#generate")
        page.wait_for_selector("#saved", timeout=120_000)
        story = page.inner_text("#story")
        assert "A large blue square is in the center." in story
        loaded = page.eval_on_selector_all("#story img", "is => is.map(i => i.complete && i.naturalWidth > 0)")
        assert 1 <= len(loaded) <= 2 and all(loaded)
        page.click("#saved")  # the saved document's own page
        page.wait_for_load_state()
        assert "A large blue square is in the center." in page.inner_text("body")
        assert all(page.eval_on_selector_all("img", "is => is.map(i => i.complete && i.naturalWidth > 0)"))
        browser.close()
    assert all(u.startswith(server.url) or u.startswith("data:") for u in requests), requests
