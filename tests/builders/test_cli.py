"""Tests for the build commands' parser (med3dqwen.builders.cli): options from the *BuildConfig fields."""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from med3dqwen.builders.cli import DataclassArgumentParser, make_build_parser
from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig
from med3dqwen.builders.pmc_vqa import PMCVQABuildConfig


@dataclass
class _Options:
    name: str = field(metadata={"help": "required"})
    grid: tuple[int, int, int] = field(default=(1, 2, 3), metadata={"help": "exactly three"})
    tags: tuple[str, ...] = field(default=("a",), metadata={"help": "one or more"})
    ratios: list[float] = field(default_factory=lambda: [0.5], metadata={"help": "a list"})
    check: bool = field(default=True, metadata={"help": "on by default"})
    verbose: bool = field(default=False, metadata={"help": "off by default"})
    limit: int | None = field(default=None, metadata={"help": "optional"})
    hidden: object = None  # no help: not an option

    def __post_init__(self):
        if self.name == "bad":
            raise ValueError("name must not be 'bad'")


def test_fields_become_typed_options():
    parser = DataclassArgumentParser([_Options])
    (options,) = parser.parse_args_into_dataclasses(
        ["--name", "x", "--grid", "4", "5", "6", "--tags", "b", "c", "--ratios", "0.1", "0.9"]
        + ["--no_check", "--verbose", "--limit", "7"]
    )
    assert options == _Options("x", (4, 5, 6), ("b", "c"), [0.1, 0.9], False, True, 7, None)
    (options,) = parser.parse_args_into_dataclasses(["--name", "y", "--check", "false", "--verbose", "yes"])
    assert options == _Options("y", check=False, verbose=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --name"),
        (["--name", "x", "--grid", "1", "2"], "argument --grid: expected 3 arguments"),
        (["--name", "x", "--check", "maybe"], "expected a boolean"),
        (["--name", "bad"], "name must not be 'bad'"),
    ],
)
def test_bad_command_lines_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        DataclassArgumentParser([_Options]).parse_args_into_dataclasses(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_field_without_default_or_help_is_refused():
    @dataclass
    class Broken:
        needed: str

    with pytest.raises(TypeError, match="Broken.needed has neither a default nor a help text"):
        DataclassArgumentParser([Broken])


def test_build_parser_reads_the_config_and_the_run_arguments(tmp_path):
    parser = make_build_parser(PMCVQABuildConfig, "usage")
    config, args = parser.parse_args_into_dataclasses(
        ["--data_root", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--csv_files", "a.csv", "b.csv"]
        + ["--no_ct_filter", "--split_ratios", "1", "0", "0", "--num_proc", "2", "--no_progress"]
    )
    assert config == PMCVQABuildConfig(
        data_root=str(tmp_path), output_dir=str(tmp_path / "out"), csv_files=("a.csv", "b.csv"), ct_filter=False,
        split_ratios=(1.0, 0.0, 0.0),
    )  # fmt: skip
    assert args == BuildArguments(num_proc=2, progress=False)


def test_every_config_setting_is_an_option():
    """Each *BuildConfig field but the phantom generator's own config is on the command line, with a help text."""
    from med3dqwen.builders.ctrate import CTRateBuildConfig
    from med3dqwen.builders.m3d_vqa import M3DVQABuildConfig
    from med3dqwen.builders.radgenome import RadGenomeBuildConfig

    for config in (PhantomBuildConfig, RadGenomeBuildConfig, CTRateBuildConfig, M3DVQABuildConfig, PMCVQABuildConfig):
        options = {a.dest for a in make_build_parser(config, None)._actions}
        fields = {f.name for f in config.__dataclass_fields__.values() if f.init} - {"phantom"}
        assert fields <= options, config.__name__


@pytest.mark.parametrize("script", ["datasets_scripts/build_phantom.py", "med3dqwen-build-phantom"])
def test_a_build_that_cannot_go_on_ends_with_one_line(tmp_path, script):
    # A folder holding a user's README and no build marker: the build refuses it with a named error, no traceback.
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    repo = Path(__file__).resolve().parents[2]
    if script.endswith(".py"):
        cmd = [sys.executable, str(repo / script)]
    else:
        cmd = [str(Path(sys.executable).with_name(script))]
        if not Path(cmd[0]).exists():
            pytest.skip(f"{script} is not installed in this environment (pip install . provides it)")
    cmd += ["--output_dir", str(out), "--num_volumes", "1", "--shape", "16", "32", "32", "--overwrite"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert str(out) in line and "README.md" in line
    assert (out / "README.md").read_text() == "my notes\n"
