"""The ``alignd`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from server.config import ConfigError, Settings, add_arguments, cli_values, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(cli_values(args), config_file=getattr(args, "config", None))


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT once it has drained, so the process would die "killed by signal";
        alignd has shut down cleanly by then, and exits with its own status (0, or 1 if the engine failed)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    return DrainingServer


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the server: build the demo model first if no model is configured, then serve."""
    import uvicorn

    from server.app import create_app, resolve_model

    settings = _settings(args)
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.model:
        # Build (or find) the demo model before listening, so the progress bar has the terminal to itself.
        settings = load_settings({**cli_values(args), "model": resolve_model(settings)},
                                 config_file=getattr(args, "config", None))
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            timeout_graceful_shutdown=int(settings.server.shutdown_grace_s) or None,
                            log_level=settings.server.log_level, lifespan="on", access_log=False)
    server = _draining_server_class()(config)
    server.run()
    return 1 if getattr(app.state, "engine_error", None) else 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    """Build the demo model (or reuse the cached build) and print its folder."""
    from server.demo.build import build_demo_model, ensure_demo_model

    if args.out:
        path = build_demo_model(args.out, preset=args.preset, seed=args.seed)
    else:
        settings = _settings(args)
        path = ensure_demo_model(settings.data_path / "models", preset=args.preset, seed=args.seed)
    print(path)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the plugins found (built-in, installed, configured), whether they load, their hooks and kinds."""
    import json

    from server.plugins import PluginError, describe_plugins, make_plugin_manager

    try:
        infos = describe_plugins(make_plugin_manager(_settings(args)))
    except PluginError as e:
        print(f"alignd: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"name": i.name, "origin": i.origin, "status": i.status, "hooks": list(i.hooks),
                           "kinds": list(i.kinds)} for i in infos], indent=2))
        return 0
    width = max(len(i.name) for i in infos)
    for i in infos:
        detail = f"kinds: {', '.join(i.kinds)}; " if i.kinds else ""
        detail += f"hooks: {', '.join(i.hooks)}" if i.hooks else ""
        print(f"{i.name:<{width}}  {i.status:<20}  {i.origin}" + (f"\n{'':<{width}}  {detail}" if detail else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignd",
        description="alignd: OpenAI-compatible chat from vLLM, end-user feedback, and an embedded RLHF trainer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="Serve chat completions (builds the demo model on first use when no --model is given).",
        description="Serve the OpenAI-compatible API. Options come from alignd.toml < ALIGND_* environment < flags.")
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo-model", help="Build the built-in demo model offline (cached).",
                          description="Generate the synthetic corpus, train a tokenizer and pretrain a small Llama.")
    demo.add_argument("--out", help="Folder to build into (default: the cache in the data dir).")
    demo.add_argument("--preset", default="demo", help="Model size preset: demo, or tiny (for tests).")
    demo.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives the same model.")
    demo.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS,
                      help="Data dir whose model cache to use (env ALIGND_DATA_DIR).")
    demo.set_defaults(func=cmd_demo_model)

    plugins = sub.add_parser(
        "plugins", help="List the feedback plugins found, whether they load (allow/block lists), hooks and kinds.",
        description="List built-in plugins, installed ones (entry-point group 'alignd') and configured modules, "
                    "as 'alignd serve' with the same options would load them.")
    plugins.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    add_arguments(plugins)
    plugins.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"alignd: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
