"""Loads the FNGD plugins into their hosts without any flag: timm's train.py, fairseq-train.

The project installs ``fngd-plugin.pth`` into site-packages; Python runs its one line at start-up,
which imports this module. It imports nothing beyond ``sys`` and ``os`` and only adds a finder to
``sys.meta_path``: when a host package (``timm``, ``fairseq``) has finished importing, the
matching extension (``timm_ext``, ``fairseq_ext``) is imported right after it, which registers
the optimizers. Interpreters that never import a host pay for one list entry. A failing extension
is reported as a warning and never breaks the host.

Opt out with ``FNGD_PLUGIN_AUTOLOAD=0``.
"""

from __future__ import annotations

import os
import sys

HOSTS = {"timm": "timm_ext", "fairseq": "fairseq_ext"}
ENV = "FNGD_PLUGIN_AUTOLOAD"


class _AfterImport:
    """Loader proxy: run the host's own loader, then import the extension."""

    def __init__(self, loader, extension: str):
        self._loader = loader
        self._extension = extension

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            __import__(self._extension)
        except Exception as e:  # never break the host
            import warnings

            warnings.warn(f"fngd-plugin: could not load {self._extension} after {module.__name__}: {e!r} "
                          f"(set {ENV}=0 to disable the plugin autoload)", RuntimeWarning, stacklevel=2)


class HostFinder:
    """Meta-path finder that only ever answers for the host package names."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname, path=None, target=None):
        extension = HOSTS.get(fullname)
        if extension is None or self._busy:
            return None
        self._busy = True
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterImport(spec.loader, extension)
        return spec


def install() -> None:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if not any(isinstance(f, HostFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, HostFinder())


install()
