"""Small probes behind the README's speed notes: this CPU's fp32 matmul peak, the share of a training step spent in
matrix multiplies, and generate() throughput by batch size and KV-cache kind. SmolLM2-135M-Instruct, offline GGUF.

    python benchmarks/probe_cpu.py
"""

import json
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


def mm_share(model) -> None:
    """One forward + backward of the shared-context path for 2 queries with SmolLM2-like lengths."""
    gen = random.Random(0)
    ids = lambda n: [gen.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    triples = [
        sso.Triple("q", [], "", "", {"x": ids(42), "pos": ids(146), "neg": ids(142)}, ids(110), ids(110), ids(110),
                   "a", "b", "c")  # fmt: skip
        for _ in range(2)
    ]
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logps = sso.pair_logps(model, triples, 2, 2, "cpu")
        sum(v.sum() for k, v in logps.items() if k.endswith("_sum")).backward()
    model.eval()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"training step (2 queries): {total / 1e6:.1f} s CPU, {100 * matmul / total:.0f}% in matrix multiplies")


def sampling(model, tokenizer) -> None:
    principles = sso.load_principles(str(sso.DEFAULT_PRINCIPLES))
    queries = [json.loads(line)["prompt"] for line in sso.DEFAULT_PROMPTS.read_text().splitlines()][:48]
    features = [random.Random(i).sample(principles["selectable"], 2) for i in range(48)]
    _, contexts = sso.build_contexts(tokenizer, queries, features, principles)
    prompts = [c["pos"] for c in contexts]
    for batch_size, cache in [(16, "dynamic"), (16, "static"), (32, "dynamic"), (32, "static"), (48, "static")]:
        batch = sso.pad_batch(prompts[:batch_size], [0] * batch_size, tokenizer.pad_token_id, side="left")
        torch.manual_seed(0)
        started = time.time()
        with torch.no_grad():
            model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")}, do_sample=True, temperature=0.7,
                           top_p=0.8, top_k=0, max_new_tokens=64, min_new_tokens=64,
                           pad_token_id=tokenizer.pad_token_id, cache_implementation=cache)  # fmt: skip
        rate = batch_size * 64 / (time.time() - started)
        print(f"generate: {batch_size} p+ prompts x 64 tokens, {cache} cache: {rate:.0f} tokens/s")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    matmul_peak()
    policy, tok = sso.load_model(sso.resolve_model(None), torch.device("cpu"), torch.float32)
    mm_share(policy)
    sampling(policy, tok)
