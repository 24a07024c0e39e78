"""``charrnn serve`` (also ``charrnn-serve``): the OpenAI-compatible server on a trained model."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..generation.sampler import load
from ..serve.settings import ServeConfig
from .options import (
    add_fields,
    add_runtime_options,
    add_template_options,
    chosen_checkpoint,
    fields_as_flags,
    new_parser,
    pick,
    run_cli,
    template_from,
)

HELP = "serve a trained model over HTTP (the OpenAI API, and a chat page)"
REPEATED = ("cors_origin", "allowed_host")  # fields given by a flag that repeats, added here rather than by add_fields


def build_parser(prog: str = "charrnn-serve") -> argparse.ArgumentParser:
    parser = new_parser(
        prog,
        "Serve a trained charrnn model over HTTP with the OpenAI protocol: GET /v1/models, POST /v1/completions, "
        'POST /v1/chat/completions (streamed as server-sent events with "stream": true), GET /health, and a chat '
        "page at GET /. Needs the serve extra: pip install 'charrnn-lm[serve]'.",
    )
    add_runtime_options(parser)
    add_fields(parser, ServeConfig, "server")
    for name in REPEATED:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, action="append", default=[], help=ServeConfig.__dataclass_fields__[name].metadata["help"])
    add_template_options(parser, "chat template (how /v1/chat/completions writes messages into text)")
    return parser


def _serve_config(values: dict[str, Any]) -> ServeConfig:
    """The ServeConfig of the parsed flags; its errors name the flags (``--max-length``), not the fields."""
    try:
        with fields_as_flags(ServeConfig):
            return pick(ServeConfig, values)
    except ConfigError as exc:
        # The repeated flags are added here by hand, so fields_as_flags does not know them as flags.
        message = str(exc)
        for name in REPEATED:
            if message.startswith(name + " "):
                raise ConfigError("--" + name.replace("_", "-") + message.removeprefix(name)) from None
        raise


def run(argv: list[str], prog: str = "charrnn-serve") -> int:
    args = build_parser(prog).parse_args(argv)
    values = vars(args)
    for name in REPEATED:
        values[name] = tuple(values[name])
    values["api_key"] = args.api_key if args.api_key is not None else os.environ.get("CHARRNN_API_KEY") or None
    config = _serve_config(values)  # checked before the model loads
    template = template_from(args)
    try:
        from ..serve import app
    except ImportError as exc:
        raise ConfigError(
            f"charrnn serve needs the serve extra ({exc.name} is missing): pip install 'charrnn-lm[serve]'"
        ) from None
    checkpoint = chosen_checkpoint(args)
    if config.model_name is None:
        config = _serve_config({**values, "model_name": app.model_id_for(checkpoint)})
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
