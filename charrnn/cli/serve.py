"""``charrnn serve`` (also ``charrnn-serve``): the OpenAI-compatible server on a trained model."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ..checkpoint import find_latest_checkpoint
from ..errors import ConfigError
from ..generation.chat import ChatTemplate
from ..generation.sampler import load
from ..serve.settings import ServeConfig
from .options import add_fields, add_runtime_options, new_parser, pick, run_cli, unescape

HELP = "serve a trained model over HTTP (the OpenAI API, and a chat page)"


def _shown(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def build_parser(prog: str = "charrnn-serve") -> argparse.ArgumentParser:
    defaults = ChatTemplate()
    parser = new_parser(
        prog,
        "Serve a trained charrnn model over HTTP with the OpenAI protocol: GET /v1/models, POST /v1/completions, "
        'POST /v1/chat/completions (streamed as server-sent events with "stream": true), GET /health, and a chat '
        "page at GET /. Needs the serve extra: pip install 'charrnn[serve]'.",
        "In the template options, \\n means a newline and \\t a tab.",
    )
    add_runtime_options(parser)
    add_fields(parser, ServeConfig, "server")
    parser.add_argument(
        "--cors-origin", action="append", default=[], help=ServeConfig.__dataclass_fields__["cors_origin"].metadata["help"]
    )
    group = parser.add_argument_group("chat template (how /v1/chat/completions writes messages into text)")
    group.add_argument("--user-prefix", default=_shown(defaults.user_prefix), help="written before each user message")
    group.add_argument("--bot-prefix", default=_shown(defaults.bot_prefix), help="written before each reply")
    group.add_argument("--separator", default=_shown(defaults.turn_separator), help="ends every turn; a reply stops at it")
    return parser


def run(argv: list[str], prog: str = "charrnn-serve") -> int:
    args = build_parser(prog).parse_args(argv)
    values = vars(args)
    values["cors_origin"] = tuple(args.cors_origin)
    values["api_key"] = args.api_key if args.api_key is not None else os.environ.get("CHARRNN_API_KEY") or None
    config = pick(ServeConfig, values)  # checked before the model loads
    template = ChatTemplate(unescape(args.user_prefix), unescape(args.bot_prefix), unescape(args.separator))
    try:
        from ..serve import app
    except ImportError as exc:
        raise ConfigError(f"charrnn serve needs the serve extra ({exc.name} is missing): pip install 'charrnn[serve]'") from None
    checkpoint = args.checkpoint if args.checkpoint is not None else find_latest_checkpoint()
    if config.model_name is None:
        config = pick(ServeConfig, {**values, "model_name": app.model_id_for(checkpoint)})
    sampler = load(checkpoint, device=args.device, dtype=args.precision)
    server = app.Server(sampler, config, template)
    try:
        sock = app.listen(config.host, config.port, config.backlog)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    if not config.loopback:
        print(f"warning: listening on {config.host}: anyone who can reach it can use this model", file=sys.stderr)
    runner = app.uvicorn_server(server)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does

    signal.signal(signal.SIGTERM, stop)
    print(
        f"charrnn-serve: listening on http://{shown}:{port} (model {config.model_name!r}; OpenAI API under /v1, "
        "chat page at /; Ctrl-C stops)",
        flush=True,
    )
    try:
        runner.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        sock.close()
    print("charrnn-serve: stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "charrnn-serve") -> int:
    """Entry point of ``charrnn-serve`` / ``charrnn serve``."""
    return run_cli(lambda args: run(args, prog), argv)
