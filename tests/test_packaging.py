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
    "module",
    [
        "med3dqwen",
        "med3dqwen.processing.ct_io",
        "med3dqwen.anatomy",
        "med3dqwen.data.rewrite",
        "med3dqwen.scripts.build_phantom",  # a build command starts without the model stack
        "med3dqwen.inference",  # the model stack is imported when a model is loaded, not before
        "med3dqwen.scripts.predict",
    ],
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
        # another library's import of transformers.processing_utils, which loads the Auto classes half-way through:
        # registration (which imports our processor, hence processing_utils) must wait until it has finished
        "import med3dqwen.io\nimport trl.data_utils\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor",
    ],
    ids=["med3dqwen_first", "transformers_first", "processing_module_first", "inside_another_librarys_import"],
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


# ---------------------------------------------------------------------------------------------------------------
# The wheel: built from this checkout, installed without dependencies into a fresh venv that sees this environment's
# packages, run through its console scripts from a folder where the checkout is not importable.
# ---------------------------------------------------------------------------------------------------------------

CONSOLE_SCRIPTS = {
    "med3dqwen-build-phantom": "med3dqwen.scripts.build_phantom:cli",
    "med3dqwen-build-radgenome": "med3dqwen.scripts.build_radgenome:cli",
    "med3dqwen-build-ctrate-reports": "med3dqwen.scripts.build_ctrate_reports:cli",
    "med3dqwen-build-m3d-vqa": "med3dqwen.scripts.build_m3d_vqa:cli",
    "med3dqwen-build-pmc-vqa": "med3dqwen.scripts.build_pmc_vqa:cli",
    "med3dqwen-convert-med3dvlm": "med3dqwen.convert_med3dvlm:main",
    "med3dqwen-predict": "med3dqwen.scripts.predict:cli",
    "med3dqwen-app": "med3dqwen.app.cli:cli",
    "med3dqwen-build-cache": "med3dqwen.scripts.build_cache:cli",
    "med3dqwen-demo": "med3dqwen.scripts.demo:cli",
}
# The option every command's --help must list (most write a folder; the viewer serves a model).
HELP_OPTION = {"med3dqwen-app": "--model"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built from a copy of the files it needs (the checkout gets no build/ or egg-info)."""
    import shutil

    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "med3dqwen", src / "med3dqwen", ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-w", str(root / "dist")], check=True, capture_output=True, text=True, timeout=300)
    (found,) = (root / "dist").glob("med3dqwen-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The ``bin/`` folder of a new venv holding only the wheel; a ``.pth`` file lets it import this environment's
    packages (torch, transformers, datasets, ...), which ``--no-deps`` does not install."""
    import sysconfig

    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "dev_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return venv / "bin"


def run_installed(bin_dir: Path, *command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a program of the venv in ``cwd``, without this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_wheel_ships_templates_hub_code_and_console_scripts(wheel):
    import configparser
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = configparser.ConfigParser()
        scripts.read_string(archive.read(entry_points).decode())
    assert "med3dqwen/builders/templates/dataset_card.md" in names
    hub_files = [p.relative_to(REPO).as_posix() for p in (REPO / "med3dqwen").glob("[mp]*/*_med3d_qwen.py")]
    assert len(hub_files) >= 6 and set(hub_files) <= names
    assert {"med3dqwen/processing/ct_transforms.py", "med3dqwen/processing/ct_io.py"} <= names
    metric_modules = {
        f"med3dqwen/evaluation/modules/{m}/{m}.py" for m in ("bleu", "rouge", "meteor", "closed_accuracy")
    }
    assert metric_modules <= names  # local evaluate modules: evaluate.load(<folder>) works from an installed package
    assert dict(scripts["console_scripts"]) == CONSOLE_SCRIPTS


def test_installed_console_script_builds_two_phantoms(installed, tmp_path):
    import datasets

    where = installed.parent / "lib"
    found = run_installed(installed, "python", "-c", "import med3dqwen; print(med3dqwen.__file__)", cwd=tmp_path)
    assert Path(found.stdout.strip()).is_relative_to(where), found.stdout + found.stderr  # the wheel, not the checkout

    out = tmp_path / "phantom"
    result = run_installed(
        installed, "med3dqwen-build-phantom",
        *["--output_dir", str(out), "--num_volumes", "2", "--shape", "32", "64", "64", "--seed", "3"],
        *["--split_ratios", "0.5", "0.5", "0", "--no_progress"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "built 2 volumes" in result.stdout
    assert sorted(p.name for p in (out / "volumes").iterdir()) == ["phantom_00000", "phantom_00001"]
    card = (out / "README.md").read_text()
    assert "configs:" in card  # rendered from the packaged template
    dataset = datasets.load_dataset(str(out))
    assert sum(len(split) for split in dataset.values()) > 0
    assert {row["volume_id"] for split in dataset.values() for row in split} == {"phantom_00000", "phantom_00001"}


def test_installed_console_scripts_answer_help(installed, tmp_path):
    for command in CONSOLE_SCRIPTS:
        result = run_installed(installed, command, "--help", cwd=tmp_path)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert HELP_OPTION.get(command, "--output_dir") in result.stdout


def test_console_script_rejects_bad_values_with_a_usage_error(installed, tmp_path):
    result = run_installed(
        installed, "med3dqwen-build-phantom", "--output_dir", str(tmp_path / "x"), "--prompt", "green", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "prompt must be one of ('red', 'blue', 'none'), got 'green'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()
