"""What each process of tests/test_trainer_preference.py's two-rank test runs: an online-DPO update on users' pairs
and a KTO update on labels from fixed inputs, as rank ``rank`` of ``world`` (1: one process, no process group), the
trained weights written to ``out``."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from alignd.store.records import Label
from alignd.trainer import distributed
from alignd.trainer.config import TrainerConfig
from alignd.trainer.feedback_sequences import UserFeedback
from alignd.trainer.job import RunJob
from alignd.trainer.kto import _update as kto_update
from alignd.trainer.kto import class_weights, make_label_batch
from alignd.trainer.models import POLICY, load_stack
from alignd.trainer.online_dpo import _update as dpo_update
from alignd.trainer.online_dpo import make_pair_batch
from tests.distributed_steps import fixed_feedback


def steps(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """Join the group (world > 1), then one online-DPO update (11 pairs, 2 epochs of minibatches of 3 pairs, one pair
    per micro-batch) and one KTO update (16 labels, minibatches of 6, micro-batches of 2); writes
    ``out/rank<rank>.safetensors`` and the figures beside it."""
    config = TrainerConfig(device="cpu", dtype="float32", seed=3)
    config.ppo.minibatch_size, config.ppo.micro_batch_size, config.ppo.epochs = 6, 2, 2
    job = RunJob(run_id="equivalence", base_model=model_dir, database_url="", run_dir=out, parent=0,
                 parent_adapter=None, config=config, threads=1)
    torch.set_num_threads(1)
    if world > 1:
        distributed.init_ranks(job, rank, world, port)
    try:
        stack = load_stack(model_dir, config)
        groups, labels = fixed_feedback()
        pairs = [pair for group in groups for pair in group]
        labels += [Label(prompt=p.prompt, reply=reply, good=good) for p in pairs[:6]
                   for reply, good in ((p.chosen, True), (p.rejected, False))]
        before = {f"before/dpo/{k}": v for k, v in stack.adapter_state(POLICY).items()}
        optimizer = torch.optim.AdamW(stack.role_parameters(POLICY), lr=1e-3, eps=1e-5, weight_decay=0.0)
        distributed.same_start(optimizer.param_groups[0]["params"])
        dpo = dpo_update(stack, optimizer, make_pair_batch(stack, [], pairs, UserFeedback(), config), config.ppo,
                         0.1, torch.Generator().manual_seed(5))
        after_dpo = {f"dpo/{k}": v for k, v in stack.adapter_state(POLICY).items()}
        before |= {f"before/kto/{k}": v.clone() for k, v in stack.adapter_state(POLICY).items()}
        optimizer = torch.optim.AdamW(stack.role_parameters(POLICY), lr=1e-3, eps=1e-5, weight_decay=0.0)
        good = sum(x.good for x in labels)
        kto = kto_update(stack, optimizer, make_label_batch(stack, labels, UserFeedback(), config), config.ppo,
                         config.kto, class_weights(good, len(labels) - good, config.kto),
                         torch.Generator().manual_seed(6))
        state = {**before, **after_dpo, **{f"kto/{k}": v for k, v in stack.adapter_state(POLICY).items()}}
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / f"rank{rank}.safetensors"))
        (Path(out) / f"rank{rank}.figures").write_text(" ".join(
            str(v) for v in (dpo["dpo_loss"], dpo["reward_margin"], dpo["preference_accuracy"], dpo["approx_kl"],
                             kto["kto_loss"], kto["reference_point"], kto["desirable_reward"],
                             kto["undesirable_reward"], kto["approx_kl"])))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
