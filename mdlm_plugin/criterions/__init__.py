from . import mdlm, sdtt, sedd  # noqa: F401
