"""SSO's pairs as reward-model data (paper Figure 1 and Table 4): train a reward model on a finished run's base pairs.

    python experiments/reward_model.py runs/sso               # after python sso.py --iters 3

The reward model is the initial model π_0 with a one-logit sequence-classification head, trained with TRL's
RewardTrainer (the Bradley-Terry loss −log σ(r(x, y+) − r(x, y-))) on every iteration's base pair (x: y+ > y-) for one
pass, at the run's learning rate and with its LoRA adapters if it had them (the head trains in full). It is then asked which of y+ and y- is better on the run's held-out prompts, whose y+ and y- π_0 sampled under
the good and the bad principles and which it never trained on: its accuracy there, with a 95% bootstrap interval,
against chance (0.5), and on its own training pairs.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline import adapters, base_pairs, finished_run, sso  # noqa: E402


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """1.0 where the reward of the chosen answer is above the rejected one's, per row. Shape: (N,)."""
    wins = []
    for row in rows:
        rewards = []
        for answer in (row["chosen"], row["rejected"]):
            text = tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=False)  # as RewardTrainer renders it
            batch = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
            rewards.append(model(**batch).logits[0, 0])
        wins.append(float(rewards[0] > rewards[1]))
    return torch.tensor(wins)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished sso.py run folder (--output-dir)")
    parser.add_argument("--swap", action="store_true", help="train on y- > y+ instead: a check that the data decides")
    cli = parser.parse_args(argv)
    try:
        args, held = finished_run(cli.run)
        folder = args.model
        if folder.endswith(".gguf"):  # a plain copy for the classification head to load from
            model, tokenizer = sso.load_model(args.model, args)
            folder = tempfile.mkdtemp()
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    except sso.SSOError as err:
        sys.exit(f"error: {err}")
    from trl import RewardConfig, RewardTrainer

    pairs = base_pairs(cli.run, args.iters)
    if cli.swap:
        pairs = pairs.rename_columns({"chosen": "rejected", "rejected": "chosen"})
    config = RewardConfig(
        output_dir=tempfile.mkdtemp(),
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        gradient_checkpointing=False,  # a 135M model and short pairs fit without it
        bf16=torch.cuda.is_available(),  # TRL's default bf16=True stops on a CPU
        dataloader_pin_memory=False,  # no accelerator to pin memory for on a CPU
        save_strategy="no",
        report_to="none",
        logging_steps=10,
    )
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
    tokenizer = sso.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token before the padding
    lora = adapters(args, "SEQ_CLS")  # the fresh one-logit head trains in full beside the adapters
    trainer = RewardTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    model = trainer.model.eval()
    trained = accuracy(model, tokenizer, list(pairs))
    messages = [sso.chat_messages(tokenizer, t.query) for t in held["triples"]]
    held_rows = [
        {
            "prompt": prompt,
            **{side: [{"role": "assistant", "content": t.texts[side]}] for side in ("chosen", "rejected")},
        }
        for prompt, t in zip(messages, held["triples"])
    ]
    wins = accuracy(model, tokenizer, held_rows)
    low, high = sso.bootstrap_interval(trained, args.seed)
    print(f"reward model: training accuracy {trained.mean():.2f} [{low:.2f}, {high:.2f}] on {len(trained)} pairs")
    low, high = sso.bootstrap_interval(wins, args.seed)
    print(f"reward model: held-out accuracy {wins.mean():.2f} [{low:.2f}, {high:.2f}] on {len(wins)} pairs")


if __name__ == "__main__":
    main()
