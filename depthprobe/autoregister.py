"""Register depthprobe's model types with transformers' Auto classes as soon as those load.

``import depthprobe`` must stay cheap (no torch, no transformers), yet a folder that
``depthprobe shrink`` saved (``model_type: depthprobe_shrunk``) must load with plain
``AutoModelForCausalLM.from_pretrained`` once depthprobe is imported. So importing depthprobe
only installs a finder: when ``transformers.models.auto.modeling_auto`` finishes loading (or
right away, if it already has), :mod:`depthprobe.model.shrunk` is imported, which registers
``depthprobe_shrunk`` with ``AutoConfig`` and ``AutoModelForCausalLM``. No remote code runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

AUTO_MODULE = "transformers.models.auto.modeling_auto"
PLUGIN = "depthprobe.model.shrunk"


def _register() -> None:
    importlib.import_module(PLUGIN)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` once ``AUTO_MODULE`` has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != AUTO_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; the real finders resolve the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if transformers' Auto classes are loaded, else when they load."""
    if AUTO_MODULE in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
