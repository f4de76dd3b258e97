"""The ``alignd`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from alignd.clients.traits import TRAITS
from alignd.config import ConfigError, Settings, add_arguments, cli_values, load_settings
from alignd.demo.corpus import STYLES


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(cli_values(args), config_file=getattr(args, "config", None))


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """A graceful stop that orchestrators can see. On the first SIGTERM (or Ctrl-C), at once: ``/ready`` answers
        503 and a running training run is stopped (it is marked failed). The server keeps listening, so requests
        in flight, streams included, finish and late arrivals from a load balancer that has not yet seen the 503 are
        still served, until no request is in flight or ``--shutdown-grace-s`` has passed; then uvicorn closes the
        connections (cutting what still runs) and the lifespan closes the services. A second signal stops at once.

        uvicorn re-raises the signal once it has drained, so the process would die "killed by signal"; alignd has
        shut down cleanly by then, and exits with its own status (0, or 1 if the engine failed)."""

        def __init__(self, config: uvicorn.Config, app: Any, grace_s: float) -> None:
            super().__init__(config)
            self.alignd_app = app
            self.grace_s = grace_s
            self.drain_until: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            services = getattr(self.alignd_app.state, "services", None)  # None until the lifespan has started
            if self.drain_until is None and not self.should_exit and services is not None:
                self.drain_until = time.monotonic() + (self.grace_s or math.inf)
                services.stopping = True  # /ready: 503 from now on
                try:  # a signal handler runs between two steps of the loop: hand the loop the work
                    asyncio.get_running_loop().call_soon_threadsafe(services.trainer.begin_shutdown)
                except RuntimeError:
                    services.trainer.begin_shutdown()
                logging.getLogger("alignd").info(
                    "%s: not ready; draining %d request(s) in flight for up to %s", signal.Signals(sig).name,
                    len(self.server_state.tasks), f"{self.grace_s:g} s" if self.grace_s else "ever")
            else:
                super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

        async def on_tick(self, counter: int) -> bool:
            if self.drain_until is not None and not self.should_exit:
                now = time.monotonic()
                if not self.server_state.tasks or now >= self.drain_until:
                    # uvicorn's own wait for the connections gets what is left of the grace.
                    left = self.drain_until - now
                    self.config.timeout_graceful_shutdown = (None if left == math.inf
                                                             else max(1, math.ceil(left)))
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the server: build the demo model first if no model is configured, then serve."""
    return _serve(args, trainer_process=False)


def cmd_trainer(args: argparse.Namespace) -> int:
    """Start the trainer process: training runs on the shared database, HTTP only for probes and metrics."""
    return _serve(args, trainer_process=True)


def _serve(args: argparse.Namespace, *, trainer_process: bool) -> int:
    import uvicorn

    from alignd.app import create_app
    from alignd.cluster import check_role, preflight, role_of
    from alignd.feedback.manager import PluginError, collect_feedback_kinds, make_plugin_manager
    from alignd.models import resolve_model
    from alignd.trainer.config import check_trainer_settings

    settings = _settings(args)
    role = role_of(settings, trainer_process)
    check_role(settings, role)  # before the demo model is built or anything opened
    check_trainer_settings(settings.trainer)
    if not trainer_process and (refusal := _open_bind_refusal(settings)):
        print(f"alignd: {refusal}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not trainer_process and not _has_client_keys(settings):
        logging.getLogger("alignd").warning(
            "no client keys (--api-key, --key NAME:user|frontend:KEY): /v1/*, /metrics and /schema are open to "
            "anyone who can reach %s:%d until a user or frontend key is added (POST /v1/admin/keys)",
            settings.server.host, settings.server.port)
    # Before anything is opened or loaded: plugins first (a broken or conflicting one stops the start at once), then
    # the model (checked, and the demo model built or a .gguf file converted the first time, before listening, so
    # that progress bars have the terminal to themselves).
    try:
        plugins = make_plugin_manager(settings)
        collect_feedback_kinds(plugins)
    except PluginError as e:
        print(f"alignd: {e}", file=sys.stderr)
        return 2
    model = resolve_model(settings.model, settings.data_path)
    if model != settings.model:
        settings = load_settings({**cli_values(args), "model": model}, config_file=getattr(args, "config", None))
    asyncio.run(preflight(settings, model))  # a misconfigured cluster stops here (ConfigError: exit 2)
    app = create_app(settings, plugins=plugins, role=role)
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            timeout_graceful_shutdown=int(settings.server.shutdown_grace_s) or None,
                            log_level=settings.server.log_level, lifespan="on", access_log=False)
    server = _draining_server_class()(config, app, settings.server.shutdown_grace_s)
    server.run()
    if refused := getattr(app.state, "startup_error", None):  # a cluster check stopped the start
        print(f"alignd: {refused}", file=sys.stderr)
        return 2
    services = getattr(app.state, "services", None)  # set by the lifespan
    return 1 if services is not None and services.engine_error else 0


def _has_client_keys(settings: Settings) -> bool:
    """Whether the configuration has keys for the client API (also checks every --key: a ConfigError if bad)."""
    from alignd.keys import config_keys

    return any(k.principal.role != "admin" for k in config_keys(settings.server))


def _open_bind_refusal(settings: Settings) -> str | None:
    """Why ``settings`` must not be served: no client keys on an address other machines reach, unless the
    operator said so with --insecure-open. (Keys stored in the database cannot be counted before the start: an
    admin key alone does not close the client API.)"""
    from alignd.auth import is_loopback

    server = settings.server
    if _has_client_keys(settings) or server.insecure_open or is_loopback(server.host):
        return None
    return (f"refusing to serve without API keys on {server.host}, which is not a loopback address: anyone who can "
            "reach it could chat, send feedback and fill the database. Set --api-key (ALIGND_API_KEY) or a "
            "--key NAME:user|frontend:KEY, bind 127.0.0.1, or pass --insecure-open (ALIGND_INSECURE_OPEN=true) to "
            "serve it open anyway.")


def cmd_demo_model(args: argparse.Namespace) -> int:
    """Build the demo model (or reuse the cached build) and print its folder."""
    from alignd.demo.build import build_demo_model, ensure_demo_model

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

    from alignd.feedback.manager import PluginError, describe_plugins, make_plugin_manager

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

    trainer = sub.add_parser(
        "trainer", help="Run training for serving replicas (serve --trainer off) on the same PostgreSQL database.",
        description="The trainer process of a cluster: no chat API; it holds the trainer lease (a second one waits "
                    "as standby), runs the training runs replicas queue and automatic ones, generates rollouts "
                    "with its own engine, and registers and promotes candidates in the database, where the "
                    "replicas pick them up. HTTP on --host/--port: /health, /ready and /metrics only. Same options "
                    "as serve (database, model, trainer); see docs/deploy.md.")
    add_arguments(trainer)
    trainer.set_defaults(func=cmd_trainer)

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

    chat = sub.add_parser(
        "chat", help="Chat with the served policy in the terminal; /up, /down, /rate, /compare, /rank, /edit.",
        description="Chat in the terminal (replies stream in) and turn reactions into feedback; /help lists the "
                    "commands. Over a pipe, each stdin line is a prompt and each reply is printed.")
    _add_client_arguments(chat)
    chat.add_argument("--model", default="alignd", help="Model name: alignd (the promoted policy) or alignd@N.")
    chat.add_argument("--temperature", type=float, default=None, help="Sampling temperature (server default 1).")
    chat.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="Longest reply in tokens.")
    chat.add_argument("--system", default=None, help="A system message that opens every conversation.")
    chat.set_defaults(func=cmd_chat)

    keys = sub.add_parser(
        "keys", help="List, add and revoke a running server's API keys (admin key); generate a key to configure.",
        description="API keys stand for principals: a name and a role (user: its own completions and feedback; "
                    "frontend: a chat UI that names its end users; admin: everything). Keys added here are stored "
                    "(hashed) in the server's database and take effect at once, on every replica within "
                    "--key-cache-s; the key is printed once.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_list = keys_sub.add_parser("list", help="The configured and stored keys (never the keys themselves).")
    keys_list.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    keys_add = keys_sub.add_parser("add", help="Add a key for a principal and print it (shown once).")
    keys_add.add_argument("name", help="The principal: letters, digits and . _ @ + - (a user key's name is its user).")
    keys_add.add_argument("--role", required=True, choices=("user", "frontend", "admin"), help="The principal's role.")
    keys_add.add_argument("--json", action="store_true", help="Print the new key's record as JSON.")
    keys_revoke = keys_sub.add_parser("revoke", help="Revoke a stored key by id (alignd keys list shows the ids).")
    keys_revoke.add_argument("id", help="The key's id.")
    keys_sub.add_parser("generate", help="Print a random key and its sha256: digest, for --key (no server needed).")
    for action in (keys_list, keys_add, keys_revoke):
        action.add_argument("--url", default=os.environ.get("ALIGND_URL", "http://127.0.0.1:8000"),
                            help="The alignd server (env ALIGND_URL; default http://127.0.0.1:8000).")
        action.add_argument("--admin-key", dest="admin_key", default=_first_key("ALIGND_ADMIN_KEY"),
                            help="Admin key (env ALIGND_ADMIN_KEY).")
    keys.set_defaults(func=cmd_keys)

    policies = sub.add_parser(
        "policies", help="List policy versions, promote or roll back, read an evaluation, run a canary (admin key).",
        description="Policy versions of a running server. A candidate that passed the offline gate goes on canary "
                    "(--canary-share of users) until the live test promotes or rejects it; an operator can start, "
                    "re-share, stop, promote or reject a canary at any time. See docs/training.md.")
    policies_sub = policies.add_subparsers(dest="policies_command", required=True, metavar="ACTION")
    policy_actions = [policies_sub.add_parser("list", help="Every version, newest first.")]
    for name, help_ in (("promote", "Serve VERSION as the model name from now on."),
                        ("evaluation", "The offline gate's figures and the live test's, with their bounds."),
                        ("canary", "Put candidate VERSION on canary, or change the running canary's share."),
                        ("canary-promote", "End the canary VERSION: promote it."),
                        ("canary-reject", "End the canary VERSION: reject it (it serves nothing more)."),
                        ("canary-stop", "End the canary VERSION without a verdict (back to candidate).")):
        action = policies_sub.add_parser(name, help=help_)
        action.add_argument("version", type=int, help="The policy version.")
        policy_actions.append(action)
        if name == "canary":
            action.add_argument("--share", type=float, default=None,
                                help="Share of users in (0, 1) (default: the server's --canary-share).")
            action.add_argument("--side-by-side", dest="side_by_side", action=argparse.BooleanOptionalAction,
                                default=None, help="Requests for several choices are blind side-by-sides.")
    rollback = policies_sub.add_parser("rollback", help="Restore VERSION, or the previously promoted one.")
    rollback.add_argument("version", type=int, nargs="?", default=None, help="The policy version.")
    policy_actions.append(rollback)
    for action in policy_actions:
        action.add_argument("--url", default=os.environ.get("ALIGND_URL", "http://127.0.0.1:8000"),
                            help="The alignd server (env ALIGND_URL; default http://127.0.0.1:8000).")
        action.add_argument("--admin-key", dest="admin_key", default=_first_key("ALIGND_ADMIN_KEY"),
                            help="Admin key (env ALIGND_ADMIN_KEY).")
        action.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    policies.set_defaults(func=cmd_policies)

    users = sub.add_parser(
        "users", help="Show or delete what a running server stores of an end user; trust or block one (admin key).",
        description="An end user is the 'user' of chat and feedback requests (a user key's principal name). "
                    "Deleting one removes its completions with their choices, every feedback event on them and "
                    "those events' preference pairs and labels, and its feedback on other completions: from the "
                    "database only (see docs/privacy.md for what it cannot reach). Training runs flag users whose "
                    "judgements disagree with everyone else's far beyond chance; an operator can trust them "
                    "(never flagged) or block them (their feedback is kept but never trained on); see "
                    "docs/training.md.")
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    users_show = users_sub.add_parser("show", help="Rows stored of the user, per table (exit 1 when none).")
    users_delete = users_sub.add_parser("delete", help="Delete every row of the user; print how many per table.")
    users_list = users_sub.add_parser("list", help="Users flagged by a run or given a trust state, flagged first.")
    users_list.add_argument("--flagged", action="store_true", default=None, help="Only the flagged users.")
    users_list.add_argument("--trust", choices=("default", "trusted", "blocked"), default=None,
                            help="Only the users in this trust state.")
    users_trust = users_sub.add_parser("trust", help="Set a user's trust state: trusted, blocked or default.")
    for action in (users_show, users_delete, users_trust):
        action.add_argument("user", help="The end user's id, as chat and feedback requests named it.")
    for action in (users_show, users_delete):
        action.add_argument("--principal", default=None,
                            help="Only the rows made with this principal's keys (e.g. one frontend's users).")
    users_trust.add_argument("state", choices=("default", "trusted", "blocked"),
                             help="trusted: never flagged; blocked: feedback kept but never trained on.")
    users_trust.add_argument("--note", default=None, help="Why (kept with the state).")

    retention = sub.add_parser(
        "retention", help="Run a retention pass on a running server now (admin key).",
        description="Delete the completions older than --older-than-days (default: the server's --retain-days) "
                    "with their choices, the feedback on them and its preference pairs and labels.")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True, metavar="ACTION")
    retention_run = retention_sub.add_parser("run", help="Delete what is older than the retention period, now.")
    retention_run.add_argument("--older-than-days", dest="older_than_days", type=int, default=None,
                               help="Days (at least 1); default: the server's --retain-days.")
    for action in (users_show, users_delete, users_list, users_trust, retention_run):
        action.add_argument("--json", action="store_true", help="Print JSON instead of a sentence.")
        action.add_argument("--url", default=os.environ.get("ALIGND_URL", "http://127.0.0.1:8000"),
                            help="The alignd server (env ALIGND_URL; default http://127.0.0.1:8000).")
        action.add_argument("--admin-key", dest="admin_key", default=_first_key("ALIGND_ADMIN_KEY"),
                            help="Admin key (env ALIGND_ADMIN_KEY).")
    users.set_defaults(func=cmd_users)
    retention.set_defaults(func=cmd_retention)

    train = sub.add_parser(
        "train", help="Start a training run on the running server now and follow it with a progress bar.",
        description="POST /v1/training/runs with the admin key, then follow the run's phase and figures until it "
                    "ends. Exit status 0 when it succeeded, 1 when it failed, 2 when it could not start.")
    train.add_argument("--url", default=os.environ.get("ALIGND_URL", "http://127.0.0.1:8000"),
                       help="The alignd server (env ALIGND_URL; default http://127.0.0.1:8000).")
    train.add_argument("--admin-key", dest="admin_key", default=_first_key("ALIGND_ADMIN_KEY"),
                       help="Admin key (env ALIGND_ADMIN_KEY).")
    train.add_argument("--iterations", type=int, default=None, help="PPO iterations (default: the server's).")
    train.add_argument("--rollout-batch-size", dest="rollout_batch_size", type=int, default=None,
                       help="Prompts per PPO iteration (default: the server's).")
    train.add_argument("--time-limit", dest="time_limit_s", type=float, default=None,
                       help="Seconds of PPO at most (default: the server's).")
    train.add_argument("--objective", choices=("ppo", "grpo", "rloo", "online-dpo", "kto"), default=None,
                       help="The run's training objective (default: the server's --objective).")
    train.add_argument("--no-promote", dest="promote", action="store_false",
                       help="Keep the candidate unpromoted even if it passes the gate.")
    train.add_argument("--detach", dest="wait", action="store_false", help="Print the run id and return at once.")
    train.set_defaults(func=cmd_train)

    simulate = sub.add_parser(
        "simulate", help="Simulated users who prefer one reply style or trait chat and give feedback.",
        description="Simulated users ask prompts for 2-4 replies, label them and rank, compare or thumb them by a "
                    "preferred demo style (demo-corpus prompts, the corpus classifier) or a rule-checked trait "
                    "(everyday prompts, any chat model); prints the preferred share per policy version as it goes, "
                    "and a table at the end. Ctrl-C stops and prints the table.")
    _add_client_arguments(simulate)
    simulate.add_argument("--admin-key", dest="admin_key", default=_first_key("ALIGND_ADMIN_KEY"),
                          help="Admin key, to add each version's training run figures (env ALIGND_ADMIN_KEY).")
    simulate.add_argument("--prefer", required=True, choices=(*STYLES, *TRAITS),
                          help="What the users prefer: a demo style (" + ", ".join(STYLES) + ") or a trait ("
                               + "; ".join(f"{t.name}: {t.description}" for t in TRAITS.values()) + ").")
    simulate.add_argument("--requests", type=int, default=None,
                          help="Stop after this many requests (default: no bound; Ctrl-C or --time-limit).")
    simulate.add_argument("--time-limit", dest="time_limit_s", type=float, default=None,
                          help="Stop starting requests after this many seconds.")
    simulate.add_argument("--seed", type=int, default=0, help="Seed of the users' choices (prompts, n, kinds).")
    simulate.add_argument("--concurrency", type=int, default=4, help="Users asking at the same time.")
    simulate.add_argument("--report-every", dest="report_every", type=int, default=50,
                          help="Print a progress line every this many requests.")
    simulate.add_argument("--prompts", choices=("training", "held-out"), default="training",
                          help="Ask the training-side prompts (default) or the held-out ones.")
    simulate.add_argument("--max-tokens", dest="max_tokens", type=int, default=256, help="Longest reply in tokens.")
    simulate.set_defaults(func=cmd_simulate)
    return parser


def _first_key(variable: str) -> str | None:
    # The server reads these variables as comma-separated lists; a client sends one key.
    return os.environ.get(variable, "").split(",")[0].strip() or None


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("ALIGND_URL", "http://127.0.0.1:8000"),
                        help="The alignd server (env ALIGND_URL; default http://127.0.0.1:8000).")
    parser.add_argument("--api-key", dest="api_key", default=_first_key("ALIGND_API_KEY"),
                        help="API key, sent as 'Authorization: Bearer <key>' (env ALIGND_API_KEY).")


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat in the terminal (or over a pipe)."""
    from alignd.clients.terminal import main as chat_main

    return chat_main(url=args.url, api_key=args.api_key, model=args.model, temperature=args.temperature,
                     max_tokens=args.max_tokens, system=args.system)


def cmd_keys(args: argparse.Namespace) -> int:
    """List, add, revoke or generate API keys."""
    from alignd.clients import keys

    if args.keys_command == "generate":
        return keys.generate_key()
    if args.keys_command == "list":
        return keys.list_keys(url=args.url, admin_key=args.admin_key, as_json=args.json)
    if args.keys_command == "add":
        return keys.add_key(url=args.url, admin_key=args.admin_key, name=args.name, role=args.role,
                            as_json=args.json)
    return keys.revoke_key(url=args.url, admin_key=args.admin_key, key_id=args.id)


def cmd_policies(args: argparse.Namespace) -> int:
    """Policy versions: list, promote, roll back, evaluation, canary."""
    from alignd.clients import policies

    common = {"url": args.url, "admin_key": args.admin_key, "as_json": args.json}
    if args.policies_command == "list":
        return policies.list_policies(**common)
    if args.policies_command == "evaluation":
        return policies.evaluation(version=args.version, **common)
    if args.policies_command == "canary" and args.share is not None and not 0 < args.share < 1:
        print("alignd policies: --share must be in (0, 1)", file=sys.stderr)
        return 2
    return policies.act(action=args.policies_command, version=args.version,
                        share=getattr(args, "share", None), side_by_side=getattr(args, "side_by_side", None),
                        **common)


def cmd_users(args: argparse.Namespace) -> int:
    """Show or delete an end user's stored rows; list users by trust; set one's trust state."""
    from alignd.clients import privacy

    if args.users_command == "list":
        return privacy.list_users(url=args.url, admin_key=args.admin_key, flagged=args.flagged, trust=args.trust,
                                  as_json=args.json)
    if args.users_command == "trust":
        return privacy.set_trust(url=args.url, admin_key=args.admin_key, user=args.user, trust=args.state,
                                 note=args.note, as_json=args.json)
    action = privacy.show_user if args.users_command == "show" else privacy.delete_user
    return action(url=args.url, admin_key=args.admin_key, user=args.user, principal=args.principal,
                  as_json=args.json)


def cmd_retention(args: argparse.Namespace) -> int:
    """Run a retention pass now."""
    from alignd.clients import privacy

    if args.older_than_days is not None and args.older_than_days < 1:
        print("alignd retention: --older-than-days must be at least 1", file=sys.stderr)
        return 2
    return privacy.run_retention(url=args.url, admin_key=args.admin_key, older_than_days=args.older_than_days,
                                 as_json=args.json)


def cmd_train(args: argparse.Namespace) -> int:
    """Start a training run and follow it."""
    from alignd.clients.train import main as train_main

    return train_main(url=args.url, admin_key=args.admin_key, iterations=args.iterations,
                      rollout_batch_size=args.rollout_batch_size, time_limit_s=args.time_limit_s,
                      promote=args.promote, wait=args.wait, objective=args.objective)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run simulated users."""
    from alignd.clients.simulate import main as simulate_main

    if (args.requests is not None and args.requests < 1) or args.concurrency < 1 or args.report_every < 1:
        print("alignd simulate: --requests, --concurrency and --report-every must be at least 1", file=sys.stderr)
        return 2
    return simulate_main(url=args.url, api_key=args.api_key, admin_key=args.admin_key, prefer=args.prefer,
                         requests=args.requests, time_limit_s=args.time_limit_s, seed=args.seed,
                         concurrency=args.concurrency, report_every=args.report_every, prompts=args.prompts,
                         max_tokens=args.max_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"alignd: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
