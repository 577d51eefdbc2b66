"""One clear error for bad user input.

fairseq re-wraps some exceptions (for example "Cannot load model parameters ...
please ensure that the architectures match") and its CLIs print long tracebacks.
Our checks raise :class:`MDLMUserError`; a process hook prints just its message
(and what to do) when one reaches the top level, even when fairseq wrapped it. The
hook is installed when the plugin is imported (``mdlm_plugin.install_process_hooks``).
"""
import sys


class MDLMUserError(ValueError):
    """Bad input (flags, data, checkpoint): the message says what and how to fix it."""


def _find_user_error(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MDLMUserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    err = _find_user_error(exc)
    if err is None:
        return _previous(exc_type, exc, tb)
    print(f"mdlm_plugin: error: {err}", file=sys.stderr)


def install_excepthook():
    if getattr(sys.excepthook, "__name__", "") != "_excepthook":
        sys.excepthook = _excepthook
