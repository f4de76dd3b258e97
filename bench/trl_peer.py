"""The peer of bench/ppo.py: TRL 1.9.2's PPO (``trl.experimental.ppo``, the last TRL with PPO; full-parameter policy
and value model, a separate reference and reward model, rollouts with Hugging Face ``generate``) on the same model,
prompts and settings. Run by bench/ppo.py in its own process (its own torch threads, nothing shared), it prints one
JSON line: samples, seconds, samples/s.

    .venv/bin/python bench/trl_peer.py --model FOLDER --iterations 2 --batch 32 --max-new-tokens 64 --threads 2

Needs the ``bench`` extra (``pip install -e '.[bench]'``). The reward and value models are the base with a fresh
score head: the peer is timed, not judged, and their quality does not change the work a PPO step does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.* from the repository root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="Rollouts per iteration.")
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (CPU autocast), like alignd's.")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="Weights' dtype; auto (transformers' default) keeps the checkpoint's: SmolLM2's folder "
                        "is saved in bfloat16, so TRL then trains bfloat16 weights.")
    args = parser.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignd.demo.corpus import training_prompts
    from alignd.trainer.rollout import encode_prompt

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The prompts alignd's run gets: the same corpus draw, rendered by the same chat template.
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p.text}], 256)
               for p in training_prompts(256, seed=2)]
    dataset = Dataset.from_dict({"input_ids": [list(p) for p in prompts]})

    def scorer() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype)

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="alignd-bench-trl-") as out:
        config = PPOConfig(
            output_dir=out, report_to=[], use_cpu=True, bf16=args.bf16, seed=0,
            per_device_train_batch_size=args.batch // args.minibatches, gradient_accumulation_steps=args.minibatches,
            num_mini_batches=args.minibatches, num_ppo_epochs=args.epochs, response_length=args.max_new_tokens,
            local_rollout_forward_batch_size=args.batch, total_episodes=args.iterations * args.batch,
            num_sample_generations=0, stop_token="eos", temperature=1.0, save_strategy="no", logging_steps=10_000,
            dataloader_num_workers=0)
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                             reward_model=scorer(), value_model=scorer(), train_dataset=dataset)
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
    samples = args.iterations * args.batch
    print(json.dumps({"samples": samples, "seconds": round(seconds, 2), "samples_per_s": samples / seconds,
                      "threads": args.threads, "bf16": args.bf16, "weights": str(policy.dtype).removeprefix("torch.")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
