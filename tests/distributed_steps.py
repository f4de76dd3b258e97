"""What each process of tests/test_distributed.py runs: a PPO update and a reward-model fit on fixed inputs, as
rank ``rank`` of ``world`` (1: one process, no process group) with ``strategy`` (ddp, or fsdp: the base sharded), the
trained weights written to ``out``."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignd.store.records import Label, PreferencePair
from alignd.trainer import distributed
from alignd.trainer.config import TrainerConfig
from alignd.trainer.critic_free import CRITIC_FREE, _update, make_group_experience
from alignd.trainer.job import RunJob
from alignd.trainer.models import POLICY, REWARD, load_stack
from alignd.trainer.ppo import init_critic, make_experience, make_optimizer, ppo_update
from alignd.trainer.reward_model import RewardNormalization, train_reward_model
from alignd.trainer.rollout import Rollout


def fixed_rollouts(vocab: int, n: int = 12) -> list[Rollout]:
    """Seeded prompts and replies of different lengths, some ended, some cut."""
    rng = random.Random(7)
    return [Rollout(prompt_ids=[rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))],
                    response_ids=[rng.randrange(3, vocab) for _ in range(rng.randint(2, 8))], ended=i % 3 != 0)
            for i in range(n)]


def fixed_feedback() -> tuple[list[list[PreferencePair]], list[Label]]:
    """Pair groups (a ranking's three pairs among them) and labels: a planted preference for "please"."""
    groups: list[list[PreferencePair]] = []
    for i in range(9):
        prompt = [{"role": "user", "content": f"question number {i}"}]
        if i == 4:  # a 3-way ranking: its pairs share a unit
            groups.append([PreferencePair(prompt=prompt, chosen="yes please", rejected="no", weight=1 / 3),
                           PreferencePair(prompt=prompt, chosen="yes please", rejected="maybe", weight=1 / 3),
                           PreferencePair(prompt=prompt, chosen="maybe", rejected="no", weight=1 / 3)])
        else:
            groups.append([PreferencePair(prompt=prompt, chosen=f"sure, please {i}", rejected=f"go away {i}")])
    labels = [Label(prompt=[{"role": "user", "content": f"label {i}"}], reply=f"reply {i}", good=i % 2 == 0)
              for i in range(5)]
    return groups, labels


def steps(rank: int, world: int, port: int, model_dir: str, out: str, strategy: str = "ddp") -> None:
    """Join the group (world > 1), then one PPO update (2 epochs × 2 minibatches, micro-batches of 2), one GRPO
    update (groups of 4) and one reward-model epoch; writes ``out/rank<rank>.safetensors``, the figures and the share
    of the base this rank held beside it, and rank 0 the policy as a candidate folder (``out/candidate``)."""
    config = TrainerConfig(device="cpu", dtype="float32", seed=3, distributed=strategy)
    config.ppo.minibatch_size, config.ppo.micro_batch_size, config.ppo.epochs = 6, 2, 2
    config.ppo.learning_rate = config.ppo.critic_learning_rate = 1e-3
    config.reward.batch_size, config.reward.epochs = 6, 1
    job = RunJob(run_id="equivalence", base_model=model_dir, database_url="", run_dir=out, parent=0,
                 parent_adapter=None, config=config, threads=1)
    torch.set_num_threads(1)
    if world > 1:
        distributed.init_ranks(job, rank, world, port)
    try:
        stack = load_stack(model_dir, config, on_cpu=distributed.sharded())
        distributed.shard_base(stack, torch.device("cpu"))
        local = sum(getattr(p, "_local_tensor", p).numel() for n, p in stack.causal_lm.named_parameters()
                    if "lora_" not in n)
        (Path(out) / f"rank{rank}.held").write_text(str(local / stack.base_parameters))
        torch.manual_seed(11)
        stack.add_adapter(REWARD, config.lora, head=True)
        normalization = RewardNormalization(mean=0.1, std=2.0)
        critic = init_critic(stack, normalization)
        optimizer = make_optimizer(stack, critic, config.ppo)
        distributed.same_start(p for group in optimizer.param_groups for p in group["params"])
        experience = make_experience(stack, critic, fixed_rollouts(stack.tokenizer.vocab_size), normalization, 0.05,
                                     config.ppo)
        before = {f"before/policy/{k}": v for k, v in stack.adapter_state(POLICY).items()}
        update = ppo_update(stack, critic, optimizer, experience, config.ppo, torch.Generator().manual_seed(5))
        after_ppo = stack.adapter_state(POLICY)
        before |= {f"before/grpo/{k}": v.clone() for k, v in after_ppo.items()}
        groups_experience = make_group_experience(stack, fixed_rollouts(stack.tokenizer.vocab_size), normalization,
                                                  CRITIC_FREE["grpo"], 0.05, config)
        grpo_optimizer = torch.optim.AdamW(stack.role_parameters(POLICY), lr=1e-3, eps=1e-5, weight_decay=0.0)
        distributed.same_start(grpo_optimizer.param_groups[0]["params"])
        grpo = _update(stack, grpo_optimizer, groups_experience, config.ppo, 0.05, torch.Generator().manual_seed(6))
        grpo_state = {f"grpo/{k}": v for k, v in stack.adapter_state(POLICY).items()}
        torch.manual_seed(4)  # the fresh reward adapter train_reward_model starts from (it seeds the same)
        stack.add_adapter(REWARD, config.lora, head=True)
        before |= {f"before/reward/{k}": v for k, v in stack.adapter_state(REWARD).items()}
        groups, labels = fixed_feedback()
        figures = train_reward_model(stack, groups, config.reward, config.lora, labels=labels, heldout=[], seed=4)
        state = {**before, **{f"policy/{k}": v for k, v in after_ppo.items()}, **grpo_state}
        state |= {f"critic/{k}": v.detach().clone() for k, v in critic.state_dict().items()}
        state |= {f"reward/{k}": v for k, v in stack.adapter_state(REWARD).items()}
        state |= {f"reward_head/{k}": v.detach().clone() for k, v in stack.heads[REWARD].state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / f"rank{rank}.safetensors"))
        if rank == 0:
            stack.save_adapter(POLICY, Path(out) / "candidate")
        (Path(out) / f"rank{rank}.figures").write_text(
            f"{update.policy_loss} {update.value_loss} {update.approx_kl} {grpo['policy_loss']} {grpo['kl_loss']} "
            f"{figures.train_loss} {figures.steps}")
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
