"""Serving throughput and latency: alignd vs vLLM's own OpenAI server, on the same model and engine settings.

    python bench/serving.py --model DIR [--concurrency 1 16 64] [--requests-per-level 256] [--duration-s 30]
                            [--max-tokens 64] [--kv-cache-space-gib 2] [--rounds 1] [--out docs/benchmarks.md]

One server at a time (this is meant for small machines): alignd (``python -m alignd.cli serve``) first, then
``python -m vllm.entrypoints.openai.api_server`` with the engine arguments alignd gives vLLM (``engine_args()`` in
``server/engine/vllm_engine.py``); with ``--rounds N`` each is started N times in alternating order and the table
shows each level's best round. Each start gets uncounted warm-up requests (as many at once as the largest
concurrency), then a closed-loop load per (mode, concurrency):
C workers, each sending its next request as soon as the previous one finished, until ``--requests-per-level``
requests were sent or ``--duration-s`` passed. Every request asks for exactly ``--max-tokens`` tokens
(``ignore_eos``, temperature 0.7), with the same prompts in the same order on both servers. Any non-200 answer,
transport error or stream without ``[DONE]`` counts as an error and is reported.

The servers (and their engine processes) are stopped on exit, on Ctrl-C and on SIGTERM.

CPU time per request of each server's HTTP process and engine processes is reported too, with how busy the rest
of the machine was during each level: on a shared machine, wait for it to be idle (``--quiet-wait-s``) or run the
benchmark (the servers inherit it) ahead of other work, e.g. ``nice -n -10 python bench/serving.py ...`` as root.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from bench.harness import (
    BUSY_MACHINE_CORES,
    ServerProcess,
    ServerSpec,
    alignd_spec,
    free_port,
    machine_info,
    run_benchmark,
    wait_for_quiet,
)
from bench.load import (
    RequestResult,
    closed_loop,
    markdown_table,
    percentile,
    post_chat,
    stream_chat,
    write_section,
)

SECTION_TITLE = "## Serving: alignd vs vLLM's OpenAI server"
SERVED_NAME = "alignd"
MODES = ("non-stream", "stream")
TEMPERATURE = 0.7

# Short user messages, sent round-robin in the same order to both servers.
PROMPTS: tuple[str, ...] = (
    "Hi! How are you today?",
    "Can you give me a quick tip for cooking rice?",
    "What is a good way to start learning to run?",
    "Tell me something about the ocean.",
    "How do I keep houseplants alive?",
    "Any advice for a job interview tomorrow?",
    "What should I pack for a weekend hike?",
    "Explain budgeting in simple words.",
    "How can I sleep better?",
    "What is a fun thing to do on a rainy day?",
    "Recommend a way to practise a new language.",
    "How do I fix a squeaky door?",
    "What makes a good cup of coffee?",
    "Help me plan a short trip to the mountains.",
    "How do I stay focused while studying?",
    "What is the best way to water a garden?",
)


# --- servers -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineConfig:
    """The engine settings both servers get (alignd's defaults, as ``engine_args()`` passes them to vLLM)."""

    model: str
    max_model_len: int
    kv_cache_space_gib: int
    dtype: str
    max_num_seqs: int
    max_loras: int
    max_lora_rank: int
    seed: int
    gpu_memory_utilization: float


def alignd_server(cfg: EngineConfig, port: int, workdir: Path) -> ServerSpec:
    """``alignd serve`` on the model, with its database in ``workdir``."""
    flags = [
        "--max-model-len", str(cfg.max_model_len), "--kv-cache-space-gib", str(cfg.kv_cache_space_gib),
        "--dtype", cfg.dtype, "--max-num-seqs", str(cfg.max_num_seqs), "--max-loras", str(cfg.max_loras),
        "--max-lora-rank", str(cfg.max_lora_rank), "--seed", str(cfg.seed),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
    ]  # fmt: skip
    return alignd_spec(cfg.model, port, workdir / "alignd-data", flags, cwd=workdir)


def vllm_server(cfg: EngineConfig, port: int, workdir: Path) -> ServerSpec:
    """vLLM's OpenAI server with the engine arguments alignd uses (see ``engine_args()``)."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", cfg.model, "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(cfg.max_model_len), "--dtype", cfg.dtype, "--max-num-seqs", str(cfg.max_num_seqs),
        "--enforce-eager", "--enable-lora", "--max-loras", str(cfg.max_loras),
        "--max-lora-rank", str(cfg.max_lora_rank), "--seed", str(cfg.seed),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--disable-uvicorn-access-log",  # alignd runs uvicorn with access_log=False
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_space_gib)}  # what alignd's --kv-cache-space-gib sets
    return ServerSpec("vLLM", argv, env, "/health", port, workdir)


# --- load ----------------------------------------------------------------------------------------------------------


@dataclass
class LevelResult:
    """One (server, mode, concurrency) run."""

    server: str
    mode: str
    concurrency: int
    elapsed_s: float
    results: list[RequestResult] = field(default_factory=list)
    round: int = 1
    """Which round of ``--rounds`` it was measured in."""
    frontend_cpu_s: float = math.nan
    """CPU seconds the server's HTTP process (API, tokenizer, engine client) used during the level."""
    engine_cpu_s: float = math.nan
    """CPU seconds its engine processes (vLLM engine core and workers) used during the level."""
    background_cpu_s: float = math.nan
    """CPU seconds used during the level by processes that are neither the server nor this benchmark."""

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> list[RequestResult]:
        return [r for r in self.results if not r.ok]

    @property
    def requests_per_s(self) -> float:
        return len(self.ok) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.elapsed_s if self.elapsed_s else 0.0

    def latency(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok], q)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok if r.ttft_s is not None], q)

    @property
    def background_cores(self) -> float:
        """Cores kept busy by other processes of the machine during the level, on average."""
        return self.background_cpu_s / self.elapsed_s if self.elapsed_s else math.nan

    def cpu_ms_per_request(self, seconds: float) -> float:
        """``seconds`` of CPU spread over the successful requests, in milliseconds."""
        return seconds * 1000.0 / len(self.ok) if self.ok else math.nan

    def short(self, max_tokens: int) -> int:
        """Successful requests that did not generate exactly ``max_tokens`` tokens."""
        return sum(1 for r in self.ok if r.tokens != max_tokens)


def request_body(index: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    """The ``index``-th request of a level: the same on both servers."""
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": TEMPERATURE,
        "ignore_eos": True,  # vLLM's extra field: every request generates exactly max_tokens
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def run_level(client: httpx.AsyncClient, base_url: str, *, server: str, mode: str, concurrency: int,
                    max_requests: int, duration_s: float, max_tokens: int) -> LevelResult:
    """Closed loop: ``concurrency`` workers until ``max_requests`` were sent or ``duration_s`` passed."""
    url = base_url + "/v1/chat/completions"
    stream = mode == "stream"
    send = stream_chat if stream else post_chat
    started = time.perf_counter()
    deadline = started + duration_s
    results = await closed_loop(
        concurrency, lambda index: send(client, url, request_body(index, max_tokens, stream)),
        keep_going=lambda issued: issued < max_requests and time.perf_counter() < deadline)
    return LevelResult(server, mode, concurrency, time.perf_counter() - started, results)


async def warm_up(client: httpx.AsyncClient, base_url: str, *, requests: int, max_tokens: int) -> list[str]:
    """``requests`` requests at once in each mode, not counted; the errors they met.

    Sent together so that the engine has already run batches as large as the largest level's (the first large
    batches after a start are much slower, on both servers).
    """
    url = base_url + "/v1/chat/completions"
    errors: list[str] = []
    for stream in (False, True):
        send = stream_chat if stream else post_chat
        done = await asyncio.gather(*(send(client, url, request_body(i, max_tokens, stream))
                                      for i in range(requests)))
        errors += [r.error or "" for r in done if not r.ok]
    return errors


async def load_server(base_url: str, *, server: str, concurrency: Sequence[int], modes: Sequence[str],
                      max_requests: int, duration_s: float, max_tokens: int, warmup: int,
                      alive: ServerProcess, quiet_wait_s: float = 0.0) -> list[LevelResult]:
    """Warm-up, then every (mode, concurrency) level against one server."""
    limits = httpx.Limits(max_connections=max(concurrency) + 8, max_keepalive_connections=max(concurrency) + 8)
    timeout = httpx.Timeout(600.0, connect=30.0)
    levels: list[LevelResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if warmup:
            errors = await warm_up(client, base_url, requests=warmup, max_tokens=max_tokens)
            if errors:
                print(f"  warm-up: {len(errors)} errors, e.g. {errors[0]}", file=sys.stderr)
        for mode in modes:
            for c in concurrency:
                alive.check_alive()
                if quiet_wait_s > 0:
                    await wait_for_quiet(quiet_wait_s)
                before = alive.cpu_counters()
                level = await run_level(client, base_url, server=server, mode=mode, concurrency=c,
                                        max_requests=max_requests, duration_s=duration_s, max_tokens=max_tokens)
                used = alive.cpu_counters() - before
                level.frontend_cpu_s, level.engine_cpu_s = used.frontend_s, used.engine_s
                level.background_cpu_s = used.background_s
                ttft = f", TTFT p50 {level.ttft(50) * 1000:.0f} ms" if mode == "stream" else ""
                print(f"  {server:6} {mode:10} c={c:<3} {len(level.results):4} requests in {level.elapsed_s:5.1f}s: "
                      f"{level.requests_per_s:7.2f} req/s {level.tokens_per_s:8.1f} tok/s, "
                      f"p50 {level.latency(50):.3f}s p99 {level.latency(99):.3f}s{ttft}, "
                      f"{len(level.errors)} errors; CPU/request: front-end "
                      f"{level.cpu_ms_per_request(level.frontend_cpu_s):.1f} ms, engine "
                      f"{level.cpu_ms_per_request(level.engine_cpu_s):.1f} ms; other processes "
                      f"{level.background_cores:.2f} cores", flush=True)
                levels.append(level)
    return levels


# --- report ----------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}**" if b else "–"


def _pairs(levels: Sequence[LevelResult], concurrency: Sequence[int],
           modes: Sequence[str]) -> list[tuple[str, int, LevelResult, LevelResult]]:
    """(mode, concurrency, alignd's level, vLLM's level) where both servers ran it, in table order."""
    by_key = {(lv.server, lv.mode, lv.concurrency): lv for lv in levels}
    return [(mode, c, by_key[("alignd", mode, c)], by_key[("vLLM", mode, c)]) for mode in modes for c in concurrency
            if ("alignd", mode, c) in by_key and ("vLLM", mode, c) in by_key]


def results_table(levels: Sequence[LevelResult], concurrency: Sequence[int], modes: Sequence[str]) -> str:
    """Markdown table: alignd and vLLM side by side per (mode, concurrency), with alignd/vLLM ratios."""
    header = ["mode", "conc.", "req/s alignd", "req/s vLLM", "ratio", "tok/s alignd", "tok/s vLLM", "ratio",
              "p50 latency s (alignd / vLLM)", "p99 latency s (alignd / vLLM)", "TTFT p50 ms (alignd / vLLM)",
              "requests (alignd / vLLM)", "errors (alignd / vLLM)"]
    rows = [[mode, str(c), f"{a.requests_per_s:.2f}", f"{v.requests_per_s:.2f}",
             _ratio(a.requests_per_s, v.requests_per_s), f"{a.tokens_per_s:.0f}", f"{v.tokens_per_s:.0f}",
             _ratio(a.tokens_per_s, v.tokens_per_s), f"{_fmt(a.latency(50), 3)} / {_fmt(v.latency(50), 3)}",
             f"{_fmt(a.latency(99), 3)} / {_fmt(v.latency(99), 3)}",
             f"{_fmt(a.ttft(50) * 1000, 0)} / {_fmt(v.ttft(50) * 1000, 0)}" if mode == "stream" else "–",
             f"{len(a.results)} / {len(v.results)}", f"{len(a.errors)} / {len(v.errors)}"]
            for mode, c, a, v in _pairs(levels, concurrency, modes)]
    return markdown_table(header, rows)


def cpu_table(levels: Sequence[LevelResult], concurrency: Sequence[int], modes: Sequence[str]) -> str:
    """Markdown table: CPU milliseconds per request of each server's HTTP process and of its engine processes."""
    header = ["mode", "conc.", "front-end CPU ms/req alignd", "front-end CPU ms/req vLLM", "ratio",
              "engine CPU ms/req alignd", "engine CPU ms/req vLLM", "other processes, cores (alignd / vLLM)"]
    rows = []
    for mode, c, a, v in _pairs(levels, concurrency, modes):
        af, vf = a.cpu_ms_per_request(a.frontend_cpu_s), v.cpu_ms_per_request(v.frontend_cpu_s)
        rows.append([mode, str(c), _fmt(af, 1), _fmt(vf, 1), _fmt(af / vf, 2) if vf else "–",
                     _fmt(a.cpu_ms_per_request(a.engine_cpu_s), 1), _fmt(v.cpu_ms_per_request(v.engine_cpu_s), 1),
                     f"{_fmt(a.background_cores, 2)} / {_fmt(v.background_cores, 2)}"])
    return markdown_table(header, rows)


def rounds_table(levels: Sequence[LevelResult], concurrency: Sequence[int], modes: Sequence[str]) -> str:
    """Markdown table: requests/s of every round, per server, mode and concurrency."""
    rows = []
    for mode in modes:
        for c in concurrency:
            cells = []
            for server in ("alignd", "vLLM"):
                runs = sorted((lv for lv in levels if (lv.server, lv.mode, lv.concurrency) == (server, mode, c)),
                              key=lambda lv: lv.round)
                cells.append(", ".join(f"{lv.requests_per_s:.2f}" for lv in runs) or "–")
            rows.append([mode, str(c), *cells])
    return markdown_table(["mode", "conc.", "req/s alignd, each round", "req/s vLLM, each round"], rows)


def error_notes(levels: Sequence[LevelResult], max_tokens: int) -> list[str]:
    """A line per level with errors, replies not of ``max_tokens`` tokens, or a machine busy with other work."""
    notes = []
    for lv in levels:
        if lv.errors:
            first = lv.errors[0].error
            notes.append(f"{lv.server} {lv.mode} c={lv.concurrency}: {len(lv.errors)} errors, first: {first}")
        if lv.background_cores > BUSY_MACHINE_CORES:
            notes.append(f"{lv.server} {lv.mode} c={lv.concurrency}: other processes kept "
                         f"{lv.background_cores:.2f} cores busy; its figures are unreliable")
        if short := lv.short(max_tokens):
            notes.append(f"{lv.server} {lv.mode} c={lv.concurrency}: {short} replies not of {max_tokens} tokens")
    return notes


def report_markdown(*, table: str, cpu: str, rounds: str, info: dict[str, str], command: str,
                    server_commands: Sequence[str], args: argparse.Namespace, notes: Sequence[str],
                    when: datetime) -> str:
    """The ``## Serving`` section of docs/benchmarks.md."""
    method = textwrap.fill(
        "`bench/serving.py` runs the same closed-loop chat load against alignd and then against vLLM's own OpenAI "
        "server (`python -m vllm.entrypoints.openai.api_server`), one server at a time, on the same model with the "
        "same engine arguments (those `engine_args()` in `server/engine/vllm_engine.py` gives vLLM: LoRA on, eager "
        "mode, the same KV-cache size, dtype, max_num_seqs and seed). At each concurrency C, C workers each send "
        "their next request as soon as the previous one is answered, until "
        f"{args.requests_per_level} requests were sent or {args.duration_s:g} s passed; in-flight requests finish "
        f"and count. Before the levels, {args.warmup} uncounted requests per mode are sent at once. Every request is "
        f"one short user message (16 prompts, round-robin, in the same order on both servers) with "
        f"`max_tokens={args.max_tokens}`, `ignore_eos=true` and temperature {TEMPERATURE}, so every reply is exactly "
        f"{args.max_tokens} tokens. Streams ask for `stream_options.include_usage`. Latency is the whole request; "
        "TTFT is the time to the first non-empty content delta. A ratio below 1 means alignd is slower than plain "
        "vLLM."
        + (f" Each server was started {args.rounds} times, in alternating order (alignd, vLLM, vLLM, alignd, ...); "
           "the tables show, per level, the round with the most requests/s, and the last table every round."
           if args.rounds > 1 else ""), width=120)
    cpu_note = textwrap.fill(
        "CPU per request, from the operating system's counters over each level: *front-end* is the server's HTTP "
        "process (web framework, chat template and tokenizer, vLLM's engine client and detokenizer; for alignd also "
        "the store); *engine* is vLLM's engine-core and worker processes (scheduling and the model); *other "
        "processes* is the average number of cores that anything else on the machine used meanwhile (the load "
        "generator itself excluded), which should be near 0 for the figures to mean much. On a machine with few "
        "cores, expect large run-to-run differences at high concurrency even when it is otherwise idle: vLLM's CPU "
        "backend binds its model worker to some cores and leaves the rest to its engine-core process, which "
        "busy-polls for the worker's results, to the HTTP process and here to the load generator, and where the "
        "kernel places these moves the throughput of either server; compare ratios with the spread between rounds.",
        width=120)
    rounds_block = f"\nRequests/s of every round:\n\n{rounds}\n" if rounds else ""
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    servers = "\n".join(server_commands)
    problems = "\n".join(f"- {n}" for n in notes) if notes else (
        "- none: every request answered 200 with all its tokens, and the machine was otherwise idle")
    return f"""{SECTION_TITLE}

{method}

Measured {when:%Y-%m-%d %H:%M} UTC with

```
{command}
```

{table}

{cpu_note}

{cpu}
{rounds_block}
Errors, short replies, busy machine:
{problems}

Machine:
{machine}

Servers as started:

```
{servers}
```
"""


# --- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="Model directory (or Hugging Face id) both servers serve.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="Concurrent clients.")
    parser.add_argument("--requests-per-level", type=int, default=256, help="Most requests per (mode, concurrency).")
    parser.add_argument("--duration-s", type=float, default=30.0,
                        help="Most seconds a level keeps sending new requests (in-flight ones finish).")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens generated per request (ignore_eos).")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="Response modes to run.")
    parser.add_argument("--servers", nargs="+", choices=("alignd", "vllm"), default=["alignd", "vllm"],
                        help="Servers to run (the table needs both).")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Start each server this many times, alternating the order (A B, B A, ...); the table "
                        "shows each level's best round.")
    parser.add_argument("--warmup", type=int, help="Uncounted warm-up requests per mode, sent at once "
                        "(default: the largest concurrency).")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-space-gib", type=int, default=2, help="CPU KV cache (VLLM_CPU_KVCACHE_SPACE).")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2,
                        help="As alignd passes it on CPU (the KV-cache size comes from --kv-cache-space-gib).")
    parser.add_argument("--quiet-wait-s", type=float, default=0.0,
                        help="Before each level, wait up to this long for other processes to leave the CPUs idle "
                        "(for shared machines; 0: do not wait).")
    parser.add_argument("--startup-timeout-s", type=float, default=600.0)
    parser.add_argument("--log-dir", type=Path, help="Keep the servers' logs here (default: a temporary folder).")
    parser.add_argument("--out", type=Path, help=f"Markdown file whose '{SECTION_TITLE[3:]}' section to write.")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(args.concurrency)
    if min(args.rounds, *args.concurrency, args.requests_per_level, args.max_tokens) < 1 or args.duration_s <= 0:
        parser.error("--rounds, --concurrency, --requests-per-level, --duration-s and --max-tokens must be positive")
    return args


def run(args: argparse.Namespace) -> int:
    """Both servers, one after the other; print the table and write the markdown section."""
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    cfg = EngineConfig(model=model, max_model_len=args.max_model_len, kv_cache_space_gib=args.kv_cache_space_gib,
                       dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_loras=args.max_loras,
                       max_lora_rank=args.max_lora_rank, seed=args.seed,
                       gpu_memory_utilization=args.gpu_memory_utilization)
    niceness = os.getpriority(os.PRIO_PROCESS, 0)  # the servers inherit it
    command = shlex.join([*(["nice", "-n", str(niceness)] if niceness else []), "python", *sys.argv])
    info = machine_info()
    when = datetime.now(UTC)
    print(f"command: {command}")
    for k, v in info.items():
        print(f"{k}: {v}")
    levels: list[LevelResult] = []
    server_commands: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="alignd-bench-serving-") as tmp:
        work = Path(tmp)
        log_dir = args.log_dir or work
        log_dir.mkdir(parents=True, exist_ok=True)
        for round_ in range(args.rounds):
            # A-B, B-A, ...: a machine that gets busier or quieter over time favours neither server.
            for name in args.servers if round_ % 2 == 0 else reversed(args.servers):
                spec = (alignd_server if name == "alignd" else vllm_server)(cfg, free_port(), work)
                server_commands.setdefault(name, spec.command_line())
                print(f"\nround {round_ + 1}/{args.rounds}, starting {spec.name}: {spec.command_line()}", flush=True)
                with ServerProcess(spec, log_dir / f"{name}-{round_ + 1}.log") as server:
                    took = server.wait_ready(args.startup_timeout_s)
                    print(f"  ready after {took:.0f}s", flush=True)
                    ran = asyncio.run(load_server(
                        spec.base_url, server=spec.name, concurrency=args.concurrency, modes=args.modes,
                        max_requests=args.requests_per_level, duration_s=args.duration_s,
                        max_tokens=args.max_tokens, warmup=args.warmup, alive=server,
                        quiet_wait_s=args.quiet_wait_s))
                for level in ran:
                    level.round = round_ + 1
                levels += ran
                print(f"  {spec.name} stopped", flush=True)
    best = best_levels(levels)
    table = results_table(best, args.concurrency, args.modes)
    cpu = cpu_table(best, args.concurrency, args.modes)
    rounds = rounds_table(levels, args.concurrency, args.modes) if args.rounds > 1 else ""
    notes = error_notes(best, args.max_tokens) + spread_notes(levels)
    print(f"\n{table}\n\n{cpu}\n\n{rounds}\n")
    for note in notes:
        print(f"WARNING: {note}")
    if args.out:
        write_section(args.out, SECTION_TITLE, report_markdown(
            table=table, cpu=cpu, info=info, command=command, rounds=rounds,
            server_commands=list(server_commands.values()), args=args, notes=notes, when=when))
        print(f"wrote the '{SECTION_TITLE[3:]}' section of {args.out}")
    return 1 if any(lv.errors for lv in levels) else 0


def best_levels(levels: Sequence[LevelResult]) -> list[LevelResult]:
    """Per (server, mode, concurrency), the round with the most requests/s (least disturbed by other work)."""
    best: dict[tuple[str, str, int], LevelResult] = {}
    for lv in levels:
        key = (lv.server, lv.mode, lv.concurrency)
        if key not in best or lv.requests_per_s > best[key].requests_per_s:
            best[key] = lv
    return list(best.values())


def spread_notes(levels: Sequence[LevelResult]) -> list[str]:
    """With several rounds: how far the same server's requests/s moved between rounds (the noise floor)."""
    runs: dict[tuple[str, str, int], list[float]] = {}
    for lv in levels:
        runs.setdefault((lv.server, lv.mode, lv.concurrency), []).append(lv.requests_per_s)
    spreads = {key: max(v) / min(v) for key, v in runs.items() if len(v) > 1 and min(v) > 0}
    if not spreads:
        return []
    (server, mode, c), worst = max(spreads.items(), key=lambda kv: kv[1])
    return [f"the same server's requests/s differed by up to {worst:.2f}x between rounds ({server} {mode} c={c}); "
            "alignd/vLLM ratios closer to 1 than that are within this machine's run-to-run noise"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
