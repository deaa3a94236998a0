"""What bf16 does to what training learns, measured on SmolLM2-135M-Instruct on the CPU (sso.py NOTE(impl) 13, 14).

    python benchmarks/bf16_routes.py            # several minutes on 2 CPU cores

Every comparison is made in the precision the run computes in: f is the logits on a held-out query as the route
computes them (nothing is upcast first, which would hide what bf16 rounds away).
1. One LoRA iteration (4 queries, rank 16, the defaults otherwise) at lr 3e-4 and 5e-5. How far the policy the
   iteration returns is from the one its training optimized, as a share of the trained change,
   E = |f(returned) − f(trained)| / |f(trained) − f(initial)|, for three routes:
   - fp32 weights, adapters merged (sso.py's route before: the body and generate under bf16 autocast, which rounds
     W + ΔW to bf16 at every forward pass, the scoring head in fp32);
   - bf16 weights, adapters merged into them (the route before that);
   - bf16 base, fp32 adapters stacked, never merged (sso.py now).
2. Full fine-tuning, 12 AdamW steps at lr 5e-5 on the same triples: the share of linear-layer weights left unchanged,
   in bf16 weights and in fp32 weights (why sso.py's full fine-tuning keeps fp32 weights).
3. The LM head in bf16 against fp32 on the same bf16 hidden states: the largest difference in a token's log-prob.
4. One triple scored alone and in a padded batch of four (bf16): the largest difference in mean token log-prob.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402

QUERIES = [
    "What is the capital of France?",
    "Give me a tip for sleeping better.",
    "Explain what a prime is.",
    "Write a haiku about rain.",
]


def logits(model, ids) -> torch.Tensor:
    """What the model computes, as sso.sequence_logps computes it: the body in the route's precision (any autocast
    around the call applies), then the LM head in fp32."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        hidden = causal_lm.model(input_ids=ids).last_hidden_state  # (1, T, H)
        return hidden.float() @ causal_lm.lm_head.weight.float().T  # (1, T, V)


def lora_errors(lr: str, autocast: bool) -> dict[str, float]:
    """One LoRA iteration; E of the returned policy for each route this run gives. autocast: fp32 weights computing
    in bf16 under autocast (the route before); else a bf16 base (now), whose merge into bf16 weights is the route
    before that."""
    dtype = "float32" if autocast else "bfloat16"
    args = sso.parse_args(["--dtype", dtype, "--lr", lr, "--device", "cpu", "--max-new-tokens", "48"])
    policy, tokenizer = sso.load_model(args.model or sso.default_model(), args)
    ids = torch.tensor([sso.chat_prompt_ids(tokenizer, "Name three colours of the rainbow.")])
    seen, real_train, real_generate, body_forward = (
        {},
        sso.train_epoch,
        sso.generate_batched,
        type(policy.model).forward,
    )

    def spy(model, *rest):
        out = real_train(model, *rest)
        seen["trained"] = logits(model, ids)
        return out

    def in_bf16(function):  # sso.py before: the body and generate under bf16 autocast, the scoring head in fp32
        def wrapped(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return function(*args, **kwargs)

        return wrapped

    sso.train_epoch, sso.generate_batched, type(policy.model).forward = (
        spy,
        in_bf16(real_generate),
        in_bf16(body_forward),
    )
    principles = sso.load_principles(args.principles)
    torch.manual_seed(0)
    try:
        initial = logits(policy, ids)
        returned, _, _ = sso.run_iteration(policy, tokenizer, QUERIES, principles, args, 1, lambda r, s: None)
        merged = logits(copy.deepcopy(returned).merge_and_unload(), ids)
        stacked = logits(returned, ids)
    finally:
        sso.train_epoch, sso.generate_batched, type(policy.model).forward = real_train, real_generate, body_forward
    change = (seen["trained"] - initial).norm()
    if autocast:
        return {"fp32 weights, bf16 autocast, merged": ((merged - seen["trained"]).norm() / change).item()}
    return {
        "bf16 weights, merged": ((merged - seen["trained"]).norm() / change).item(),
        "bf16 base, fp32 adapters stacked": ((stacked - seen["trained"]).norm() / change).item(),
    }


def full_unchanged(dtype: torch.dtype) -> float:
    """12 AdamW steps of full fine-tuning in weights of this dtype: the share of linear-layer weights unchanged."""
    args = sso.parse_args(["--lora-rank", "0", "--lr", "5e-5", "--device", "cpu"])
    policy, tokenizer = sso.load_model(args.model or sso.default_model(), args)
    policy = policy.to(dtype)  # bf16 weights: what sso.py refuses for full fine-tuning
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
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"][:1]).last_hidden_state[0]  # (T, H), bf16
        bf16_logps = F.log_softmax(model.lm_head(hidden).float(), -1)  # the head's matmul in bf16
        fp32_logps = F.log_softmax(hidden.float() @ model.lm_head.weight.float().T, -1)
        head = (bf16_logps - fp32_logps).abs().max().item()
        in_batch = sso.sequence_logps(model, **batch)
        alone = [sso.sequence_logps(model, **sso.pad_batch([row], [start], 0)) for row, start in zip(rows, starts)]
    means = in_batch[0] / in_batch[1]
    return head, max(abs(means[i] - total / n).item() for i, (total, n) in enumerate(alone))


def main() -> None:
    routes = (True,) if "--autocast-only" in sys.argv else (True, False)  # --autocast-only: sso.py's route before
    for lr in ("3e-4", "5e-5"):
        for autocast in routes:
            for route, error in lora_errors(lr, autocast).items():
                print(f"LoRA iteration, lr {lr}, {route}: off the trained policy by {100 * error:.1f}% of its change")
    if "--autocast-only" in sys.argv:
        return
    for dtype in (torch.bfloat16, torch.float32):
        unchanged = 100 * full_unchanged(dtype)
        print(f"full fine-tuning, 12 steps at lr 5e-5, {dtype} weights: {unchanged:.1f}% of weights unchanged")
    head, batch = head_and_batch_differences()
    print(f"LM head in bf16 vs fp32: up to {head:.4f} nats a token")
    print(f"a triple alone vs in a padded batch of 4 (bf16): up to {batch:.4f} nats a token (mean)")


if __name__ == "__main__":
    main()
