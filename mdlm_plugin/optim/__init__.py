"""fairseq optimizers registered by the plugin (imported by ``mdlm_plugin/__init__.py``)."""
from . import adamw_torch  # noqa: F401
