"""The image decoder's conditioners: one entry per conditioner, each in a file of its own.

The reference path — the LLM's hidden states through the context encoder into the UNet's
cross-attention, and the MMFS blocks reading earlier images — is the whole of the decoder's
conditioning (docs/DESIGN.md §6). A conditioner is one more input that a config lists
(``model.decoder.conditioners: [words, previous_image, coords]``); what one is, and the two
places it can act, is in :mod:`mmgen.models.conditioners.base`. To add one, write its file and
add one entry here; the config accepts its name, and an unknown name is refused in one line with
the known ones. This module imports neither torch nor diffusers at import time (the config reads
it at start-up).
"""

from __future__ import annotations

import importlib

# name -> (module in this package, class, whether its UNet input channels are built into a UNet
# made from the config — it then needs model.decoder.pretrained unset)
CONDITIONERS: dict[str, tuple[str, str, bool]] = {
    "words": ("words", "Words", False),
    "previous_image": ("previous_image", "PreviousImage", False),
    "coords": ("coords", "Coords", True),
}


def unknown_conditioner(name: object) -> str:
    """The one-line message for a conditioner that is not in :data:`CONDITIONERS`."""
    return f"unknown decoder conditioner {name!r}; choose from {', '.join(CONDITIONERS)}"


def conditioner_class(name: str) -> type:
    """The class of a registered conditioner; else ValueError with the known ones."""
    if name not in CONDITIONERS:
        raise ValueError(unknown_conditioner(name))
    module, cls, _ = CONDITIONERS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
