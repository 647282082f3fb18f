"""`mmgen serve`: the story studio page and its JSON API (Starlette; `pip install 'mmgen[serve]'`).

Routes:
- ``GET /``: the page (one self-contained HTML file, no asset from the internet);
- ``GET /api/info``: default settings, samplers and limits;
- ``POST /api/generate``: a request body (see :mod:`mmgen.serve.studio`) → the finished
  document in our format, each image segment with a ``url`` under ``/files/``;
- ``POST /api/jobs``: the same body → ``202 {"id", "position", "events"}`` at once;
- ``GET /api/jobs/{id}/events``: server-sent events for that job: ``queued`` (``{"position"}``,
  whenever the place in line changes), ``started``, ``segment`` (``{"type", "source", "text"}``
  or ``{"type": "image", "index", "data": data URL}``), then ``done`` (``{"document"}``) or
  ``failed`` (``{"message"}``);
- ``GET /api/jobs/{id}``: the job's state, place in line and, once done, its document;
- ``GET /files/...``: the files of finished documents, from the output folder only.
Refused requests get a 4xx and ``{"error": "one line"}``.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .studio import MAX_IMAGE_BYTES, RequestError, Studio

MAX_BODY_BYTES = MAX_IMAGE_BYTES * 3  # two pictures as base64 and the text
POLL_SECONDS = 0.05


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"the request is over {MAX_BODY_BYTES // 2**20} MB", 413)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(f"the request is over {MAX_BODY_BYTES // 2**20} MB", 413)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not JSON ({e})") from None


def build_app(studio: Studio) -> Starlette:
    page = resources.files("mmgen.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(studio.defaults())

    async def submit(request: Request):
        try:
            return studio.submit(await _read_body(request))
        except RequestError as e:
            return _error(str(e), e.status)

    async def generate(request: Request):
        job = await submit(request)
        if isinstance(job, JSONResponse):
            return job
        while not job.finished:
            await asyncio.sleep(POLL_SECONDS)
        if job.state == "failed":
            return _error(job.error or "generation failed", 500)
        return JSONResponse(job.document)

    async def create_job(request: Request):
        job = await submit(request)
        if isinstance(job, JSONResponse):
            return job
        return JSONResponse({"id": job.id, "position": studio.position(job),
                             "events": f"/api/jobs/{job.id}/events"}, status_code=202)

    def _job(request: Request):
        return studio.jobs.get(request.path_params["job_id"])

    async def job_state(request: Request):
        job = _job(request)
        if job is None:
            return _error("no such job (finished jobs are forgotten after a while)", 404)
        return JSONResponse({"id": job.id, "state": job.state, "position": studio.position(job),
                             "document": job.document, "error": job.error})

    async def events(request: Request):
        job = _job(request)
        if job is None:
            return _error("no such job (finished jobs are forgotten after a while)", 404)

        async def stream():
            sent, position = 0, None
            while True:
                if job.state == "queued":
                    now = studio.position(job)
                    if now != position:
                        position = now
                        yield f"event: queued\ndata: {json.dumps({'position': now})}\n\n"
                while sent < len(job.events):
                    e = job.events[sent]
                    sent += 1
                    yield f"event: {e['event']}\ndata: {json.dumps(e['data'])}\n\n"
                if job.finished and sent >= len(job.events):
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_state),
        Route("/api/jobs/{job_id}/events", events),
        Mount("/files", app=StaticFiles(directory=studio.out, check_dir=True), name="files"),
    ]
    return Starlette(routes=routes)


def serve(checkpoint: Path, out: Path, *, host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
          low_memory: bool = False, on_ready=None) -> None:
    """Load the model once, then serve the page and the API until Ctrl-C."""
    import uvicorn

    from ..generation.api import load_model

    model, folder = load_model(checkpoint, device, low_memory=low_memory)
    out.mkdir(parents=True, exist_ok=True)
    app = build_app(Studio(model, folder, out))
    if on_ready is not None:
        on_ready(f"http://{host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
