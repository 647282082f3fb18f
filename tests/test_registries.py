"""The sampler and LLM-family registries: every entry works, an unknown name is refused with the
list of known ones, and the config, the API and the CLI help all read the one table."""

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mmgen.config import ConfigError, LLMConfig, MMFSConfig, load_config
from mmgen.generation.api import GenerationError, generate
from mmgen.models.image_decoder import ImageDecoder
from mmgen.models.llm import build_llm
from mmgen.models.llm_families import LLM_FAMILIES
from mmgen.models.samplers import SAMPLERS, make_sampler

V = 64


@pytest.fixture(scope="module")
def decoder():
    """The default config's tiny decoder without MMFS blocks, with coordinate channels only."""
    m = load_config().model
    torch.manual_seed(0)
    dec_cfg = dataclasses.replace(m.decoder, conditioners=["coords"])
    return ImageDecoder(dec_cfg, MMFSConfig(unet=False), llm_dim=16, vision_dim=8, num_levels=1).eval()


# --- samplers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_draws_an_image_of_the_right_shape(decoder, name):
    sched = decoder.make_sampler(name, 3)
    assert type(sched).__name__ == SAMPLERS[name][0] and len(sched.timesteps) >= 3
    context = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    images = decoder.sample(context, torch.ones(2, 5, dtype=torch.bool), sampler=name, steps=3, guidance=2.0,
                            generator=torch.Generator().manual_seed(1))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1


def _lists_every(message: str, names) -> bool:
    return "\n" not in message and all(name in message for name in names)


def test_an_unknown_sampler_is_refused_with_the_known_ones(decoder):
    with pytest.raises(ValueError) as e:
        make_sampler("magic", 3, decoder.scheduler.config)
    assert "unknown sampler 'magic'" in str(e.value) and _lists_every(str(e.value), SAMPLERS)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["generate.sampler=magic"])
    assert "`generate.sampler` must be one of" in str(e.value) and _lists_every(str(e.value), SAMPLERS)
    with pytest.raises(GenerationError) as e:  # refused before any model is loaded
        generate(["A small red circle is on the left."], checkpoint="/nowhere", sampler="magic")
    assert "unknown sampler 'magic'" in str(e.value) and _lists_every(str(e.value), SAMPLERS)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cli_help_lists_every_sampler(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    assert result.exit_code == 0
    assert all(name in result.output for name in SAMPLERS), result.output


def test_a_new_sampler_is_one_entry(monkeypatch, decoder):
    monkeypatch.setitem(SAMPLERS, "unipc", ("UniPCMultistepScheduler", {}))
    assert load_config(None, ["generate.sampler=unipc"]).generate.sampler == "unipc"
    assert type(decoder.make_sampler("unipc", 4)).__name__ == "UniPCMultistepScheduler"


# --- LLM families -------------------------------------------------------------------------------


def llm_cfg(arch: str) -> LLMConfig:
    return LLMConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=64, vocab_size=V)


@pytest.mark.parametrize("arch", list(LLM_FAMILIES))
def test_every_llm_family_builds_and_runs(arch):
    torch.manual_seed(0)
    lm = build_llm(llm_cfg(arch), V).eval()
    assert type(lm.config).__name__ == LLM_FAMILIES[arch][0]
    assert lm.config.num_hidden_layers == 2 and lm.config.hidden_size == 32
    with torch.no_grad():
        logits = lm(torch.randint(0, V, (2, 7))).logits
    assert logits.shape == (2, 7, V) and torch.isfinite(logits).all()
    load_config(None, [f"model.llm.arch={arch}"])  # the config accepts it


def test_an_unknown_llm_family_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError) as e:
        build_llm(llm_cfg("gpt5"), V)
    assert "unknown LLM family 'gpt5'" in str(e.value) and _lists_every(str(e.value), LLM_FAMILIES)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.llm.arch=gpt5"])
    assert "`model.llm.arch` must be one of" in str(e.value) and _lists_every(str(e.value), LLM_FAMILIES)


def test_a_new_llm_family_is_one_entry(monkeypatch):
    monkeypatch.setitem(LLM_FAMILIES, "qwen3", ("Qwen3Config", lambda c: {"num_key_value_heads": c.num_heads}))
    assert load_config(None, ["model.llm.arch=qwen3"]).model.llm.arch == "qwen3"
    assert type(build_llm(llm_cfg("qwen3"), V).config).__name__ == "Qwen3Config"
