"""``med3dqwen-app``'s command line: local only and no share link unless asked, ports checked."""

import sys
import types

import pytest

from med3dqwen.app import cli as app_cli


def test_defaults_are_local_without_share():
    (args,) = app_cli.make_parser().parse_args_into_dataclasses(["--model", "runs/sft/base"])
    assert (args.model, args.adapter, args.host, args.port, args.share) == (
        "runs/sft/base",
        None,
        "127.0.0.1",
        None,
        False,
    )


def test_cli_passes_the_options_to_build_and_launch(monkeypatch):
    calls = {}
    fake_ui = types.ModuleType("med3dqwen.app.ui")  # the page itself is tested in test_browser.py
    fake_ui.build_app = lambda model, adapter: calls.setdefault("built", (model, adapter))
    monkeypatch.setitem(sys.modules, "med3dqwen.app.ui", fake_ui)
    monkeypatch.setattr(
        app_cli, "launch", lambda demo, host, port, share: calls.setdefault("launch", (host, port, share))
    )
    app_cli.cli(["--model", "m", "--adapter", "a", "--port", "7999"])
    assert calls == {"built": ("m", "a"), "launch": ("127.0.0.1", 7999, False)}
    calls.clear()
    app_cli.cli(["--model", "m", "--host", "0.0.0.0", "--share"])
    assert calls["launch"] == ("0.0.0.0", None, True)
    calls.clear()
    app_cli.cli(["--adapter", "runs/sft"])  # predict loads the base model the adapter names
    assert calls["built"] == (None, "runs/sft")


@pytest.mark.parametrize("argv", [["--model", "m", "--port", "70000"], ["--port", "7860"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        app_cli.make_parser().parse_args_into_dataclasses(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--port must be in 1..65535, got 70000" in err or "give --model (a model folder or Hub id)" in err


def test_find_chromium_honours_the_override_and_path(monkeypatch, tmp_path):
    from med3dqwen.app.browser import find_chromium, launch_chromium

    fake = tmp_path / "my-chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MED3DQWEN_CHROMIUM", str(fake))
    assert find_chromium() == str(fake)
    monkeypatch.setenv("MED3DQWEN_CHROMIUM", str(tmp_path / "missing"))
    assert find_chromium() is None  # a wrong override is not silently replaced by another browser
    monkeypatch.delenv("MED3DQWEN_CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() is None
    (tmp_path / "chromium").symlink_to(fake)
    assert find_chromium() == str(tmp_path / "chromium")
    (tmp_path / "chromium").unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        launch_chromium(playwright=None)


def test_without_gradio_it_says_what_to_install(monkeypatch, capsys):
    real_find_spec = app_cli.importlib.util.find_spec
    monkeypatch.setattr(
        app_cli.importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as info:
        app_cli.cli(["--model", "m"])
    assert info.value.code == 1
    assert capsys.readouterr().err == "med3dqwen-app: Gradio is not installed; pip install 'med3dqwen[app]'\n"
