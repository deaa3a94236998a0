"""Small probes behind benchmarks/README.md: where a CPU iteration of sso.py spends its time. SmolLM2, offline GGUF.

    python benchmarks/probe_cpu.py

This CPU's fp32 matmul speed at SmolLM2's shapes; the share of a training step spent in matrix multiplies, with and
without gradient checkpointing; and generate() throughput for the 48 prompts of an iteration, with transformers' own
top-p sampling (as sso.py samples) and greedy decoding.
"""

import random
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402


def matmul_peak() -> None:
    for rows, inner, cols in [(1024, 576, 1536), (2048, 576, 576), (1024, 576, 49152)]:  # SmolLM2's shapes
        a, b = torch.randn(rows, inner), torch.randn(inner, cols)
        a @ b
        started = time.time()
        for _ in range(10):
            a @ b
        seconds = (time.time() - started) / 10
        print(f"matmul {rows}x{inner} @ {inner}x{cols}: {2 * rows * inner * cols / seconds / 1e9:.0f} GFLOP/s")


def training_step(model, checkpointing: bool) -> None:
    """Forward and backward of the three pairs of one query with typical lengths, profiled."""
    gen = random.Random(0)
    ids = lambda n: [gen.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    responses = {"chosen": ids(90), "rejected": ids(90), "plain": ids(90)}
    triple = sso.Triple("q", [], {}, {"x": ids(42), "pos": ids(190), "neg": ids(190)}, responses, {})
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logps = sso.pair_logps(model, [triple], 2)
        sum(v.sum() for k, v in logps.items() if k.endswith("_sum")).backward()
    model.eval().activation_checkpointing_disable() if checkpointing else model.eval()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"training step (1 query, checkpointing {'on' if checkpointing else 'off'}): {total / 1e6:.1f} s CPU, "
          f"{100 * matmul / total:.0f}% in matrix multiplies")  # fmt: skip


def sampling(model, tokenizer) -> None:
    """generate() for the 48 prompts of an iteration (x, p+, p- of 16 queries), 64 new tokens each."""
    principles = sso.load_principles(str(sso.HERE / "principles.json"))
    queries = sso.load_prompts(str(sso.HERE / "data/prompts.jsonl"))[:16]
    systems = [sso.principle_system_prompts(random.Random(i).sample(principles["selectable"], 2), principles)
               for i in range(16)]  # fmt: skip
    prompts = [sso.chat_prompt_ids(tokenizer, q, s.get(key)) for q, s in zip(queries, systems) for key in s | {"x": 0}]
    batch = sso.pad_batch(sorted(prompts, key=len), [0] * len(prompts), tokenizer.pad_token_id, side="left")
    for name, how in (("top-p sampling", {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 0}),
                      ("greedy", {"do_sample": False})):  # fmt: skip
        torch.manual_seed(0)
        started = time.time()
        with torch.no_grad():
            model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=64,
                           min_new_tokens=64, pad_token_id=tokenizer.pad_token_id, **how)  # fmt: skip
        print(f"generate, 48 prompts x 64 tokens, {name}: {48 * 64 / (time.time() - started):.0f} tokens/s")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    matmul_peak()
    policy, tok = sso.load_model(
        sso.default_model(), sso.parse_args(["--no-gradient-checkpointing", "--device", "cpu"])
    )
    training_step(policy, checkpointing=False)
    training_step(policy, checkpointing=True)
    sampling(policy, tok)
