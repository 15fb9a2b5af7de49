"""Interpreter start-up hook of fapm-merge: standard library only, no I/O.

mergekit has no plugin discovery: `mergekit-yaml` finds methods only in a registry
filled at import time. A ``.pth`` line (and a PEP 829 ``.start`` entry) calls
``install()`` at every Python start. It adds one meta-path finder and nothing else:
neither torch nor mergekit is imported here. When a program later imports
``mergekit.merge_methods``, the finder lets the import finish, then imports
``fapm_merge.methods``, which registers ``fapm`` and friends. A failure in that
step becomes one warning; it never raises into the program.
"""

import sys

_TARGET = "mergekit.merge_methods"
_PLUGIN = "fapm_merge.methods"


def _register_quietly():
    if _PLUGIN in sys.modules:  # importing or imported: it registers itself
        return
    try:
        __import__(_PLUGIN)
    except Exception as error:  # never break the host program
        import warnings

        warnings.warn(
            f"fapm-merge could not register its mergekit methods ({error!r}); "
            "`merge_method: fapm` will be unknown. Reinstall fapm-merge next to a "
            "supported mergekit (>=0.1.5,<0.2).",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterAfterExec:
    """Delegating loader: run the real import, then register the plugin."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_quietly()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _MergekitMethodsFinder:
    """Meta-path finder that only ever answers for ``mergekit.merge_methods``."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            for finder in sys.meta_path:
                find = None if finder is self else getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if find else None
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _RegisterAfterExec(spec.loader)
                    return spec
            return None
        except Exception:
            return None  # let the normal machinery report whatever is wrong
        finally:
            self._busy = False


def install():
    """Idempotent: add the finder once; register at once if mergekit is loaded."""
    try:
        if not any(type(f).__name__ == "_MergekitMethodsFinder" for f in sys.meta_path):
            sys.meta_path.insert(0, _MergekitMethodsFinder())
        module = sys.modules.get(_TARGET)
        if module is not None and hasattr(module, "register"):
            _register_quietly()
    except Exception:
        pass
