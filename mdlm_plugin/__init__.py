"""mdlm_plugin: masked diffusion language models (MDLM, Sahoo et al. 2024) for fairseq.

Load with ``--user-dir mdlm_plugin``. fairseq auto-imports ``tasks/`` and
``models/`` of a user dir but not ``criterions/``, so everything is imported here.

Importing the plugin changes three process-wide things, both in
:func:`install_process_hooks` below (README, "Process-wide hooks").
"""
from .checkpoint_io import install_atomic_checkpoint_copy, install_early_stop_persistence
from .errors import install_excepthook


def install_process_hooks() -> None:
    """The three process-wide changes loading the plugin makes (idempotent). fairseq
    gives a ``--user-dir`` plugin no other entry point than its import, so they are
    installed from here, for every fairseq CLI that loads the plugin:

    1. ``sys.excepthook`` (``errors.install_excepthook``): an ``MDLMUserError`` that
       reaches the top level, even wrapped by fairseq, prints one line
       ``mdlm_plugin: error: ...`` instead of a traceback; every other exception goes
       to the previous hook unchanged.
    2. fairseq's ``PathManager.copy`` (``checkpoint_io.install_atomic_checkpoint_copy``):
       a copy between local files goes to ``DEST.tmp`` and is renamed onto ``DEST``,
       so a kill during a save never truncates ``checkpoint_last.pt``; remote (iopath)
       paths keep fairseq's copy.
    3. fairseq's ``Trainer.save_checkpoint`` / ``load_checkpoint``
       (``checkpoint_io.install_early_stop_persistence``): the ``--patience`` counter of
       fairseq-train travels in the checkpoint, so a resumed run stops early exactly
       where an uninterrupted one would.
    """
    install_excepthook()
    install_atomic_checkpoint_copy()
    install_early_stop_persistence()


install_process_hooks()

from . import criterions, models, optim, tasks  # noqa: E402,F401  (registers with fairseq)

__version__ = "0.1.0"
