"""The diffusion samplers that generation can use: one entry per sampler.

Each entry names a diffusers scheduler class and the options it gets beside the training
scheduler's config (``from_config``). To add a sampler, add one entry; ``mmgen generate
--sampler``, ``generate.sampler`` in configs and ``mmgen.generate(sampler=...)`` all accept it,
and their help and error messages list it. This module imports neither torch nor diffusers at
import time (the CLI and the config read it at start-up).
"""

from __future__ import annotations

import warnings
from typing import Any

# name -> (diffusers scheduler class, options beside the training scheduler's config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # no x0 clipping (as Stable Diffusion's DDIM config): DDIM takes its image from the clipped
    # x0 estimates, and clipping the guided estimate undid the guidance (t2i joint 0.09 against
    # 0.50 unclipped on runs/cg0x step 4500; docs/RESULTS.md)
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def unknown_sampler(name: object) -> str:
    """The one-line message for a sampler that is not in :data:`SAMPLERS`."""
    return f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}"


def check_sampler(name: str) -> str:
    """``name`` if it is a registered sampler; else ValueError with the known ones."""
    if name not in SAMPLERS:
        raise ValueError(unknown_sampler(name))
    return name


def make_sampler(name: str, steps: int, train_config: dict, device: Any = None):
    """A diffusers scheduler for sampling, built ``from_config`` of the training scheduler's config,
    with ``steps`` timesteps set."""
    import diffusers

    cls, options = SAMPLERS[check_sampler(name)]
    sched = getattr(diffusers, cls).from_config(train_config, **options)
    with warnings.catch_warnings():  # diffusers' np.array(tensor) under numpy 2: harmless
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        sched.set_timesteps(steps, device=device)
    return sched
