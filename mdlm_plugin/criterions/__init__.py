from . import mdlm, sedd  # noqa: F401
