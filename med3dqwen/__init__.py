"""Med3DQwen: slice-wise boundary prompting for 3D CT vision-language models.

``import med3dqwen`` registers the model with the transformers Auto classes, so ``AutoConfig`` / ``AutoModel`` /
``AutoModelForImageTextToText`` / ``AutoProcessor`` / ``AutoImageProcessor`` resolve ``model_type="med3d_qwen"``.
Saved checkpoints also carry ``auto_map`` and the code files, so they load with ``trust_remote_code=True`` where this
package is not installed.

The registration is lazy, so that the data half (``med3dqwen.processing.ct_io``, ``med3dqwen.anatomy``,
``med3dqwen.data``, the dataset builders) never imports torch or transformers:

- the model and processor names below are imported on first access (``from med3dqwen import
  Med3DQwenForConditionalGeneration``), which registers them;
- otherwise registration happens as soon as the Auto classes are imported (``from transformers import AutoModel``,
  before or after ``import med3dqwen``), at the first moment no ``med3dqwen`` or ``transformers`` module is half-way
  through its own import (a module that is still running cannot be imported from: another library importing
  ``transformers.processing_utils``, say, must finish before our processor imports it).

The metric functions (``bleu``, ``rouge``, ``meteor``, ``closed_accuracy``, ``compute_metrics``) are imported on first
access too, without torch, transformers or registration.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any


__version__ = "0.1.0.dev0"

__all__ = [
    "Med3DQwenConfig",
    "Med3DQwenForConditionalGeneration",
    "Med3DQwenImageProcessor",
    "Med3DQwenModel",
    "Med3DQwenProcessor",
    "Med3DQwenVisionConfig",
    "bleu",
    "closed_accuracy",
    "compute_metrics",
    "load_qwen2_5_tokenizer",
    "meteor",
    "rouge",
]

# Public name → the module that defines it (imported on first access).
_LAZY_NAMES = {
    "Med3DQwenConfig": ".modeling.configuration_med3d_qwen",
    "Med3DQwenVisionConfig": ".modeling.configuration_med3d_qwen",
    "Med3DQwenModel": ".modeling.modeling_med3d_qwen",
    "Med3DQwenForConditionalGeneration": ".modeling.modeling_med3d_qwen",
    "Med3DQwenImageProcessor": ".processing.image_processing_med3d_qwen",
    "Med3DQwenProcessor": ".processing.processing_med3d_qwen",
    "load_qwen2_5_tokenizer": ".processing.tokenization_med3d_qwen",
}

# Public names whose modules import neither torch nor transformers: imported on first access, no registration.
_LIGHT_NAMES = {
    name: ".evaluation.metrics" for name in ("bleu", "closed_accuracy", "compute_metrics", "meteor", "rouge")
}

# The package of the Auto classes: once it is imported, someone may look our model type up.
_AUTO_PACKAGE = "transformers.models.auto"

# Modules whose imports the watcher follows: ours, and transformers' (registration must not run inside them).
_WATCHED = (f"{__name__}.", "transformers.")

_registered = False
_importing: set[str] = set()  # med3dqwen and transformers modules whose code is running right now


def register_auto_classes() -> None:
    """Register the config, model and processor classes with the transformers Auto classes (idempotent).

    Also marks them for ``save_pretrained`` to write ``auto_map`` and copy their code files next to the weights.
    Imports torch and transformers; :mod:`med3dqwen` calls it for you (see the module docstring).
    """
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from .modeling.configuration_med3d_qwen import Med3DQwenConfig, Med3DQwenVisionConfig
    from .modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration, Med3DQwenModel
    from .processing.image_processing_med3d_qwen import Med3DQwenImageProcessor
    from .processing.processing_med3d_qwen import Med3DQwenProcessor

    AutoConfig.register(Med3DQwenConfig.model_type, Med3DQwenConfig, exist_ok=True)
    AutoConfig.register(Med3DQwenVisionConfig.model_type, Med3DQwenVisionConfig, exist_ok=True)
    AutoModel.register(Med3DQwenConfig, Med3DQwenModel, exist_ok=True)
    AutoModelForImageTextToText.register(Med3DQwenConfig, Med3DQwenForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(Med3DQwenConfig, slow_image_processor_class=Med3DQwenImageProcessor, exist_ok=True)
    AutoProcessor.register(Med3DQwenConfig, Med3DQwenProcessor, exist_ok=True)

    # Saving copies these classes' files (and their relative imports) next to the weights.
    Med3DQwenConfig.register_for_auto_class()
    Med3DQwenModel.register_for_auto_class("AutoModel")
    Med3DQwenForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    Med3DQwenImageProcessor.register_for_auto_class("AutoImageProcessor")
    Med3DQwenProcessor.register_for_auto_class("AutoProcessor")
    _registered = True


def _register_when_ready() -> None:
    """Register once the Auto classes are loaded and no med3dqwen or transformers module is half imported; else
    wait for the next of those imports to finish (:class:`_ImportWatcher` calls this after each)."""
    if not _registered and _AUTO_PACKAGE in sys.modules and not _importing:
        register_auto_classes()


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Calls :func:`_register_when_ready` after the import of every transformers and med3dqwen module.

    Only wraps how those modules are executed: the spec comes from the other finders, and the module gets its real
    loader back before its code runs.
    """

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(_WATCHED):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _NotifyingLoader(spec.loader)
                return spec
        return None


class _NotifyingLoader(importlib.abc.Loader):
    """Runs a module with its real loader, then gives registration its chance."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def __getattr__(self, name: str) -> Any:
        # the rest of the real loader's interface: ``python -m med3dqwen.<module>`` (runpy) asks for ``get_code``
        return getattr(self.loader, name)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        _importing.add(module.__name__)
        try:
            self.loader.exec_module(module)
        finally:
            _importing.discard(module.__name__)
        _register_when_ready()


def __getattr__(name: str) -> Any:
    if name in _LIGHT_NAMES:
        value = globals()[name] = getattr(importlib.import_module(_LIGHT_NAMES[name], __name__), name)
        return value
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    register_auto_classes()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES, *_LIGHT_NAMES})


if not any(isinstance(finder, _ImportWatcher) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ImportWatcher())
_register_when_ready()
