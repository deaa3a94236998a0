"""Offline SSO (paper Figure 1 and Table 3): a finished sso.py run's base pairs train the initial model once, with TRL.

    python experiments/offline.py runs/sso                                        # after python sso.py --iters 3
    accelerate launch --num_processes 2 experiments/offline.py runs/sso           # the same in two processes (DDP)

Online SSO (sso.py) samples each iteration's pairs from the policy it is training. Offline, the pairs the run saved,
every iteration's base pair (x: y+ > y-, iter_*/triples.jsonl), train the initial model π_0 in one pass with TRL's
DPOTrainer: IPO on mean token log-probs, the run's β, learning rate, batch size and LoRA adapters (if it had them), a
constant learning rate and AdamW's weight decay as in sso.py, one optimizer step per batch. TRL weights every pair alike: no W, no G, no pos or
neg pair. The result is judged by sso.py's own held-out check against π_0 on the run's held-out set (held_out.json),
so its last line reads like the run's own `held-out after iter T` line.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import datasets
import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402


def finished_run(folder: str) -> tuple[argparse.Namespace, dict]:
    """The run's settings and its held-out set; a folder that is missing, unfinished or has no held-out set fails."""
    run = Path(folder)
    if not (run / "config.json").is_file():
        sso.fail(f"{run} holds no sso.py run (no config.json)")
    args = argparse.Namespace(**json.loads((run / "config.json").read_text()))
    missing = [f"iter_{t}" for t in range(1, args.iters + 1) if not (run / f"iter_{t}" / "triples.jsonl").is_file()]
    if missing:
        sso.fail(f"{run} is unfinished (no {', '.join(missing)}): python sso.py --output-dir {run} --resume")
    if not (run / "held_out.json").is_file():
        sso.fail(f"{run} has no held-out set (held_out.json): it ran with --eval-prompts 0")
    held = json.loads((run / "held_out.json").read_text())
    return args, held | {"triples": [sso.Triple(**t) for t in held["triples"]]}


def adapters(args, task_type: str):
    """The run's LoRA adapters, so that TRL trains as sso.py did at the run's learning rate; None: full fine-tuning."""
    if not args.lora_rank:
        return None
    return LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", task_type=task_type)


def base_pairs(folder: str, iters: int) -> datasets.Dataset:
    """Every iteration's base pairs as TRL conversational rows: prompt (the user turn x), chosen y+, rejected y-."""
    files = [str(Path(folder) / f"iter_{t}" / "triples.jsonl") for t in range(1, iters + 1)]
    datasets.disable_progress_bars()
    return datasets.load_dataset("json", data_files=files, split="train").select_columns(
        ["prompt", "chosen", "rejected"]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished sso.py run folder (--output-dir)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: one pass)")
    cli = parser.parse_args(argv)
    try:
        args, held = finished_run(cli.run)
        model, tokenizer = sso.load_model(args.model, args)  # π_0, as the run loaded it
    except sso.SSOError as err:
        sys.exit(f"error: {err}")
    from trl import DPOConfig, DPOTrainer

    pairs = base_pairs(cli.run, args.iters)
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        loss_type="ipo",
        beta=args.beta,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.01,  # torch's AdamW default, which sso.py uses
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        max_steps=cli.max_steps or -1,
        gradient_checkpointing=False,  # sso.load_model has turned it on as the run had it (TRL's call is deprecated)
        bf16=torch.cuda.is_available(),  # TRL's default bf16=True stops on a CPU
        use_cpu=not torch.cuda.is_available(),  # under accelerate launch: processes on CPU cores, DDP over gloo
        dataloader_pin_memory=False,  # no accelerator to pin memory for on a CPU
        save_strategy="no",
        report_to="none",
        logging_steps=10,
    )
    lora = adapters(args, "CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
    if cli.max_steps != 0:
        trainer.train()
    if not trainer.accelerator.is_main_process:  # under accelerate launch, one process judges the result
        return
    steps = trainer.state.global_step
    policy = trainer.accelerator.unwrap_model(trainer.model)

    def log(record: dict, line: str) -> None:
        print(f"offline IPO, {len(pairs)} base pairs, {steps} steps | " + line.split(" | ", 1)[1])

    sso.held_out_check(policy, tokenizer, held, args, steps, log)


if __name__ == "__main__":
    main()
