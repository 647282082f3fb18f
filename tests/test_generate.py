"""Generation: prompt files → illustrated documents; placeholders, determinism, failures, browser."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from mmgen.data.documents import Document, Segment, iter_records
from mmgen.evaluation.shapes_prompts import eval_prompts
from mmgen.generation.api import GenerationError, generate, generate_files, load_model

from .browser import FLAGS, chromium
from .test_train import TINY

runner = CliRunner()
FAST = dict(steps=2, max_new_tokens=6, max_images=2, batch_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model saved the way training saves it."""
    from mmgen.config import load_config
    from mmgen.data.tokenizer import build_tokenizer
    from mmgen.models.mm_interleaved import MMInterleaved

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = MMInterleaved(cfg, build_tokenizer(cfg))
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, "cpu")[0]


def write_prompts(folder: Path) -> tuple[Path, Path]:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    txt = folder / "stories.txt"
    txt.write_text("# a comment\nA large red circle is in the top left.\n\nA small blue square is in the center.\n")
    lines = [
        {"id": "cont", "segments": [{"type": "text", "text": "A large red circle is in the top left."},
                                    {"type": "image", "path": "red.png"},
                                    {"type": "text", "text": "The circle turns blue."}, {"type": "image"}]},
        {"id": "cap", "segments": [{"type": "image", "path": "red.png"}, {"type": "text"}]},
        {"id": "missing", "segments": [{"type": "image", "path": "nope.png"}, {"type": "text"}]},
    ]
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return txt, jsonl


def test_generate_files_writes_documents_and_reports_failures(tmp_path, checkpoint):
    txt, jsonl = write_prompts(tmp_path)
    out = tmp_path / "out"
    report = generate_files([txt, jsonl], out, checkpoint=checkpoint, device="cpu", settings=FAST)
    ids = sorted(w.folder.name for w in report.written)
    assert ids == ["cap", "cont", "stories-0000", "stories-0001"]
    assert len(report.failed) == 2
    assert any(f"{jsonl}:3:" in f and "image not found" in f for f in report.failed)
    assert any(f"{jsonl}:4:" in f for f in report.failed)

    # placeholders are filled in order, and only they are generated
    (cont,) = iter_records(out / "cont" / "document.json")
    assert [(s.type, s.source) for s in cont.segments] == [
        ("text", "prompt"), ("image", "prompt"), ("text", "prompt"), ("image", "generated")]
    for s in cont.segments:
        if s.type == "image":
            assert (out / "cont" / s.path).is_file()
    assert cont.meta["sampler"] == "dpm++" and cont.meta["steps"] == 2 and "timings" in cont.meta
    (cap,) = iter_records(out / "cap" / "document.json")
    assert [s.type for s in cap.segments][:1] == ["image"] and all(s.source == "generated" for s in cap.segments[1:])
    for name in ("index.html", "story.md"):
        assert (out / "cont" / name).is_file()
    index = (out / "index.html").read_text()
    assert 'href="cont/index.html"' in index and "nope.png" in index  # failures are listed too


def test_same_seed_same_bytes(tmp_path, checkpoint):
    txt, jsonl = write_prompts(tmp_path)  # free continuations, and prompts whose image places are always drawn
    outs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        generate_files([txt, jsonl], out, checkpoint=checkpoint, device="cpu", settings={**FAST, "seed": 7})
        outs.append(out)
    for doc in ("stories-0000", "stories-0001", "cont", "cap"):
        a, b = (json.loads((o / doc / "document.json").read_text()) for o in outs)
        assert a["segments"] == b["segments"]
        for png in sorted((outs[0] / doc / "images").glob("*.png")):
            assert png.read_bytes() == (outs[1] / doc / "images" / png.name).read_bytes()
    other = tmp_path / "other"
    generate_files([txt, jsonl], other, checkpoint=checkpoint, device="cpu", settings={**FAST, "seed": 8})
    pngs = lambda o: [p.read_bytes() for p in sorted(o.glob("*/images/*.png"))]  # noqa: E731
    assert pngs(outs[0]) and pngs(other) != pngs(outs[0])


def test_prompt_seed_in_meta_wins(model):
    prompt = lambda s: Document("p", [Segment("text", text="A small red circle is on the left."), Segment("image")],  # noqa: E731
                                meta={"seed": s})
    a, b, c = generate([prompt(1), prompt(1), prompt(2)], model=model, **FAST)
    assert a.meta["seed"] == 1 and c.meta["seed"] == 2
    # the seed decides the image; a and b sit in different rows of one batch, where BLAS may
    # round a row differently (remainder blocks), so allow 1 of 255 per pixel between them
    img = lambda d: np.asarray(d.segments[-1].image, dtype=np.int16)  # noqa: E731
    assert np.abs(img(a) - img(b)).max() <= 1
    assert np.abs(img(a) - img(c)).mean() > 10


def test_free_continuation_respects_limits(model):
    (doc,) = generate(["A large green triangle is at the bottom."], model=model,
                      **{**FAST, "max_new_tokens": 5, "max_images": 1, "temperature": 1.0})
    assert doc.meta["generated"]["tokens"] <= 5 and doc.meta["generated"]["images"] <= 1


def test_a_story_goes_on_until_min_images_are_drawn():
    """``min_images``: ``<eod>`` is not sampled before that many new images (the bundled model,
    whose training stories have 2-4 frames, ends some stories after two without it)."""
    from mmgen.generation.api import BUNDLED_CHECKPOINT

    net, _ = load_model(BUNDLED_CHECKPOINT, "cpu")
    prompts = eval_prompts("story", 12, 3, net.cfg.data.image_size)
    count = lambda d: sum(s.type == "image" and s.source == "generated" for s in d.segments)  # noqa: E731
    fast = dict(steps=2, max_images=4, batch_size=12)
    free = [count(d) for d in generate(prompts, model=net, **fast, min_images=0)]
    held = generate(prompts, model=net, **fast, min_images=3)
    assert min(free) < 3, free  # the switch is what holds the stories open
    assert all(3 <= count(d) <= 4 for d in held), [count(d) for d in held]
    assert all(d.meta["min_images"] == 3 for d in held)
    (capped,) = generate(prompts[:1], model=net, **{**fast, "max_images": 2}, min_images=3)
    assert count(capped) <= 2  # max_images still wins


def test_batching_many_prompts_of_different_kinds(model):
    prompts = eval_prompts("t2i", 3, 0, 32) + eval_prompts("caption", 2, 0, 32) + eval_prompts("continuation", 2, 0, 32)
    docs = generate(prompts, model=model, **{**FAST, "batch_size": 3})
    assert [d.id for d in docs] == [p.id for p in prompts]
    for p, d in zip(prompts, docs):
        assert sum(s.type == "image" and s.source == "generated" for s in d.segments) == \
            sum(s.type == "image" and s.is_placeholder for s in p.segments)


def test_the_decoder_is_given_each_documents_latest_image(tmp_path, monkeypatch):
    """The ``previous_image`` conditioner: every image is drawn with its own document's latest image
    (the prompt's, then the one drawn before it), zeros where a document has none yet."""
    from mmgen.config import load_config
    from mmgen.data.tokenizer import build_tokenizer
    from mmgen.models.mm_interleaved import MMInterleaved

    cfg = load_config(None, [*TINY, "model.decoder.conditioners=[words, previous_image, coords]"])
    torch.manual_seed(0)
    net = MMInterleaved(cfg, build_tokenizer(cfg)).eval()
    given, drawn = [], []
    sample = net.decoder.sample

    def spy(*args, **kwargs):
        given.append(kwargs["prev_image"].clone())
        out = sample(*args, **kwargs)
        drawn.append(out.clone())
        return out

    monkeypatch.setattr(net.decoder, "sample", spy)
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    with_image = Document("cont", [Segment("text", text="A large red circle is in the top left."),
                                   Segment("image", image=red), Segment("text", text="The circle turns blue."),
                                   Segment("image"), Segment("text", text="It moves left."), Segment("image")])
    text_only = Document("t2i", [Segment("text", text="A small blue square is in the center."), Segment("image")])
    docs = generate([with_image, text_only], model=net, **{**FAST, "max_images": 2})
    assert len(given) == 2 and given[0].shape[0] == 2  # both documents in the first image step
    prompt_pixels = torch.from_numpy(np.asarray(red, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(given[0][0], prompt_pixels)
    assert given[0][1].abs().max() == 0  # the text-only document has no image yet
    drawn_pixels = torch.from_numpy(np.asarray(docs[0].segments[3].image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(given[1][0], drawn_pixels)  # then the image it drew


def test_long_prompt_is_cut_from_the_left_with_a_warning(model):
    long_text = " ".join(["A small red circle is on the left."] * 200)
    (doc,) = generate([long_text], model=model, **{**FAST, "max_images": 0})
    assert any("cut" in w for w in doc.meta["warnings"])


def test_bad_settings_and_folders(tmp_path, checkpoint):
    txt, _ = write_prompts(tmp_path)
    with pytest.raises(GenerationError, match="unknown sampler 'magic'"):
        generate_files([txt], tmp_path / "o", checkpoint=checkpoint, settings={"sampler": "magic"})
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    with pytest.raises(GenerationError, match="no prompts"):
        generate_files([empty], tmp_path / "o", checkpoint=checkpoint)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("results")
    with pytest.raises(GenerationError, match="--overwrite"):
        generate_files([txt], busy, checkpoint=checkpoint)
    with pytest.raises(GenerationError, match="no such checkpoint"):
        generate_files([txt], tmp_path / "o2", checkpoint=tmp_path / "nowhere")


def test_cli_exit_code_is_non_zero_when_a_prompt_fails(tmp_path, checkpoint):
    txt, jsonl = write_prompts(tmp_path)
    args = ["generate", str(jsonl), "--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint),
            "--steps", "2", "--max-new-tokens", "4", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "failed:" in result.output and "Traceback" not in result.output
    assert (tmp_path / "out" / "cont" / "document.json").is_file()
    result = runner.invoke(app, args[:-2] + ["--sampler", "magic"])
    assert result.exit_code == 1 and "unknown sampler" in result.output


def test_out_of_memory_fails_its_batch_in_one_line_and_the_next_batch_is_written(tmp_path, checkpoint, monkeypatch):
    """The first batch's drawing asks the allocator for more than any machine has (a real allocation
    failure, not a made-up error): its two documents fail with one line each — the part, the size
    asked for, the switches — the second batch is written, and the exit code says something failed.
    Out of memory while loading is one line too."""
    from mmgen.models.image_decoder import ImageDecoder
    from mmgen.models.mm_interleaved import MMInterleaved

    real, calls = ImageDecoder.sample, []

    def sample(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            torch.empty(1 << 60, dtype=torch.uint8)  # RuntimeError: ... can't allocate memory
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImageDecoder, "sample", sample)
    prompts = tmp_path / "draw.jsonl"  # each asks for one picture
    prompts.write_text("".join(json.dumps({"id": f"d{k}", "segments": [
        {"type": "text", "text": "A small red circle is on the left."}, {"type": "image"}]}) + "\n" for k in range(4)))
    args = ["generate", str(prompts), "--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--steps", "2",
            "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert [line.split(":")[2] for line in failed] == ["1", "2"], result.output  # failed: FILE:LINE: ...
    assert all("out of memory generating 2 document(s) together (one more allocation of" in line
               and "--low-memory" in line and "--batch-size" in line for line in failed)
    assert sorted(p.parent.name for p in (tmp_path / "out").glob("*/document.json")) == ["d2", "d3"]

    def load(*args, **kwargs):
        torch.empty(1 << 60, dtype=torch.uint8)

    monkeypatch.setattr(MMInterleaved, "from_pretrained", load)
    result = runner.invoke(app, args + ["--overwrite"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: out of memory loading the model from {checkpoint}")


def test_a_real_browser_shows_the_images_and_text(tmp_path, checkpoint):
    binary = chromium()
    txt, jsonl = write_prompts(tmp_path)
    out = tmp_path / "out"
    generate_files([jsonl], out, checkpoint=checkpoint, device="cpu", settings=FAST)
    page = out / "cont" / "index.html"
    harness = tmp_path / "harness.html"
    harness.write_text(f"""<!doctype html><html><body><div id="result">pending</div>
<iframe id="f" src="{page.as_uri()}"></iframe>
<script>
document.getElementById('f').onload = function () {{
  var d = this.contentDocument, imgs = Array.from(d.images);
  var ok = imgs.length > 0 && imgs.every(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.getElementById('result').textContent =
    'images=' + imgs.length + ' loaded=' + ok + ' text=' + d.body.innerText.replace(/\\s+/g, ' ');
}};
</script></body></html>""")
    profile = tmp_path / "profile"
    cmd = [binary, "--headless", *FLAGS, f"--user-data-dir={profile}", "--allow-file-access-from-files", "--virtual-time-budget=5000",
           "--dump-dom", harness.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert "images=2 loaded=true" in dom, dom[-2000:]
    assert "The circle turns blue." in dom


def test_an_image_the_model_asks_for_is_drawn_from_the_context_training_gives_it(monkeypatch):
    """A ``<boi>`` the model writes is fed before its image is drawn: the decoder's context ends with
    it and equals the context of the same text given as a prompt (it used to be drawn from the text
    before it, without the ``<boi>``, which the LLM's sequence then lacked too: images after a
    written sentence read 0.63 against their text, 1.00 once it was fed; docs/RESULTS.md)."""
    from mmgen.generation.api import BUNDLED_CHECKPOINT

    net, _ = load_model(BUNDLED_CHECKPOINT, "cpu")
    contexts = []
    sample = net.decoder.sample

    def spy(context, cmask, *args, **kwargs):
        contexts.extend(ids[m].tolist() for ids, m in zip(kwargs["context_ids"], cmask))
        return sample(context, cmask, *args, **kwargs)

    monkeypatch.setattr(net.decoder, "sample", spy)
    settings = {"steps": 2, "max_images": 3, "seed": 3, "batch_size": 1}
    (written,) = generate([Document("free", [Segment("text", text="A small red circle is on the left.")])],
                          model=net, **settings)
    free, contexts = contexts, []
    assert len(free) >= 2 and sum(s.type == "image" for s in written.segments) == len(free)
    assert all(ids[-1] == net.special.boi for ids in free)
    given = Document("given", [Segment("text", text=s.text) if s.type == "text" else Segment("image")
                               for s in written.segments])
    generate([given], model=net, **settings)
    assert contexts[:1] == free[:1]  # the same text before the first image, the same context
    for a, b in zip(contexts, free):  # later ones hold other images' tokens, the same ids
        assert a == b


def test_the_bundled_model_writes_illustrated_stories(tmp_path):
    """The README's main command, on the shipped checkpoint (fewer sampling steps, for speed)."""
    from mmgen.generation.api import BUNDLED_CHECKPOINT

    assert (BUNDLED_CHECKPOINT / "model.safetensors").is_file(), "the bundled checkpoint is missing"
    assert sum(f.stat().st_size for f in BUNDLED_CHECKPOINT.rglob("*") if f.is_file()) <= 30 * 2**20
    prompts = Path(__file__).resolve().parent.parent / "examples" / "prompts" / "stories.txt"
    result = runner.invoke(app, ["generate", str(prompts), "--out", str(tmp_path / "out"), "--steps", "4",
                                 "--max-images", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    docs = [next(iter_records(p)) for p in sorted((tmp_path / "out").glob("*/document.json"))]
    assert len(docs) == 6
    assert sum(s.type == "image" and s.source == "generated" for d in docs for s in d.segments) >= 1
    assert (tmp_path / "out" / "index.html").is_file()


# --- what a user sees: prompts on the command line, a gallery, a quiet run -------------------


def test_prompts_and_pictures_on_the_command_line(tmp_path, checkpoint):
    txt, _ = write_prompts(tmp_path)
    picture = tmp_path / "red.png"
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", str(txt), "--prompt", "A small green triangle is at the top.",
                                 "--prompt", "A large red circle is on the left.", "--image", str(picture),
                                 "--out", str(out), "--checkpoint", str(checkpoint), "--steps", "2",
                                 "--max-images", "1", "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    docs = {p.parent.name: next(iter_records(p)) for p in out.glob("*/document.json")}
    assert set(docs) == {"stories-0000", "stories-0001", "prompt-0000", "prompt-0001"}
    for name, text in (("prompt-0000", "A small green triangle is at the top."),
                       ("prompt-0001", "A large red circle is on the left.")):
        first, second = docs[name].segments[:2]  # the one picture serves both prompts, before the text
        assert (first.type, first.source) == ("image", "prompt") and (second.text, second.source) == (text, "prompt")
        assert Image.open(out / name / first.path).getpixel((5, 5)) == (200, 30, 30)
    only_picture = runner.invoke(app, ["generate", "--image", str(picture), "--out", str(tmp_path / "o2"),
                                       "--checkpoint", str(checkpoint), "--steps", "2", "--max-images", "1",
                                       "--max-new-tokens", "4", "--device", "cpu"])
    assert only_picture.exit_code == 0, only_picture.output
    (doc,) = [next(iter_records(p)) for p in (tmp_path / "o2").glob("*/document.json")]
    assert doc.segments[0].type == "image" and doc.segments[0].source == "prompt"


def test_low_memory_generation_runs_the_whole_model_in_bfloat16(tmp_path, checkpoint):
    model, _ = load_model(checkpoint, "cpu", low_memory=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    result = runner.invoke(app, ["generate", "--prompt", "A small red circle is on the left.", "--low-memory",
                                 "--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--steps", "2",
                                 "--max-images", "1", "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "prompt-0000" / "document.json").is_file()


def test_offloaded_components_write_the_same_document(checkpoint):
    # --low-memory on an accelerator: the big components wait on the CPU and move while they run.
    # Here the device is the CPU, so nothing moves; what this checks is that the hooks (the LLM's
    # also on its input embedding, which the model calls on its own) leave generation unchanged.
    from mmgen.models.offload import movable_components, offload_components

    plain, _ = load_model(checkpoint, "cpu")
    hooked, _ = load_model(checkpoint, "cpu")
    assert offload_components(hooked, "cpu") == ["vision tower", "LLM", "UNet"]  # the tiny model has no VAE
    assert all(hasattr(m, "_hf_hook") for m in movable_components(hooked).values())
    assert hooked.device == torch.device("cpu")
    settings = dict(steps=2, max_images=2, max_new_tokens=8, seed=3)
    prompt = lambda: Document("d", [Segment("text", text="A small red circle is on the left."), Segment("image"),  # noqa: E731
                                    Segment("text", text="The circle turns blue."), Segment("image")])
    (a,) = generate([prompt()], model=plain, **settings)
    (b,) = generate([prompt()], model=hooked, **settings)
    assert [s.text for s in a.segments] == [s.text for s in b.segments]
    pictures = [[np.asarray(s.image) for s in d.segments if s.type == "image"] for d in (a, b)]
    assert len(pictures[0]) == 2 and all(np.array_equal(x, y) for x, y in zip(*pictures))


@pytest.mark.parametrize("args, words", [
    ([], "nothing to generate"),
    (["--prompt", "  "], "empty prompt"),
    (["--image", "/no/such.png"], "/no/such.png: no such file"),
    (["--prompt", "a", "--prompt", "b", "--prompt", "c", "--image", "x.png", "--image", "y.png"], None),
])
def test_bad_command_line_prompts_are_one_line(tmp_path, args, words):
    if words is None:
        for name in ("x.png", "y.png"):
            Image.new("RGB", (8, 8)).save(tmp_path / name)
        args = [str(tmp_path / a) if a.endswith(".png") else a for a in args]
        words = "2 --image for 3 --prompt"
    result = runner.invoke(app, ["generate", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_run_index_is_a_gallery(tmp_path, checkpoint):
    txt, jsonl = write_prompts(tmp_path)
    out = tmp_path / "out"
    report = generate_files([txt, jsonl], out, checkpoint=checkpoint, device="cpu", settings=dict(FAST, seed=5))
    page = (out / "index.html").read_text()
    assert page.count('<article class="card">') == len(report.written) == 4
    for w in report.written:
        assert f'href="{w.folder.name}/index.html"' in page and w.title in page
        for p in w.images:
            assert (w.folder / p).is_file() and f'src="{w.folder.name}/{p}"' in page
    assert "seed 5" in page and "sampler dpm++" in page and page.count("Failed") == 1
    doc_page = (out / "cont" / "index.html").read_text()
    assert doc_page.count('<span class="tag prompt">prompt</span>') == 4  # 3 prompt segments + the legend
    assert doc_page.count('<span class="tag generated">generated</span>') == 2  # 1 generated image + the legend


def test_a_real_browser_shows_the_gallery(tmp_path, checkpoint):
    from playwright.sync_api import sync_playwright

    from .browser import launch

    txt, jsonl = write_prompts(tmp_path)
    out = tmp_path / "out"
    report = generate_files([txt, jsonl], out, checkpoint=checkpoint, device="cpu", settings=FAST)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        page.goto((out / "index.html").as_uri())
        assert page.locator("article.card").count() == 4
        thumbs = page.eval_on_selector_all(
            "img.thumb", "is => is.map(i => [i.complete && i.naturalWidth > 0, i.clientWidth, "
                         "getComputedStyle(i).imageRendering])")
        assert len(thumbs) == sum(len(w.images) for w in report.written) and thumbs
        assert all(ok and width == 64 and rendering in ("pixelated", "crisp-edges") for ok, width, rendering in thumbs)
        assert "A large red circle is in the top left." in page.inner_text("main")
        page.click("article.card a[href='cont/index.html']")
        page.wait_for_load_state()
        sizes = page.eval_on_selector_all("img.full", "is => is.map(i => i.complete && i.naturalWidth > 0 ? "
                                                      "i.clientWidth : 0)")
        assert len(sizes) == 2 and all(s >= 256 for s in sizes)  # readable, not the 32 px originals
        assert page.locator(".seg.generated").count() == 1 and page.locator(".seg.prompt").count() == 3
        browser.close()


def test_a_generate_run_prints_only_progress_and_the_summary(tmp_path):
    """The bundled model from a fresh process, as `make demo` runs it: no warning, no load report."""
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="100")
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-m", "cli.main", "generate", "--prompt", "A small red circle is on the left.",
                          "--out", str(out), "--steps", "3", "--max-images", "2", "--device", "cpu"],
                         cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("wrote 1 document(s)")]
    progress = [line for line in lines if line.startswith(("documents", "images"))]
    assert len(summary) == 1 and progress
    assert len(summary) + len(progress) == len(lines), lines


def test_the_gallery_lists_documents_in_prompt_order(tmp_path, checkpoint):
    txt, jsonl = write_prompts(tmp_path)
    report = generate_files([jsonl, txt], tmp_path / "out", checkpoint=checkpoint, device="cpu",
                            settings=dict(FAST, batch_size=2))
    assert [w.id for w in report.written] == ["cont", "cap", "stories-0000", "stories-0001"]
    page = (tmp_path / "out" / "index.html").read_text()
    assert [page.index(f'href="{n}/index.html"') for n in ("cont", "cap", "stories-0000", "stories-0001")] == \
        sorted(page.index(f'href="{n}/index.html"') for n in ("cont", "cap", "stories-0000", "stories-0001"))
