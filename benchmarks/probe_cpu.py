"""Small probes behind the README's speed notes: this CPU's fp32 matmul peak, the share of a training step spent in
matrix multiplies, and generate() throughput by sampler and KV-cache kind. SmolLM2-135M-Instruct, offline GGUF.

    python benchmarks/probe_cpu.py
"""

import json
import random
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessorList

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
        sso.Triple(
            "q",
            [],
            "",
            "",
            {"x": ids(42), "pos": ids(146), "neg": ids(142)},
            ids(110),
            ids(110),
            ids(110),
            "a",
            "b",
            "c",
        )  # fmt: skip
        for _ in range(2)
    ]
    model.train()
    sso.sparse_tied_embedding_grad(model, True)  # as train_iteration does
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logps = sso.pair_logps(model, triples, 2, 2, "cpu")
        sum(v.sum() for k, v in logps.items() if k.endswith("_sum")).backward()
    sso.sparse_tied_embedding_grad(model, False)
    model.eval()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"training step (2 queries): {total / 1e6:.1f} s CPU, {100 * matmul / total:.0f}% in matrix multiplies")


def sampling(model, tokenizer) -> None:
    """generate() for the 48 prompts of an iteration (x, p+, p- of 16 queries), 64 new tokens each, by sampler."""
    principles = sso.load_principles(str(sso.DEFAULT_PRINCIPLES))
    queries = [json.loads(line)["prompt"] for line in sso.DEFAULT_PROMPTS.read_text().splitlines()][:16]
    features = [random.Random(i).sample(principles["selectable"], 2) for i in range(16)]
    _, contexts = sso.build_contexts(tokenizer, queries, features, principles)
    prompts = sorted((c[key] for c in contexts for key in ("pos", "neg", "x")), key=len)
    samplers = {
        "transformers' warpers (sort + multinomial over the vocabulary)": dict(
            do_sample=True, temperature=0.7, top_p=0.8, top_k=0
        ),
        "sso.NucleusSampler (top 64, greedy over its one-hot)": dict(
            do_sample=False, logits_processor=LogitsProcessorList([sso.NucleusSampler(0.7, 0.8)])
        ),
    }
    for cache in ("dynamic", "static"):
        for name, kwargs in samplers.items():
            batch = sso.pad_batch(prompts, [0] * len(prompts), tokenizer.pad_token_id, side="left")
            torch.manual_seed(0)
            started = time.time()
            with torch.no_grad():
                model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=64,
                               min_new_tokens=64, pad_token_id=tokenizer.pad_token_id, cache_implementation=cache,
                               **kwargs)  # fmt: skip
            rate = len(prompts) * 64 / (time.time() - started)
            print(f"generate: 48 prompts x 64 tokens, {cache} cache, {name}: {rate:.0f} tokens/s")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    matmul_peak()
    policy, tok = sso.load_model(sso.resolve_model(None), torch.device("cpu"), torch.float32)
    mm_share(policy)
    sampling(policy, tok)
