"""GPU check of the trainer: reward-model and PPO steps on CUDA in bfloat16 with a model of the demo's architecture
scaled to about 100M parameters; prints step times and peak memory. vLLM is not needed (rollouts use the `generate`
switch), so this runs on a machine with only torch, transformers and peft.

    python bench/gpu_trainer.py                 # CUDA, bf16, ~100M parameters
    python bench/gpu_trainer.py --device cpu --hidden 256 --layers 4   # a quick smoke run on CPU

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
    parser.add_argument("--tokenizer", type=Path, default=None, help="A demo model folder (for its tokenizer); "
                        "default: the cached demo model, built if missing.")
    args = parser.parse_args()

    import torch

    from alignd.demo.corpus import generate_corpus, training_prompts
    from alignd.store.records import PreferencePair
    from alignd.trainer.config import TrainerConfig
    from alignd.trainer.models import load_stack
    from alignd.trainer.ppo import run_ppo
    from alignd.trainer.reward_model import train_reward_model
    from alignd.trainer.rollout import HFRollouts, encode_prompt

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu for a smoke run")
    tokenizer_dir = args.tokenizer or demo_model("tiny")
    folder = Path(tempfile.mkdtemp(prefix="alignd-gpu-"))
    size = build_model(folder, args.hidden, args.layers, tokenizer_dir)
    print(f"model: {size / 1e6:.1f}M parameters, hidden {args.hidden}, {args.layers} layers, device {args.device}")

    config = TrainerConfig(device=args.device, dtype="auto", seed=0)
    config.reward.batch_size, config.reward.epochs = 32, 1
    config.ppo.iterations, config.ppo.rollout_batch_size = args.iterations, args.batch
    config.ppo.max_new_tokens, config.ppo.minibatch_size = args.max_new_tokens, 16
    stack = load_stack(folder, config)
    print(f"dtype {next(stack.causal_lm.parameters()).dtype}")
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
    print(f"reward model: {figures.steps} steps of {config.reward.batch_size} pairs in {rm_seconds:.2f} s "
          f"({rm_seconds / max(1, figures.steps) * 1000:.0f} ms/step)")
    prompts = [encode_prompt(stack.tokenizer, [{"role": "user", "content": p.text}], 128)
               for p in training_prompts(256, seed=2)]
    history = run_ppo(stack, HFRollouts(batch_size=args.batch), prompts,
                      figures.normalization, config).history
    for h in history:
        print(f"ppo iteration {h.iteration}: rollout {h.seconds['rollout']:.2f} s, experience "
              f"{h.seconds['experience']:.2f} s, update {h.seconds['update']:.2f} s, "
              f"{h.tokens_per_s:.0f} generated tokens/s")
    if args.device == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
              f"({torch.cuda.get_device_name()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
