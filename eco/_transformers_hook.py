"""Register eco's transformers quantizer (:mod:`eco.hf`) without importing transformers on ``import eco``.

``from_pretrained`` of an eco checkpoint needs ``quant_method: "eco"`` registered; without it transformers
only warns and leaves the quantized weights randomly initialized. Importing transformers' quantizer registry
costs seconds, so ``import eco`` registers at once only if transformers has loaded it already, and otherwise
when it is first imported (a post-import hook on ``transformers.quantizers.auto``, which every
``PreTrainedModel`` imports).
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

REGISTRY_MODULE = "transformers.quantizers.auto"


def install() -> None:
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def attach_if_transformers_model(model) -> None:
    """:func:`eco.quantize_` calls this: a quantized ``PreTrainedModel`` gets eco's quantizer (see eco.hf)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel):
        from .hf import attach

        attach(model)


def _register() -> None:
    try:
        from .hf import register

        register()
    except Exception as error:  # never break the user's transformers import
        warnings.warn(f"eco could not register its transformers quantizer ({error!r}): save_pretrained and "
                      "from_pretrained of eco-quantized models will not work", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the registry module so eco registers right after it runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader)
        return spec


class _LoaderThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the wrapped loader's
        return getattr(self._loader, name)
