from . import mdlm  # noqa: F401
from . import mdlm_ar  # noqa: F401
from . import mdlm_translation  # noqa: F401
