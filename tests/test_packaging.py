"""Packaging: light imports of the data half, lazy Auto registration, package data, console scripts, the wheel."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout (output captured; raises on failure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, check=True, **kwargs
    )


@pytest.mark.parametrize(
    "module", ["med3dqwen", "med3dqwen.processing.ct_io", "med3dqwen.anatomy", "med3dqwen.data.rewrite"]
)
def test_data_half_imports_neither_torch_nor_transformers(module):
    result = run_python(f"""
        import json, sys
        import {module}
        print(json.dumps(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
    """)
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    "imports",
    [
        "import med3dqwen\nfrom transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor",
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor\nimport med3dqwen",
        # a hub module imported first: registration must wait until it has finished
        "import med3dqwen.processing.processing_med3d_qwen\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor",
        "import med3dqwen.processing.tokenization_med3d_qwen\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor",
    ],
    ids=["med3dqwen_first", "transformers_first", "processing_module_first", "tokenization_module_first"],
)
def test_auto_classes_resolve_our_model_type(imports):
    result = run_python(
        imports
        + """
import json
from transformers import AutoImageProcessor, AutoModel
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
config = AutoConfig.for_model("med3d_qwen")
names = {
    "config": type(config).__name__,
    "vision_config": type(AutoConfig.for_model("med3d_qwen_vision")).__name__,
    "model": AutoModel._model_mapping[type(config)].__name__,
    "image_text_to_text": AutoModelForImageTextToText._model_mapping[type(config)].__name__,
    "processor": PROCESSOR_MAPPING[type(config)].__name__,
    "auto_class": type(config)._auto_class,
}
print(json.dumps(names))
"""
    )
    assert json.loads(result.stdout) == {
        "config": "Med3DQwenConfig",
        "vision_config": "Med3DQwenVisionConfig",
        "model": "Med3DQwenModel",
        "image_text_to_text": "Med3DQwenForConditionalGeneration",
        "processor": "Med3DQwenProcessor",
        "auto_class": "AutoConfig",
    }


def test_public_names_are_lazy_and_register():
    result = run_python("""
        import json, sys
        import med3dqwen
        before = "transformers" in sys.modules
        from med3dqwen import Med3DQwenConfig, Med3DQwenForConditionalGeneration
        from transformers import AutoModelForImageTextToText
        config = Med3DQwenConfig(text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512})
        print(json.dumps({
            "before": before,
            "class": AutoModelForImageTextToText._model_mapping[type(config)].__name__,
            "all": sorted(n for n in med3dqwen.__all__ if n not in dir(med3dqwen)),
        }))
    """)
    assert json.loads(result.stdout) == {"before": False, "class": "Med3DQwenForConditionalGeneration", "all": []}


def test_unknown_attribute_is_an_attribute_error():
    import med3dqwen

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        med3dqwen.NoSuchThing  # noqa: B018
