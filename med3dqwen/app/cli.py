"""Launch the Med3DQwen browser viewer (local only by default).

Usage:

    med3dqwen-app --model runs/demo-sft/base --adapter runs/demo-sft
    med3dqwen-app --adapter runs/demo-sft                      # the adapter on the base model it names
    med3dqwen-app --model DIR_OR_HUB_ID --port 7861            # http://127.0.0.1:7861
    med3dqwen-app --model DIR --host 0.0.0.0                    # reachable from the network (no login!)
    med3dqwen-app --model DIR --share                           # a public gradio.live link (off by default)

The page loads a CT (NIfTI, .npy, a zipped DICOM series or a synthetic phantom), shows the ROI contour on every axial
slice, answers questions through ``med3dqwen.predict`` and offers the overlay montage for download. The model is
loaded on the first question and kept for the next ones. Gradio's usage analytics are switched off.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from med3dqwen.builders.cli import DataclassArgumentParser


__all__ = ["AppArguments", "cli", "launch", "make_parser"]


@dataclass
class AppArguments:
    """The options of ``med3dqwen-app``."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Saved model folder or Hub id (HF_HUB_OFFLINE=1 needs it cached); default with --adapter: the "
            "adapter's base model."
        },
    )
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder trained on --model."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (127.0.0.1: this machine only)."})
    port: int | None = field(default=None, metadata={"help": "Port (default: the first free one from 7860)."})
    share: bool = field(default=False, metadata={"help": "Also open a public gradio.live tunnel."})

    def __post_init__(self):
        if self.model is None and self.adapter is None:
            raise ValueError("give --model (a model folder or Hub id), or --adapter to use its base model")
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")


def make_parser() -> DataclassArgumentParser:
    """The command line of ``med3dqwen-app``; ``--help`` prints this module's docstring."""
    return DataclassArgumentParser((AppArguments,), description=__doc__)


def launch(demo, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """Serve ``demo`` (from :func:`~med3dqwen.app.ui.build_app`) without server-side rendering or an MCP server.

    Returns:
        ``(app, local_url, share_url)`` as ``gradio.Blocks.launch`` does; with ``block=False`` it returns at once and
        the server runs in a background thread (``demo.close()`` stops it).
    """
    from .ui import APP_CSS

    demo.queue(default_concurrency_limit=4)  # questions run one at a time (build_app)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        ssr_mode=False,
        mcp_server=False,
        quiet=not block,
        footer_links=[],
        css=APP_CSS,
    )


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-app``."""
    parser = make_parser()
    (args,) = parser.parse_args_into_dataclasses(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        parser.exit(1, "med3dqwen-app: Gradio is not installed; pip install 'med3dqwen[app]'\n")
    from .ui import build_app

    launch(build_app(args.model, args.adapter), args.host, args.port, args.share)


if __name__ == "__main__":
    cli()
