"""What bf16 does to what training learns, measured on SmolLM2-135M-Instruct on the CPU (sso.py NOTE(impl) 13, 14).

    python benchmarks/bf16_routes.py            # about 6 minutes on 2 CPU cores

Each measurement sets the route sso.py used before (bf16 weights) beside the one it uses now (fp32 weights, bf16
compute under autocast), everything else equal, and compares in fp32:
1. one LoRA iteration (4 queries, rank 16, the defaults otherwise) at lr 3e-4 and 5e-5: how far the policy the
   iteration returns (adapters merged) is from the adapted policy it trained, as a share of the trained change
   |logits(returned) − logits(adapted)| / |logits(adapted) − logits(initial)| on a held-out query;
2. full fine-tuning, 12 AdamW steps at lr 5e-5 on the same triples: the share of linear-layer weights left unchanged;
3. the LM head in bf16 against fp32 on the same hidden states: the largest difference in a token's log-prob;
4. one triple scored alone and in a padded batch of four (bf16): the largest difference in mean token log-prob.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from check_gpu import fp32_logits  # noqa: E402  (what a model computes, in fp32)

import sso  # noqa: E402

QUERIES = [
    "What is the capital of France?",
    "Give me a tip for sleeping better.",
    "Explain what a prime is.",
    "Write a haiku about rain.",
]


def load(route: str, args):
    """sso.py's model in a route: "bf16 weights" (the earlier one) or "fp32 weights, bf16 compute" (today's)."""
    model, tokenizer = sso.load_model(args.model or sso.default_model(), args)
    if route == "bf16 weights":
        model = model.to(torch.bfloat16)
        model.compute_dtype = torch.float32  # no autocast: every op in the weights' bf16
        model.lm_head.forward = BF16Head(model.lm_head)  # as it was: the head in bf16, its output cast to fp32
    return model, tokenizer


class BF16Head:
    """The LM head of the earlier route: bf16 hidden states and weights, logits rounded to bf16."""

    def __init__(self, head):
        self.weight = head.weight

    def __call__(self, hidden):
        return F.linear(hidden.to(self.weight.dtype), self.weight).float()


def lora_error(route: str, lr: str) -> float:
    args = sso.parse_args(["--dtype", "bfloat16", "--lr", lr, "--device", "cpu", "--max-new-tokens", "48"])
    policy, tokenizer = load(route, args)
    ids = torch.tensor([sso.chat_prompt_ids(tokenizer, "Name three colours of the rainbow.")])
    initial, seen = fp32_logits(policy, ids), {}
    real_train = sso.train_epoch

    def spy(model, *rest):
        out = real_train(model, *rest)
        seen["adapted"] = fp32_logits(model, ids)
        return out

    sso.train_epoch = spy
    principles = sso.load_principles(args.principles)
    torch.manual_seed(0)
    returned, _, _ = sso.run_iteration(policy, tokenizer, QUERIES, principles, args, 1, lambda r, s: None)
    sso.train_epoch = real_train
    return ((fp32_logits(returned, ids) - seen["adapted"]).norm() / (seen["adapted"] - initial).norm()).item()


def full_unchanged(route: str) -> float:
    args = sso.parse_args(["--dtype", "bfloat16", "--lora-rank", "0", "--lr", "5e-5", "--device", "cpu"])
    policy, tokenizer = load(route, args)
    args.max_new_tokens, args.loop_filter = 32, "none"
    principles = sso.load_principles(args.principles)
    stop_ids = sso.stop_token_ids(policy, tokenizer)
    torch.manual_seed(0)
    triples = sso.sample_triples(policy, tokenizer, QUERIES * 3, principles, args, sso.random.Random(0), stop_ids)
    ref = sso.reference_logps(policy, triples, tokenizer.pad_token_id, 1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if n.endswith("proj.weight")}
    sso.train_epoch(policy, triples, ref, tokenizer.pad_token_id, args, 1, lambda r, s: None)  # 12 steps
    after = dict(policy.named_parameters())
    unchanged = sum((after[n] == value).sum().item() for n, value in before.items())
    return unchanged / sum(value.numel() for value in before.values())


def head_and_batch_differences() -> tuple[float, float]:
    args = sso.parse_args(["--dtype", "bfloat16", "--device", "cpu"])
    model, tokenizer = sso.load_model(args.model or sso.default_model(), args)
    rows = [
        sso.chat_prompt_ids(tokenizer, q) + tokenizer(f" Answer {i}: " * (4 * i + 2)).input_ids
        for i, q in enumerate(QUERIES)
    ]
    starts = [len(sso.chat_prompt_ids(tokenizer, q)) for q in QUERIES]
    batch = sso.pad_batch(rows, starts, tokenizer.pad_token_id)
    with torch.no_grad(), sso.compute_precision(model):
        hidden = model.model(input_ids=batch["input_ids"][:1]).last_hidden_state[0]  # (T, H), bf16
        bf16_logps = F.log_softmax(model.lm_head(hidden).float(), -1)  # the head's matmul in bf16
    fp32_logps = F.log_softmax(hidden.float() @ model.lm_head.weight.T, -1)
    head = (bf16_logps - fp32_logps).abs().max().item()
    with torch.no_grad():
        in_batch = sso.sequence_logps(model, **batch)
        alone = [sso.sequence_logps(model, **sso.pad_batch([row], [start], 0)) for row, start in zip(rows, starts)]
    means = in_batch[0] / in_batch[1]
    return head, max(abs(means[i] - total / n).item() for i, (total, n) in enumerate(alone))


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    for lr in ("3e-4", "5e-5"):
        for route in ("bf16 weights", "fp32 weights, bf16 compute"):
            print(
                f"LoRA iteration, lr {lr}, {route}: returned policy off the trained one by "
                f"{100 * lora_error(route, lr):.1f}% of the trained change"
            )
    for route in ("bf16 weights", "fp32 weights, bf16 compute"):
        print(
            f"full fine-tuning, 12 steps at lr 5e-5, {route}: {100 * full_unchanged(route):.1f}% of weights unchanged"
        )
    head, batch = head_and_batch_differences()
    print(f"LM head in bf16 vs fp32: up to {head:.4f} nats a token")
    print(f"a triple alone vs in a padded batch of 4 (bf16): up to {batch:.4f} nats a token (mean)")


if __name__ == "__main__":
    main()
