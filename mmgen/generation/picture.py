"""``story.png``: a whole document as one picture, to share or to put in a README.

Panels left to right, one per image: the image scaled up crisply (nearest neighbour, so pixel
art stays sharp) under a bar that says who made it (grey: the prompt, green: the model), and
below it the text written since the previous image. Text after the last image gets a panel of
its own. Drawn with Pillow's built-in font, so nothing is fetched.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from ..data.documents import Document

PANEL = 192  # image side in the picture, px
PAD = 12
BAR = 6
FONT_SIZE = 14
LINE = 18
COLOURS = {"prompt": (170, 170, 170), "generated": (68, 170, 119)}
TEXT = {"prompt": (80, 80, 80), "generated": (30, 100, 60)}


def story_picture(doc: Document, images: list[Image.Image]) -> Image.Image:
    """The document as one RGB picture; ``images`` are its image segments' pictures, in order."""
    font = ImageFont.load_default(size=FONT_SIZE)
    panels: list[tuple[Image.Image | None, str, list[tuple[str, str]]]] = []  # (image, source, texts)
    texts: list[tuple[str, str]] = []
    pictures = iter(images)
    for seg in doc.segments:
        if seg.type == "text" and seg.text:
            texts.append((seg.text, seg.source or "prompt"))
        elif seg.type == "image":
            picture = next(pictures, None)
            if picture is not None:
                panels.append((picture, seg.source or "prompt", texts))
                texts = []
    if texts or not panels:
        panels.append((None, "", texts))
    wrapped = [[(line, source) for text, source in t for line in textwrap.wrap(text, 24)] for _, _, t in panels]
    height = PAD + BAR + PANEL + PAD + LINE * max(len(w) for w in wrapped) + PAD
    canvas = Image.new("RGB", (PAD + len(panels) * (PANEL + PAD), height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((picture, source, _), lines) in enumerate(zip(panels, wrapped)):
        x = PAD + k * (PANEL + PAD)
        if picture is not None:
            draw.rectangle([x, PAD, x + PANEL - 1, PAD + BAR - 1], fill=COLOURS.get(source, COLOURS["prompt"]))
            canvas.paste(picture.convert("RGB").resize((PANEL, PANEL), Image.NEAREST), (x, PAD + BAR))
        y = PAD + BAR + PANEL + PAD
        for line, text_source in lines:
            draw.text((x, y), line, fill=TEXT.get(text_source, TEXT["prompt"]), font=font)
            y += LINE
    return canvas
