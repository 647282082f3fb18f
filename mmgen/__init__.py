"""mmgen: train and run MM-Interleaved-style models that write illustrated documents.

    from mmgen import generate
    docs = generate(["A large red circle is in the top left."], max_images=3, seed=1)
"""

__version__ = "0.1.0"
__all__ = ["generate", "load_config"]


def __getattr__(name: str):  # lazy: `import mmgen` stays light (no torch) for the CLI
    if name == "generate":
        from .generation.api import generate

        return generate
    if name == "load_config":
        from .config import load_config

        return load_config
    raise AttributeError(f"module 'mmgen' has no attribute {name!r}")
