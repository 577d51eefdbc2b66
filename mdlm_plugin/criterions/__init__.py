from . import mdlm  # noqa: F401
