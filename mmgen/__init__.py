"""mmgen: train and run MM-Interleaved-style models that write illustrated documents."""

__version__ = "0.1.0"
