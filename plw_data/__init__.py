"""plw-data: instruction-tuning data with a prompt-loss-weight (PLW)."""

__version__ = "0.1.0"

__all__ = ["PLWCollator", "__version__"]


def __getattr__(name: str):
    # Lazy: importing torch costs seconds; `plw-data --help` must stay instant.
    if name == "PLWCollator":
        from .collate import PLWCollator

        return PLWCollator
    raise AttributeError(name)
