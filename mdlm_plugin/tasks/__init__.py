from . import masked_diffusion  # noqa: F401
