"""``med3dqwen-app``'s command line: local only and no share link unless asked, ports checked."""

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
    monkeypatch.setattr(
        "med3dqwen.app.ui.build_app", lambda model, adapter: calls.setdefault("built", (model, adapter))
    )
    monkeypatch.setattr(
        app_cli, "launch", lambda demo, host, port, share: calls.setdefault("launch", (host, port, share))
    )
    app_cli.cli(["--model", "m", "--adapter", "a", "--port", "7999"])
    assert calls == {"built": ("m", "a"), "launch": ("127.0.0.1", 7999, False)}
    calls.clear()
    app_cli.cli(["--model", "m", "--host", "0.0.0.0", "--share"])
    assert calls["launch"] == ("0.0.0.0", None, True)


@pytest.mark.parametrize("argv", [["--model", "m", "--port", "70000"], ["--port", "7860"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        app_cli.make_parser().parse_args_into_dataclasses(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--port must be in 1..65535, got 70000" in err or "the following arguments are required: --model" in err
