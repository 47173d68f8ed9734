"""Med3DQwen: slice-wise boundary prompting for 3D CT vision-language models.

Importing the package registers the model with the transformers Auto classes, so
``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` / ``AutoImageProcessor`` resolve
``model_type="med3d_qwen"``. Saved checkpoints also carry ``auto_map`` and the code files, so they load with
``trust_remote_code=True`` where this package is not installed.
"""

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
from .processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer


__version__ = "0.1.0.dev0"

__all__ = [
    "Med3DQwenConfig",
    "Med3DQwenForConditionalGeneration",
    "Med3DQwenImageProcessor",
    "Med3DQwenModel",
    "Med3DQwenProcessor",
    "Med3DQwenVisionConfig",
    "load_qwen2_5_tokenizer",
]

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
