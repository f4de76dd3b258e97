"""PPO benchmark: alignd's PPO with rollouts from the vLLM engine and with Hugging Face `generate` in the trainer,
and its peer, TRL 1.9.2's PPO (bench/trl_peer.py, in its own process), on the same model, prompts and settings, in
one run; samples/s side by side and seconds per phase (rollout, experience, update).

Goals: alignd >= 1.5x TRL's samples/s on SmolLM2-135M-Instruct with equal trainer threads (issue "The loop learns
on a real model"); vLLM rollouts >= 2x faster than `generate` (issue "Embedded RLHF trainer").

    .venv/bin/python bench/ppo.py [--model FOLDER] [--iterations 2] [--batch 32] [--max-new-tokens 64] [--threads 2]

alignd's runs start from the same fresh policy and the same reward model, so they do the same work; the engine runs
in this process on a background event loop, as in the server. Its trainer uses its default precision (bfloat16
compute on a CPU with bfloat16 instructions); TRL trains its weights in the checkpoint's dtype (transformers' default:
bfloat16 for SmolLM2's folder, float32 for the demo model), and also with bfloat16 autocast with --peer-bf16.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from bench.harness import demo_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="Rollouts per iteration.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each trainer (alignd's and TRL's).")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="Skip TRL's run.")
    parser.add_argument("--peer-bf16", action="store_true", help="Also run TRL with bfloat16 mixed precision.")
    parser.add_argument("--pairs", type=int, default=256, help="Synthetic preference pairs for the reward model.")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--random-model", metavar="HIDDEN,LAYERS", default=None,
                        help="Use a random model of the demo's architecture at this size instead of the demo model "
                        "(e.g. 512,8): shows how the comparison moves with model size.")
    args = parser.parse_args()

    import torch

    from alignd.config import EngineSettings
    from alignd.demo.corpus import generate_corpus, training_prompts
    from alignd.engine.vllm_engine import VLLMEngine
    from alignd.store.records import PreferencePair
    from alignd.trainer.config import TrainerConfig
    from alignd.trainer.models import POLICY, load_stack
    from alignd.trainer.ppo import run_ppo
    from alignd.trainer.reward_model import fit_normalization, train_reward_model
    from alignd.trainer.rollout import HFRollouts, Sampling, VLLMRollouts, encode_prompt

    torch.set_num_threads(args.threads)
    model = str(args.model or demo_model())
    if args.random_model:
        import tempfile

        from bench.gpu_trainer import build_model

        hidden, layers = (int(x) for x in args.random_model.split(","))
        folder = Path(tempfile.mkdtemp(prefix="alignd-bench-ppo-"))
        size = build_model(folder, hidden, layers, Path(model))
        model = str(folder)
        print(f"random model: {size / 1e6:.1f}M parameters (hidden {hidden}, {layers} layers)")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    print("starting the engine…", flush=True)
    engine = asyncio.run_coroutine_threadsafe(VLLMEngine.start(model, EngineSettings(
        max_model_len=512, kv_cache_space_gib=1, max_loras=2, max_lora_rank=8)), loop).result()

    # A reward model that prefers "friendly" replies, from the corpus (same for both runs).
    config = TrainerConfig(seed=0)
    config.ppo.iterations, config.ppo.rollout_batch_size = args.iterations, args.batch
    config.ppo.max_new_tokens = args.max_new_tokens
    rng = random.Random(0)
    by_prompt: dict[str, dict[str, str]] = {}
    for d in generate_corpus(args.pairs * 4, seed=1):
        by_prompt.setdefault(d.prompt, {})[d.style] = d.reply
    pairs = [PreferencePair(prompt=[{"role": "user", "content": p}], chosen=s["friendly"],
                        rejected=s[rng.choice([k for k in s if k != "friendly"])])
             for p, s in by_prompt.items() if "friendly" in s and len(s) > 1][:args.pairs]
    stack = load_stack(model, config)
    tick = time.monotonic()
    rm = train_reward_model(stack, [[p] for p in pairs], config.reward, config.lora, seed=0)
    rm_seconds = time.monotonic() - tick
    prompts = [encode_prompt(stack.tokenizer, [{"role": "user", "content": p.text}], 256)
               for p in training_prompts(256, seed=2)]
    vllm_backend = VLLMRollouts(engine, loop=loop)
    reference = vllm_backend.generate(stack, prompts[:64], None, Sampling(1.0, args.max_new_tokens))
    rm.normalization = fit_normalization(stack, reference)
    print(f"reward model: {len(pairs)} pairs, held-out accuracy {rm.heldout_accuracy:.3f}, {rm_seconds:.1f} s")
    initial = {k: v.clone() for k, v in stack.model.state_dict().items() if f".{POLICY}." in k}

    results = {}
    for name, backend in (("vllm", vllm_backend), ("hf generate", HFRollouts(batch_size=args.batch))):
        stack.model.load_state_dict(initial, strict=False)  # the same starting policy for both
        tick = time.monotonic()
        history = run_ppo(stack, backend, prompts, rm.normalization, config).history
        total = time.monotonic() - tick
        rollout_s = sum(h.seconds["rollout"] for h in history)
        samples = args.batch * len(history)
        results[name] = (samples / rollout_s, samples / total, history, total)
        print(f"{name}: rollout {samples / rollout_s:.1f} samples/s, whole iteration {samples / total:.2f} "
              f"samples/s, mean reply {sum(h.response_length for h in history) / len(history):.1f} tokens",
              flush=True)

    what = (f"random model {args.random_model}" if args.random_model else
            Path(model).name if args.model else "demo model")
    print(f"\nPPO, {what}, {args.iterations} iterations × {args.batch} rollouts, max {args.max_new_tokens} new "
          f"tokens, {args.threads} trainer thread(s)")
    print(f"{'rollouts':<12} {'rollout samples/s':>18} {'iteration samples/s':>20} "
          f"{'rollout s':>10} {'experience s':>13} {'update s':>9}")
    for name, (rollout_rate, total_rate, history, _) in results.items():
        phase = {k: sum(h.seconds[k] for h in history) / len(history) for k in ("rollout", "experience", "update")}
        print(f"{name:<12} {rollout_rate:>18.1f} {total_rate:>20.2f} {phase['rollout']:>10.2f} "
              f"{phase['experience']:>13.2f} {phase['update']:>9.2f}")
    speedup = results["vllm"][0] / results["hf generate"][0]
    print(f"\nvLLM / generate rollout speed: {speedup:.2f}x (goal >= 2x); whole-iteration speed "
          f"{results['vllm'][1] / results['hf generate'][1]:.2f}x; reward model fit {rm_seconds:.1f} s")
    engine.shutdown()
    if args.peer:
        peers = dict([run_peer(model, args, bf16=False)])
        if args.peer_bf16:
            peers.update([run_peer(model, args, bf16=True)])
        print(f"\n{'trainer':<22} {'samples/s':>10} {'alignd (vLLM) / it':>19} {'alignd (generate) / it':>23}")
        for name, (_, rate, _, _) in results.items():
            print(f"{'alignd, ' + name:<22} {rate:>10.3f}")
        for name, rate in peers.items():
            print(f"{name:<22} {rate:>10.3f} {results['vllm'][1] / rate:>18.2f}x "
                  f"{results['hf generate'][1] / rate:>22.2f}x")
        print("goal: alignd >= 1.5x TRL's samples/s with equal trainer threads")
    return 0


def run_peer(model: str, args: argparse.Namespace, *, bf16: bool) -> tuple[str, float]:
    """``(name, samples/s)`` of TRL on the same model and settings, from bench/trl_peer.py in its own process; the
    name says the dtype its weights trained in (the checkpoint's, transformers' default) and any autocast."""
    import json
    import subprocess

    command = [sys.executable, str(Path(__file__).with_name("trl_peer.py")), "--model", model,
               "--iterations", str(args.iterations), "--batch", str(args.batch), "--max-new-tokens",
               str(args.max_new_tokens), "--threads", str(args.threads), *(["--bf16"] if bf16 else [])]
    print(f"running TRL's PPO{' (bfloat16)' if bf16 else ''}…", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    name = f"TRL {result['weights']}" + (" + bf16 autocast" if bf16 else "")
    return name, float(result["samples_per_s"])


if __name__ == "__main__":
    sys.exit(main())
