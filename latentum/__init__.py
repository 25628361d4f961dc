"""latentum: a latent-space unified multimodal model (MBAQ tokens, MoME backbone, AIA, pixel decoder)."""

__version__ = "0.1.0"
__all__ = ["LatentUM", "LatentImage", "SamplingParams"]


def __getattr__(name):  # lazy: `import latentum` stays light (no torch) until the API is used
    if name == "LatentUM":
        from latentum.api import LatentUM

        return LatentUM
    if name in ("LatentImage", "SamplingParams"):
        from latentum import types

        return getattr(types, name)
    raise AttributeError(f"module 'latentum' has no attribute {name!r}")
