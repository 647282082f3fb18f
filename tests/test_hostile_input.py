"""Hostile input: over 1,000 generated malformed files fed to the readers, to ``validate_files``
and to ``mmgen data validate``.

Each one must end in a :class:`DocumentError` located at ``file:line:`` (``file:`` for a
problem with the file as a whole) or in a valid :class:`Document` -- never another exception,
never a hang. Three generators, each counted (the last test checks the total):

- broken bytes: truncated and re-encoded JSON, random bytes, invalid UTF-8, JSON-ish soup;
- wrong fields: every field of a valid document set to a hostile value (wrong types, huge
  and empty strings, odd unicode including escaped lone surrogates, absurd frame counts);
- hostile media: segment paths (and input files) that are folders, ``/dev/zero``, fifos,
  symlink loops, missing, huge or full of control characters.

Every call runs under a wall-clock alarm, so a reader that opens a fifo or ``/dev/zero``
fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import mmgen.data.media  # noqa: F401  (imported now, so the first example isn't slow)
from cli.main import app
from mmgen.data.documents import (
    MAX_FPS,
    MAX_FRAMES,
    MAX_ID_BYTES,
    SEGMENT_TYPES,
    SOURCES,
    Document,
    DocumentError,
    Segment,
    document_from_json,
    iter_records,
    read_prompts,
    safe_id,
    validate_files,
)

MIN_GENERATED = 1000
GENERATED: Counter[str] = Counter()  # test name -> inputs fed
GENERATORS = ("broken_bytes", "wrong_fields", "hostile_media")
CALL_LIMIT_S = 10  # one input through every reader and the CLI; normal is milliseconds
MAX_MESSAGE = 600  # characters after "file:line: "; a huge bad value must not flood it

FUZZ = settings(
    deadline=timedelta(seconds=2),
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)
runner = CliRunner()


# --- the arena: one folder of hostile files, shared by every example ------------------------


@pytest.fixture(scope="module")
def arena(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("arena")
    Image.new("RGB", (8, 6), (255, 0, 0)).save(root / "good.png")
    whole = (root / "good.png").read_bytes()
    (root / "cut.png").write_bytes(whole[:40])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("hello", encoding="utf-8")
    (root / "bomb.png").write_bytes(_png_header(100_000, 100_000))  # 10**10 pixels claimed
    (root / "garbage.mp4").write_bytes(bytes(range(256)) * 4)
    (root / "folder").mkdir()
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("self_loop", root / "self_loop")
    os.symlink("nowhere", root / "dangling")
    os.symlink("folder", root / "dir_link")
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", root / "zero_link")
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe")  # opening it for reading would block forever
    return root


def _png_header(width: int, height: int) -> bytes:
    """The signature and a correct IHDR chunk: enough for PIL to read the claimed size."""
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


# --- time bound ---------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm; a BaseException so ``validate_files`` can't swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    if not hasattr(signal, "setitimer"):  # no SIGALRM (Windows): run unbounded
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s: a reader blocked or looped")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- what every outcome must look like ----------------------------------------------------


def check_error(e: object, file: Path) -> None:
    assert type(e) is DocumentError, f"expected a DocumentError, got {type(e).__name__}: {e}"
    assert e.file == str(file)
    assert isinstance(e.line, int) and e.line >= 0
    where = f"{file}:{e.line}: " if e.line else f"{file}: "
    assert str(e).startswith(where), str(e)[:300]
    message = str(e)[len(where):]
    assert message == e.message and message.strip(), repr(message[:300])
    assert len(message) <= MAX_MESSAGE, f"{len(message)}-character message: {message[:200]!r}..."
    assert "\n" not in message and "\r" not in message, repr(message)
    message.encode("utf-8")  # printable on any UTF-8 terminal: no lone surrogates
    # validate_files and media_problem catch anything unexpected under these words: a bug
    assert "could not be checked" not in message and "cannot check" not in message, message


def check_document(doc: object, file: Path) -> None:
    assert type(doc) is Document, f"expected a Document, got {type(doc).__name__}"
    assert isinstance(doc.id, str) and doc.id == safe_id(doc.id)
    assert 0 < len(doc.id.encode("utf-8")) <= MAX_ID_BYTES
    assert isinstance(doc.meta, dict) and doc.origin and doc.origin.startswith(f"{file}:")
    assert isinstance(doc.segments, list) and doc.segments
    for s in doc.segments:
        assert type(s) is Segment and s.type in SEGMENT_TYPES and s.image is None
        assert s.text is None or isinstance(s.text, str)
        assert s.path is None or (isinstance(s.path, str) and s.path and "\x00" not in s.path)
        assert s.frames is None or (type(s.frames) is int and 1 <= s.frames <= MAX_FRAMES)
        assert s.fps is None or (type(s.fps) is float and 0 < s.fps <= MAX_FPS)
        assert s.source is None or s.source in SOURCES
        if s.type == "text":
            assert s.path is None and s.frames is None and s.fps is None
        else:
            assert s.text is None
    # a document that was read can be written back as UTF-8 JSON and read again, unchanged
    text = json.dumps(doc.to_json(), ensure_ascii=False).encode("utf-8").decode("utf-8")
    again = document_from_json(json.loads(text), file=file, line=1, default_id="unused")
    assert again.to_json() == doc.to_json()


def feed(file: Path, *, cli: bool) -> None:
    """``file`` through iter_records, read_prompts, validate_files and (if ``cli``) the CLI."""
    with time_limit(CALL_LIMIT_S):
        records = list(iter_records(file))
        docs, errors = read_prompts(file)
        count, problems = validate_files([file])
        # (no argv can hold a NUL: click refuses one as a usage error, exit code 2)
        cli = cli and "\x00" not in str(file)
        result = runner.invoke(app, ["data", "validate", str(file)]) if cli else None
    assert records, "iter_records gave nothing: neither a document nor a problem"
    for r in records:
        (check_error if isinstance(r, BaseException) else check_document)(r, file)
    assert docs == [r for r in records if isinstance(r, Document)]
    assert [str(e) for e in errors] == [str(r) for r in records if isinstance(r, DocumentError)]
    assert count == len(docs)
    for p in problems:
        check_error(p, file)
    shown = [str(p) for p in problems]
    assert all(str(e) in shown for e in errors), "validate_files lost a reader problem"
    if result is not None:
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"the CLI raised {type(result.exception).__name__}: {result.exception}")
        assert result.exit_code == (1 if problems else 0), result.output[-500:]
        assert result.stdout == "".join(f"{p}\n" for p in shown)


def counted(name: str) -> bool:
    """Count one generated input for ``name``; every fourth also goes through the CLI."""
    GENERATED[name] += 1
    return GENERATED[name] % 4 == 1


# --- hostile values -----------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A literal written into the JSON text as it is (``1e400``, ``NaN``, 5,000 digits)."""

    text: str


def dumps(obj: object, *, ascii: bool, indent: int | None = None) -> bytes:
    """JSON bytes of ``obj`` with :class:`Raw` literals spliced in; lone surrogates are kept
    (escaped as ``\\ud800`` when ``ascii``, else as the invalid UTF-8 bytes ED A0 80)."""
    raws: list[str] = []

    def mark(v):
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(obj), ensure_ascii=ascii, indent=indent)
    # one pass (a replace per raw value scanned the whole text each time: minutes for 1,000 of them)
    text = re.sub(r'"@@RAW(\d+)@@"', lambda m: raws[int(m.group(1))], text)
    return text.encode("utf-8", "surrogatepass")


ODD = [
    "", " ", "\x00", "\x00\x00", "\u200f", "\u200e", "\u202e", "\u202a", "\u2066", "\ufeff",
    "\u2028", "\u2029", "\x85", "\r", "\n", "\r\n", "\t", "\x0b", "\x1b[31m", "\x7f", "\x1c",
    "😀", "👩‍👩‍👧", "🏳️‍🌈", "e\u0301", "\u0301", "ﬁ", "Ω", "\uffff", "\ufffe", "\U0010ffff",
    "\ud800", "\udc80", "\udfff", "\ud83d\ude00", "\ud83d", "\ude00\ud83d",  # lone and paired
    "..", ".", "/", "\\", "../../x", "/etc/passwd", "C:\\x", "<script>alert(1)</script>",
    "&amp;", "%00", "$(rm -rf /)", "CON", "nul", "null", "true", "0", "text", "image", "prompt",
    '"', "'", "{}", "[]", "\\u0000",
]
HUGE = ["x" * 1_000_000, "é" * 300_000, "😀" * 250_000, "\\" * 100_000, "\u202e" * 50_000,
        "\x00" * 100_000, "a\n" * 10_000, "\ud800" * 10_000]
RAW_LITERALS = ["1" * 5000, "-" + "9" * 4400, "1e400", "-1e400", "1e-400", "NaN", "-NaN",
                "Infinity", "-Infinity", "-0", "0.0", "4.0", "1e2", "1E+2"]
BAD_JSON_LITERALS = ["01", "1.", ".5", "+1", "0x10", "True", "None", "'x'", "undefined"]

odd_text = st.lists(st.sampled_from(ODD) | st.text(max_size=4), max_size=6).map("".join)
strings = odd_text | st.text(max_size=20) | st.sampled_from(HUGE)
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | strings
           | st.sampled_from(RAW_LITERALS + BAD_JSON_LITERALS).map(Raw))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text | st.text(max_size=6),
                                                                inner, max_size=3),
    max_leaves=8,
)

ABSURD_FRAMES = [0, -1, -(10**12), 10**12, 10**100, 2**63, MAX_FRAMES + 1, 1.5, 2.0, 0.5, -0.0,
                 True, False, None, "4", "", [4], {"n": 4}, 1, 4, MAX_FRAMES]
ABSURD_FPS = [0, -1, 0.0, -0.0, 5e-324, 1e-3, MAX_FPS, MAX_FPS + 1e-4, 1e308, True, False,
              "30", None, [30], 30, 29.97]
ODD_TYPES = ["TEXT", "Image", " text", "text ", "text\x00", "tеxt", "audio", "", "video\n",
             True, None, 0, [], {}, ["text"]]  # "tеxt" has a Cyrillic е
ODD_SOURCES = ["Prompt", "model", "", "generated ", None, True, 1, ["prompt"], {}]
ODD_IDS = ["", ".", "..", "...", "../../x", "/etc/passwd", "a/b", "CON", "nul.txt", "-", " ",
           "a" * 300, "é" * 200, 10**30, -5, 0, 1.5, True, None, [], {}]
ODD_SEGMENT_LISTS = [[], [[]], [None], [{}], "text", {"type": "text"}, [{"type": "text"}] * 2000]
ODD_META = [None, [], "m", 1, True, {"": {"": [None]}}, {"\x00": "\ud800"}]
# Segment paths, relative to the input file's folder (the arena) unless absolute.
# "@ARENA@" is replaced by the arena's absolute path.
HOSTILE_PATHS = [
    "good.png", "@ARENA@/good.png", "folder/../good.png", "./good.png", "cut.png", "empty.png",
    "text.png", "bomb.png", "garbage.mp4", "folder", "folder/", "@ARENA@", ".", "..", "/",
    "dir_link", "pipe", "@ARENA@/pipe", "loop1", "self_loop", "dangling", "zero_link",
    "/dev/zero", "/dev/null", "/dev/urandom", "/proc/self/status", "missing.png",
    "good.png/", "good.png/x", "a" * 1_000_000, "a" * 300 + ".png", "x\ny.png", "x\ry.png",
    "\u202egnp.exe", "😀.png", "\ud800.png", "file:///etc/passwd", "http://127.0.0.1:9/x.png",
    "~/x.png", "$HOME/x.png", "C:\\x.png", "//server/share/x.png", "con", "\x00", "a\x00b", "",
    " ", 7, None, True, [], {"path": "good.png"},
]
FIELD_VALUES = {
    "id": st.sampled_from(ODD_IDS) | json_values | odd_text,
    "segments": st.sampled_from(ODD_SEGMENT_LISTS) | json_values | st.lists(json_values, max_size=3),
    "meta": st.sampled_from(ODD_META) | json_values,
    "type": st.sampled_from(ODD_TYPES) | json_values,
    "text": strings | json_values,
    "path": st.sampled_from(HOSTILE_PATHS) | json_values,
    "frames": st.sampled_from(ABSURD_FRAMES) | st.sampled_from(RAW_LITERALS).map(Raw) | json_values,
    "fps": st.sampled_from(ABSURD_FPS) | st.sampled_from(RAW_LITERALS).map(Raw) | json_values,
    "source": st.sampled_from(ODD_SOURCES) | json_values,
}

VALID = {
    "id": "story-0001",
    "segments": [
        {"type": "text", "text": "A large red circle is in the top left.", "source": "prompt"},
        {"type": "image", "path": "good.png"},
        {"type": "text", "text": "The circle turns blue."},
        {"type": "video", "path": "garbage.mp4", "frames": 4, "fps": 2.0},
        {"type": "image"},
        {"type": "text"},
    ],
    "meta": {"any": ["json", 1, None, {"x": 2.5}]},
}
VALID_TEXT = json.dumps(VALID, ensure_ascii=False).replace("circle", "cérclé 😀")
SUFFIXES = [".jsonl", ".json", ".txt", ".JSONL", ".md", ""]


def with_arena(value: object, arena: Path) -> object:
    if isinstance(value, str):
        return value.replace("@ARENA@", str(arena))
    if isinstance(value, dict):
        return {with_arena(k, arena): with_arena(v, arena) for k, v in value.items()}
    if isinstance(value, list):
        return [with_arena(v, arena) for v in value]
    return value


# --- 1. broken bytes ----------------------------------------------------------------------

BAD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
             b"\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x00", b"\r", b"\n", b"\xef\xbb\xbf"]


@st.composite
def broken_bytes(draw) -> bytes:
    valid = VALID_TEXT.encode("utf-8")
    kind = draw(st.sampled_from(["truncated", "bad byte", "encoding", "soup", "random", "lines"]))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "bad byte":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.sampled_from(BAD_BYTES)) + valid[at:]
    if kind == "encoding":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "utf-8-sig"]))
        return VALID_TEXT.replace("😀", "").encode(codec)
    if kind == "soup":
        return draw(st.text(alphabet='{}[]":,.0123456789eE+-tfrunlsa\\ \n\r\t\x00', max_size=80)).encode()
    if kind == "random":
        return draw(st.binary(max_size=300))
    parts = st.sampled_from([valid, b"", b"  ", b"{", b"[]", b"null", b"\xff\xfe", b"#", b"{}"])
    sep = draw(st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n"]))
    return sep.join(draw(st.lists(parts | st.binary(max_size=30), min_size=1, max_size=6)))


@settings(FUZZ, max_examples=400)
@given(content=broken_bytes(), suffix=st.sampled_from(SUFFIXES))
def test_broken_bytes(arena, content, suffix):
    cli = counted("broken_bytes")
    file = arena / f"input{suffix}"
    file.write_bytes(content)
    feed(file, cli=cli)


# --- 2. wrong fields ----------------------------------------------------------------------


@st.composite
def wrong_fields(draw) -> dict | object:
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, dict):
            break
        segments = doc.get("segments")
        objects = [i for i, s in enumerate(segments) if isinstance(s, dict)] if isinstance(segments, list) else []
        op = draw(st.sampled_from(["segment field"] * 4 + ["document field", "delete", "unknown key",
                                                            "document", "segment"]))
        if op == "segment field" and objects:
            key = draw(st.sampled_from(list(FIELD_VALUES)[3:]))
            segments[draw(st.sampled_from(objects))][key] = draw(FIELD_VALUES[key])
        elif op == "delete":
            if objects and draw(st.booleans()):
                segment = segments[draw(st.sampled_from(objects))]
                segment.pop(draw(st.sampled_from(sorted(segment) or ["type"])), None)
            else:
                doc.pop(draw(st.sampled_from(["id", "segments", "meta"])), None)
        elif op == "unknown key":
            target = segments[draw(st.sampled_from(objects))] if objects and draw(st.booleans()) else doc
            target[draw(odd_text | st.sampled_from(["caption", "Type", "segment", "x" * 100_000]))] = \
                draw(json_values)
        elif op == "document":
            doc = draw(json_values)
        elif op == "segment" and isinstance(segments, list):
            segments.insert(draw(st.integers(0, len(segments))), draw(json_values))
        else:
            key = draw(st.sampled_from(["id", "segments", "meta"]))
            doc[key] = draw(FIELD_VALUES[key])
    return doc


@settings(FUZZ, max_examples=400)
@given(doc=wrong_fields(), ascii=st.booleans(),
       layout=st.sampled_from(["line", "between valid lines", "json", "json indented", "jsonl indented"]))
def test_wrong_fields(arena, doc, ascii, layout):
    cli = counted("wrong_fields")
    doc = with_arena(doc, arena)
    if layout in ("json", "json indented"):
        file = arena / "input.json"
        file.write_bytes(dumps(doc, ascii=ascii, indent=2 if layout == "json indented" else None))
    else:
        file = arena / "input.jsonl"
        line = dumps(doc, ascii=ascii, indent=1 if layout == "jsonl indented" else None)
        valid = dumps(VALID, ascii=True)
        file.write_bytes(b"\n".join([valid, line, valid] if layout == "between valid lines" else [line]) + b"\n")
    feed(file, cli=cli)


def test_escaped_lone_surrogate_is_refused_but_a_pair_is_read(arena):
    file = arena / "surrogates.jsonl"
    file.write_text('{"segments": [{"type": "text", "text": "\\ud83d\\ude00"}]}\n'
                    '{"segments": [{"type": "text", "text": "a\\ud800b"}]}\n'
                    '{"segments": [{"type": "text", "text": "ok"}], "meta": {"\\udfff": 1}}\n', encoding="ascii")
    records = list(iter_records(file))
    assert records[0].texts == ["😀"]
    assert [str(r) for r in records[1:]] == [
        f"{file}:2: invalid JSON: lone surrogate \\ud800 in a string (not valid Unicode)",
        f"{file}:3: invalid JSON: lone surrogate \\udfff in a string (not valid Unicode)",
    ]


def test_a_huge_bad_value_gives_a_short_message(arena):
    file = arena / "huge.jsonl"
    file.write_text(json.dumps({"segments": [{"type": "x" * 1_000_000}]}) + "\n", encoding="utf-8")
    (e,) = iter_records(file)
    assert str(e) == f"{file}:1: segment 1: unknown type '{'x' * 56}... (expected text, image or video)"


# --- 3. hostile media and input paths -------------------------------------------------------

INPUT_TARGETS = ["folder", "pipe", "loop1", "self_loop", "dangling", "zero_link", "dir_link",
                 "/dev/zero", "/dev/null", "/dev/urandom", "missing.jsonl", "good.png/in.jsonl",
                 "a" * 300 + ".jsonl", "nul\x00.jsonl", "", "/"]


@st.composite
def media_documents(draw) -> dict:
    segments = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["image", "image", "video"]))
        segment = {"type": kind, "path": draw(st.sampled_from(HOSTILE_PATHS))}
        if kind == "video" and draw(st.booleans()):
            segment["frames"] = draw(st.sampled_from(ABSURD_FRAMES))
        if kind == "video" and draw(st.booleans()):
            segment["fps"] = draw(st.sampled_from(ABSURD_FPS))
        segments.append(segment)
    if draw(st.booleans()):
        segments.insert(0, {"type": "text", "text": draw(odd_text)})
    return {"id": draw(st.sampled_from(ODD_IDS[:12])), "segments": segments}


@settings(FUZZ, max_examples=250)
@given(docs=st.lists(media_documents(), min_size=1, max_size=3),
       target=st.sampled_from(["input.jsonl"] * 3 + INPUT_TARGETS))
def test_hostile_media(arena, docs, target):
    cli = counted("hostile_media")
    written = arena / "input.jsonl"
    written.write_bytes(b"\n".join(dumps(with_arena(d, arena), ascii=True) for d in docs) + b"\n")
    file = Path(target) if target.startswith("/") else arena / target
    if ("pipe" in target and not hasattr(os, "mkfifo")) or ("zero" in target and not os.path.exists("/dev/zero")):
        file = written
    feed(file, cli=cli)


@pytest.mark.parametrize("name", ["pipe", "zero_link", "loop1", "folder"])
def test_special_input_files_are_refused_without_reading(arena, name):
    file = arena / name
    if not os.path.lexists(file):
        pytest.skip(f"no {name} on this system")
    with time_limit(CALL_LIMIT_S):
        (e,) = iter_records(file)
        result = runner.invoke(app, ["data", "validate", str(file)])
    assert e.line == 0 and str(e).startswith(f"{file}: ")
    assert result.exit_code == 1 and result.stdout == f"{e}\n"


# --- the total --------------------------------------------------------------------------


def test_at_least_1000_generated_inputs():
    """Runs last (file order): the generators above fed at least MIN_GENERATED inputs."""
    if set(GENERATORS) - set(GENERATED):
        pytest.skip(f"run the whole file to count (ran only {sorted(GENERATED)})")
    total = sum(GENERATED[name] for name in GENERATORS)
    assert total >= MIN_GENERATED, dict(GENERATED)
