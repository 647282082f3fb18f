"""Small corpora written in the exact public layouts (VIST, MMC4, OBELICS, webdataset), bad cases included."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
           (120, 120, 120), (250, 150, 50), (50, 150, 250), (10, 10, 10)]


def image_bytes(colour, fmt="JPEG", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path, names: list[str]) -> dict[str, bytes]:
    """``names`` as image files (JPEG or PNG by extension), each a different colour."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, name in enumerate(names):
        data = image_bytes(COLOURS[k % len(COLOURS)], "PNG" if name.endswith(".png") else "JPEG")
        (folder / name).write_bytes(data)
        out[name] = data
    return out


# --- VIST -------------------------------------------------------------------------------------


def vist_sis(path: Path, stories: dict[str, list[tuple[str, str]]]) -> None:
    """A ``*.story-in-sequence.json``: annotations as one-element lists, shuffled out of story order."""
    annotations = []
    for sid, items in stories.items():
        for order, (photo, text) in enumerate(items):
            annotations.append([{"original_text": text, "album_id": "a" + sid, "photo_flickr_id": photo,
                                 "setting": "last-story-in-album", "worker_id": "W1", "story_id": sid,
                                 "tier": "story-in-sequence", "worker_arranged_photo_order": order,
                                 "text": text.lower(), "storylet_id": str(100 * int(sid) + order)}])
    annotations.reverse()  # the file's order is not the story's
    data = {"info": {}, "type": "story-in-sequence", "albums": [],
            "images": [{"id": p, "url_o": f"https://example.org/{p}.jpg", "title": "", "tags": ""}
                       for items in stories.values() for p, _ in items],
            "annotations": annotations}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def vist_corpus(root: Path, *, n_stories: int = 4, missing: str | None = None) -> tuple[Path, Path, dict]:
    """``root/sis/train.story-in-sequence.json`` + ``root/images``: 5 photos per story."""
    stories = {}
    for s in range(n_stories):
        sid = str(40 + s)
        stories[sid] = [(str(1000 + 5 * s + k), f"Story {sid} sentence {k}: the friends went out.")
                        for k in range(5)]
    names = [f"{p}.jpg" for items in stories.values() for p, _ in items if p != missing]
    write_images(root / "images", names)
    vist_sis(root / "sis" / "train.story-in-sequence.json", stories)
    return root / "sis" / "train.story-in-sequence.json", root / "images", stories


# --- MMC4 -------------------------------------------------------------------------------------


def mmc4_doc(k: int, n_sent: int = 4, images: list[tuple[str, int, float]] = ()) -> dict:
    return {"url": f"https://example.org/page{k}",
            "text_list": [f"Doc {k} sentence {i}." for i in range(n_sent)],
            "image_info": [{"image_name": name, "raw_url": f"https://example.org/{name}", "matched_text_index": idx,
                            "matched_sim": sim, "face_detections": None} for name, idx, sim in images],
            "similarity_matrix": [[0.2] * n_sent for _ in images], "could_have_url_duplicate": 0}


def mmc4_shard(path: Path, images_dir: Path) -> list:
    """``docs_shard_0_v2.jsonl``: 2 good documents, a line that is not JSON, an out-of-range index.

    Returns the lines as written (dicts, or the bad line's text).
    """
    write_images(images_dir, ["a1.jpg", "a2.png", "b1.jpg", "low.jpg"])
    lines = [
        mmc4_doc(0, images=[("a1.jpg", 2, 0.31), ("a2.png", 0, 0.27), ("low.jpg", 3, 0.1)]),
        '{"url": "https://example.org/cut", "text_list": ["half',
        mmc4_doc(2, images=[("b1.jpg", 7, 0.3)]),  # matched_text_index out of range
        mmc4_doc(3, n_sent=2, images=[("b1.jpg", 1, 0.4)]),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return lines


def zip_of(path: Path, zpath: Path) -> Path:
    zpath.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(path, arcname=path.name)
    return zpath


# --- OBELICS ----------------------------------------------------------------------------------


def obelics_parquet(path: Path, images_dir: Path, *, rows_per_group: int = 2) -> list[dict]:
    """A parquet file in OBELICS's layout (3 documents in 2 row groups); images named by URL file name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_images(images_dir, ["cat.jpg", "dog.png", "bird.jpg"])
    rows = [
        {"images": [None, "https://img.example.org/x/cat.jpg", None],
         "texts": ["A cat sat on the mat.", None, "Then it slept."]},
        {"images": ["https://img.example.org/dog.png?w=300", None],
         "texts": [None, "A dog ran."]},
        {"images": [None, "https://img.example.org/bird.jpg", "https://img.example.org/absent.jpg"],
         "texts": ["Birds.", None, None]},
    ]
    for k, r in enumerate(rows):
        r["metadata"] = json.dumps([None if u is None else {"src": u, "formatted_filename": None}
                                    for u in r["images"]])
        r["general_metadata"] = json.dumps({"url": f"https://example.org/doc{k}", "warc_filename": "x.warc.gz"})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("images", pa.list_(pa.string())), ("metadata", pa.string()),
        ("general_metadata", pa.string()), ("texts", pa.list_(pa.string()))]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=rows_per_group)
    return rows


def other_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a"], "url": ["https://example.org/a.jpg"]}), path)


# --- webdataset (OpenFlamingo's MMC4 packing) -------------------------------------------------


def tar_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))


def mmc4_packed_shard(path: Path, start: int, n: int, *, bad_image_at: int | None = None) -> dict[str, list[bytes]]:
    """``n`` samples ``{key}.json``, each an MMC4 document with 2 images inline as ``image_base64``.

    Returns each key's image bytes; the sample ``bad_image_at`` holds bytes that are not an image.
    """
    members, images = [], {}
    for k in range(start, start + n):
        key = f"{k:09d}"
        doc = mmc4_doc(k, images=[(f"{key}-0.jpg", 0, 0.3), (f"{key}-1.jpg", 2, 0.3)])
        data = [image_bytes(COLOURS[k % 10]), image_bytes(COLOURS[(k + 3) % 10])]
        if k == bad_image_at:
            data[1] = b"\xff\xd8\xff not a jpeg at all" * 4
        for info, raw in zip(doc["image_info"], data):
            info["image_base64"] = base64.b64encode(raw).decode("ascii")
        members.append((f"{key}.json", json.dumps(doc).encode()))
        images[key] = data
    tar_members(path, members)
    return images


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def truncate_tar(path: Path, member: int, *, in_header: bool = False) -> None:
    """Cut a tar inside member ``member``'s data (or inside its header)."""
    with tarfile.open(path) as tf:
        m = tf.getmembers()[member]
    cut = m.offset + 100 if in_header else m.offset_data + m.size // 2
    path.write_bytes(path.read_bytes()[:cut])
