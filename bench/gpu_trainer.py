"""GPU check of the trainer: reward-model and PPO steps on CUDA in bfloat16 with a model of the demo's architecture
scaled to about 100M parameters; prints step times and peak memory. vLLM is not needed (rollouts use the `generate`
switch), so this runs on a machine with only torch, transformers and peft.

    python bench/gpu_trainer.py                 # CUDA, bf16, ~100M parameters
    python bench/gpu_trainer.py --device cpu --hidden 256 --layers 4   # a quick smoke run on CPU
    python bench/gpu_trainer.py --processes 4   # data parallel over 4 GPUs (NCCL), as --trainer-processes 4

With ``--processes N`` the steps run on N ranks (:mod:`alignd.trainer.distributed`, one GPU each, gloo on the CPU),
each on its share of every minibatch; rank 0 generates the rollouts and prints. Compare the step times with N = 1.

The model is random (built from the demo tokenizer and a scaled Llama config): the check is about speed and memory,
not quality.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root

from bench.harness import demo_model


def build_model(out: Path, hidden: int, layers: int, tokenizer_dir: Path) -> int:
    """A random Llama of the demo's shape family (head_dim 64) saved in Hugging Face format; returns its size."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1, help="Ranks (one GPU each), as --trainer-processes.")
    parser.add_argument("--tokenizer", type=Path, default=None, help="A demo model folder (for its tokenizer); "
                        "default: the cached demo model, built if missing.")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu for a smoke run")
    if args.device == "cuda" and args.processes > torch.cuda.device_count():
        raise SystemExit(f"--processes {args.processes} needs as many GPUs; {torch.cuda.device_count()} visible")
    tokenizer_dir = args.tokenizer or demo_model("tiny")
    folder = Path(tempfile.mkdtemp(prefix="alignd-gpu-"))
    size = build_model(folder, args.hidden, args.layers, tokenizer_dir)
    print(f"model: {size / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} layers, device {args.device}, "
          f"{args.processes} process(es)")
    if args.processes == 1:
        measure(0, 1, 0, args, folder)
        return 0
    import multiprocessing

    from alignd.trainer.distributed import free_port

    ctx, port = multiprocessing.get_context("spawn"), free_port()
    ranks = [ctx.Process(target=measure, args=(r, args.processes, port, args, folder)) for r in range(args.processes)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    return max(abs(process.exitcode or 0) for process in ranks)


def measure(rank: int, world: int, port: int, args: argparse.Namespace, folder: Path) -> None:
    """The reward-model and PPO steps as rank ``rank`` of ``world`` (1: no process group); rank 0 prints."""
    import torch

    from alignd.demo.corpus import generate_corpus, training_prompts
    from alignd.store.records import PreferencePair
    from alignd.trainer import distributed
    from alignd.trainer.config import TrainerConfig
    from alignd.trainer.job import RunJob
    from alignd.trainer.models import load_stack
    from alignd.trainer.ppo import run_ppo
    from alignd.trainer.reward_model import train_reward_model
    from alignd.trainer.rollout import HFRollouts, encode_prompt

    config = TrainerConfig(device=args.device, dtype="auto", seed=0)
    if world > 1:
        job = RunJob(run_id="bench", base_model=str(folder), database_url="", run_dir=str(folder), parent=0,
                     parent_adapter=None, config=config, threads=torch.get_num_threads())
        distributed.init_ranks(job, rank, world, port)  # config.device becomes this rank's card
    say = print if rank == 0 else (lambda *_: None)
    config.reward.batch_size, config.reward.epochs = 32, 1
    config.ppo.iterations, config.ppo.rollout_batch_size = args.iterations, args.batch
    config.ppo.max_new_tokens, config.ppo.minibatch_size = args.max_new_tokens, 16
    stack = load_stack(folder, config)
    say(f"dtype {next(stack.causal_lm.parameters()).dtype}")
    rng = random.Random(0)
    corpus = generate_corpus(args.pairs * 2, seed=1)
    pairs = [PreferencePair(prompt=[{"role": "user", "content": a.prompt}], chosen=a.reply, rejected=b.reply)
             for a, b in zip(corpus[::2], corpus[1::2], strict=False)][:args.pairs]
    rng.shuffle(pairs)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    tick = time.monotonic()
    figures = train_reward_model(stack, [[p] for p in pairs], config.reward, config.lora, seed=0)
    sync()
    rm_seconds = time.monotonic() - tick
    say(f"reward model: {figures.steps} steps of {config.reward.batch_size} pairs in {rm_seconds:.2f} s "
          f"({rm_seconds / max(1, figures.steps) * 1000:.0f} ms/step)")
    prompts = [encode_prompt(stack.tokenizer, [{"role": "user", "content": p.text}], 128)
               for p in training_prompts(256, seed=2)]
    rollouts = distributed.shared_rollouts(HFRollouts(batch_size=args.batch) if rank == 0 else None)
    history = run_ppo(stack, rollouts, prompts, figures.normalization, config).history
    for h in history:
        say(f"ppo iteration {h.iteration}: rollout {h.seconds['rollout']:.2f} s, experience "
              f"{h.seconds['experience']:.2f} s, update {h.seconds['update']:.2f} s, "
              f"{h.tokens_per_s:.0f} generated tokens/s")
    if args.device == "cuda":
        say(f"peak CUDA memory (rank 0): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
            f"({torch.cuda.get_device_name()})")
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
