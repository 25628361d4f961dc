"""latentum: a latent-space unified multimodal model (MBAQ tokens, MoME backbone, AIA, pixel decoder)."""

__version__ = "0.1.0"
__all__ = ["LatentUM", "LatentImage", "SamplingParams"]


def __getattr__(name):  # lazy: `import latentum` stays light (no torch) until the API is used
    if name in ("LatentUM", "LatentImage"):
        from latentum import api

        return getattr(api, name)
    if name == "SamplingParams":
        from latentum.generation.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'latentum' has no attribute {name!r}")
