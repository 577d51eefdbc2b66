"""Checkpoint files that survive SIGKILL at any moment.

fairseq's ``checkpoint_utils.save_checkpoint`` writes the first checkpoint of a save
(e.g. ``checkpoint_1_400.pt``) atomically: to ``NAME.tmp``, then ``os.rename``.
The others of the same save, ``checkpoint_last.pt`` always among them (and
``checkpoint_best.pt``), are *copies* made with ``PathManager.copy``, which without
iopath is ``shutil.copyfile``: it truncates the destination and rewrites it in
place. A kill during that copy leaves a truncated ``checkpoint_last.pt``, and the
restarted run (which loads ``checkpoint_last.pt``) fails to load it.

Loading the plugin therefore makes (``mdlm_plugin.install_process_hooks``) ``PathManager.copy`` between local files
atomic: copy to ``DEST.tmp`` in the same directory, then ``os.replace`` it onto
``DEST``. A reader, or a restarted run, sees the old file or the new one, never
a part. (For a power loss rather than a killed process the data would also need
an fsync, which fairseq's own save does not do either.) Remote paths handled by
iopath are left to iopath.
"""
import os
import shutil

_MARK = "_mdlm_atomic_copy"


def atomic_copy(src_path: str, dst_path: str) -> bool:
    """Copy ``src_path`` onto ``dst_path`` so that ``dst_path`` is replaced in one
    step (``os.replace`` of a temporary file in the destination's directory)."""
    tmp = dst_path + ".tmp"
    try:
        shutil.copyfile(src_path, tmp)
        os.replace(tmp, dst_path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return True


def install_atomic_checkpoint_copy() -> None:
    """Route fairseq's ``PathManager.copy`` of local files through :func:`atomic_copy`
    (idempotent)."""
    from fairseq.file_io import PathManager

    original = PathManager.copy
    if getattr(original, _MARK, False):
        return

    def atomic_local_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(src_path) or \
                PathManager.path_requires_pathmanager(dst_path):
            return original(src_path, dst_path, overwrite=overwrite)
        return atomic_copy(src_path, dst_path)     # like fairseq's fallback: overwrites

    setattr(atomic_local_copy, _MARK, True)
    PathManager.copy = staticmethod(atomic_local_copy)


# --------------------------------------------------------------------------- early stopping
#
# fairseq-train's ``--patience`` counts validations without a new best in two attributes
# of the function ``fairseq_cli.train.should_stop_early`` (``best``, ``num_runs``) that no
# checkpoint saves: a resumed run starts counting from zero, so a run interrupted (or
# trained in segments) stops later than an uninterrupted one. Loading the plugin saves
# both in the checkpoint's ``extra_state`` and restores them when fairseq-train resumes.

_EARLY_STOP_KEY = "mdlm_should_stop_early"


def _early_stop_counter():
    """fairseq-train's ``should_stop_early`` function, where this process runs it."""
    import sys
    for name in ("fairseq_cli.train", "__main__"):
        fn = getattr(sys.modules.get(name), "should_stop_early", None)
        if callable(fn):
            return fn
    return None


def install_early_stop_persistence() -> None:
    """Make fairseq's ``Trainer.save_checkpoint`` / ``load_checkpoint`` carry the
    ``--patience`` state (idempotent)."""
    from fairseq.trainer import Trainer

    if getattr(Trainer.save_checkpoint, _MARK, False):
        return
    save, load = Trainer.save_checkpoint, Trainer.load_checkpoint

    def save_checkpoint(self, filename, extra_state):
        fn = _early_stop_counter()
        if fn is not None and hasattr(fn, "best"):
            extra_state = {**extra_state, _EARLY_STOP_KEY: {
                "best": fn.best, "num_runs": getattr(fn, "num_runs", 0)}}
        return save(self, filename, extra_state)

    def load_checkpoint(self, *args, **kwargs):
        extra_state = load(self, *args, **kwargs)
        state = (extra_state or {}).get(_EARLY_STOP_KEY)
        fn = _early_stop_counter()
        if state is not None and fn is not None:
            fn.best, fn.num_runs = state["best"], state["num_runs"]
        return extra_state

    for f in (save_checkpoint, load_checkpoint):
        setattr(f, _MARK, True)
    Trainer.save_checkpoint, Trainer.load_checkpoint = save_checkpoint, load_checkpoint
