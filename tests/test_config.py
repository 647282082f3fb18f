"""Configs: every shipped file validates; overrides are typed; mistakes read well."""

from pathlib import Path

import pytest

from mmgen.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIGS}
    assert {"shapes_tiny.yaml", "mm_interleaved_7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the resolved config survives a round trip through plain data
    assert config_from_dict(cfg.to_dict()) == cfg


def test_default_is_the_tiny_config():
    cfg = load_config()
    assert cfg.model.llm.pretrained is None and cfg.model.vision.pretrained is None
    assert cfg.model.decoder.use_vae is False


def test_real_config_names_local_folders_and_freezes_like_the_reference():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "mm_interleaved_7b.yaml")
    assert cfg.model.llm.pretrained and cfg.model.vision.pretrained and cfg.model.decoder.pretrained
    assert not cfg.model.llm.trainable and not cfg.model.vision.trainable
    assert cfg.model.mmfs.every_k == 4 and cfg.model.resampler.num_queries == 64


def test_overrides_are_typed():
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 would read a string
    cfg = load_config(None, ["train.lr=0.01", "model.mmfs.every_k=1", "train.ema_decay=null",
                             "model.vision.feature_scales=[1.0, 0.5]", "train.betas=[0.8, 0.9]",
                             "model.llm.arch=qwen2", "train.out_dir=runs/x"])
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.model.mmfs.every_k == 1
    assert cfg.train.ema_decay is None
    assert cfg.model.vision.feature_scales == [1.0, 0.5]
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.model.llm.arch == "qwen2"
    assert cfg.train.out_dir == "runs/x"


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"`model.mmfs.every_k` must be an integer, got float 2.5"):
        load_config(None, ["model.mmfs.every_k=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=fast", r"`train.lr` must be a number, got str 'fast'"),
        ("train.lrr=1", r"unknown config key `train.lrr`"),
        ("nope.x=1", r"unknown config key `nope.x`"),
        ("train.lr.x=1", r"`train.lr` has no sub-keys"),
        ("model.llm.arch=gpt5", r"`model.llm.arch` must be one of"),
        ("train.steps=0", r"`train.steps` must be positive"),
        ("train.ema_decay=1.5", r"train.ema_decay must be in \(0, 1\)"),
        ("model.mmfs.trainable=maybe", r"`model.mmfs.trainable` must be true or false"),
        ("train.betas=[0.9]", r"`train.betas` must have 2 items"),
        ("lr", r"must look like key.path=value"),
        ("data.seq_len=4", r"data.seq_len is too short"),
        ("model.vision.image_size=64", r"model.vision.image_size must equal data.image_size"),
        ("model.decoder.pretrained=sd", r"conditioners: coords needs a UNet built from the config"),
        ("model.decoder.conditioners=[words, magic]",
         r"model.decoder.conditioners: unknown decoder conditioner 'magic'; choose from words, previous_image, coords$"),
        ("model.decoder.conditioners=[coords, coords]", r"lists a conditioner twice"),
        ("model.decoder.context_grad=2", r"model.decoder.context_grad must be in \[0, 1\]"),
    ],
)
def test_bad_overrides_are_rejected_in_words(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key `train.stepz`"):
        load_config(unknown)
    partial = tmp_path / "partial.yaml"
    partial.write_text("train:\n  steps: 7\n")
    assert load_config(partial).train.steps == 7  # everything else takes its default


def test_sources_are_validated():
    with pytest.raises(ConfigError, match="a `jsonl` source needs a `path`"):
        config_from_dict({"data": {"sources": [{"kind": "jsonl"}]}})
    with pytest.raises(ConfigError, match=r"`data.sources\[0\].kind` must be one of"):
        config_from_dict({"data": {"sources": [{"kind": "web"}]}})


@pytest.mark.parametrize("path", sorted((CONFIGS[0].parent / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    import yaml
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in DistributedType.__members__
    assert raw["num_processes"] >= 2 and raw["mixed_precision"] in ("no", "bf16", "fp16")
