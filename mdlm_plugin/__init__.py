"""mdlm_plugin: masked diffusion language models (MDLM, Sahoo et al. 2024) for fairseq.

Load with ``--user-dir mdlm_plugin``. fairseq auto-imports ``tasks/`` and
``models/`` of a user dir but not ``criterions/``, so everything is imported here.
"""
from .checkpoint_io import install_atomic_checkpoint_copy
from .errors import install_excepthook

install_excepthook()
install_atomic_checkpoint_copy()   # checkpoint_last.pt survives a kill during a save

from . import criterions, models, optim, tasks  # noqa: E402,F401  (registers with fairseq)

__version__ = "0.1.0"
