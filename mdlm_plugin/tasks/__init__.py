from . import masked_diffusion  # noqa: F401
from . import translation_masked_diffusion  # noqa: F401
