"""Run under torchrun (2 gloo processes): the Hugging Face Trainer with ARO's hybrid optimizer.

    torchrun --nproc-per-node 2 trainer_script.py OUT MODE

MODE ``full`` trains 6 steps and saves a checkpoint after step 3; ``resume`` resumes from that
checkpoint and trains to step 6. Rank 0 writes the final parameters and the logged losses to
``OUT/<MODE>.pt``; the test compares the two.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from aro.integrations.huggingface import trainer_optimizer

STEPS, SAVE_AT = 6, 3


def main(out: str, mode: str) -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.set_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=50, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (64, 16), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(Path(out) / "ckpt"), per_device_train_batch_size=4, max_steps=STEPS, save_steps=SAVE_AT,
        save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        lr_scheduler_type="linear", warmup_steps=2, ddp_backend="gloo")
    assert dist.is_initialized() and dist.get_world_size() == 2, "run under torchrun with 2 processes"
    opt = trainer_optimizer(model, lr=1e-2, weight_decay=0.1, process_group=dist.group.WORLD)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    resume = str(Path(out) / "ckpt" / f"checkpoint-{SAVE_AT}") if mode == "resume" else None
    trainer.train(resume_from_checkpoint=resume)
    if dist.get_rank() == 0:
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses},
                   Path(out) / f"{mode}.pt")
    # tear the process group down together (a rank exiting while a peer's gloo thread still reads
    # its sockets aborts that peer)
    dist.barrier()
    del trainer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
