"""Benchmark one SSO iteration, phase by phase: the optimised path of sso.py against a plain path, in the same run.

    python benchmarks/bench_sso.py                     # SmolLM2-135M-Instruct (offline GGUF), 16 prompts, 128 tokens
    python benchmarks/bench_sso.py --model /path/to/tiny --prompts-per-iter 4 --max-new-tokens 16   # a quick try

Optimised (sso.py): all prompts of a phase batched in generate (sorted by length, left padded), reference log-probs
once per iteration in no-grad batches, the LM head only on response positions, each context run once per pair.
Plain: one prompt per generate call with transformers' own sampling (temperature and top-p warpers), the reference
recomputed in every optimizer step, full-vocabulary logits over whole sequences, the for-loop AdamW, the GGUF
dequantised at every start. Both train on the same triples, so the training phases process the same tokens.

Model load: a GGUF is loaded twice, first into an empty temporary $SSO_CACHE (dequantise + write the safetensors copy:
what the first run ever pays, and what the plain path pays every time), then from that copy (every later run).
"""

import argparse
import copy
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402


def plain_forward_logps(model, triples, pair, eot_id, pad_id, device="cpu"):
    """Full (B, T, V) logits of whole sequences, log-softmax over the vocabulary, then gather: the textbook way."""
    batch = {k: v.to(device) for k, v in sso.collate_pair(triples, pair, eot_id, pad_id).items()}
    position_ids = sso.position_ids(batch["attention_mask"])
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids
    ).logits
    logps = logits[:, :-1].float().log_softmax(-1)  # (2B, T-1, V)
    labels = batch["labels"][:, 1:]
    mask = labels != sso.IGNORE_INDEX
    token_logps = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    sums, counts = token_logps.sum(-1), mask.sum(-1)
    return sums.chunk(2) + counts.chunk(2)


def plain_generate(model, tokenizer, prompts, stop_ids, args, sample=True, max_new_tokens=None, desc=None):
    """One prompt per generate call, transformers' own sampling: the textbook loop. Same signature and result as
    sso.generate_batched, which it stands in for on the plain path."""
    outputs = []
    for prompt in prompts:
        with torch.no_grad():
            ids = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=max_new_tokens or args.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                **(dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0) if sample else {}),
            )[0, len(prompt) :].tolist()
        outputs.append(sso.cut_at_stop(ids, stop_ids))
    return outputs


def plain_train(policy, ref_model, triples, eot_id, pad_id, args) -> tuple[float, float]:
    """One epoch; the frozen reference is run again inside every step. Returns (reference seconds, training seconds)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, foreach=False)
    ref_seconds, started = 0.0, time.time()
    policy.train()
    for start in range(0, len(triples), args.batch_size):
        batch = triples[start : start + args.batch_size]
        ref_started = time.time()
        with torch.no_grad():
            ref = sso.loss_inputs(
                sso.pair_logps(ref_model, batch, eot_id, pad_id, "cpu", forward=plain_forward_logps), args.loss
            )
        ref_seconds += time.time() - ref_started
        policy_in = sso.loss_inputs(
            sso.pair_logps(policy, batch, eot_id, pad_id, "cpu", forward=plain_forward_logps), args.loss
        )
        loss, _ = sso.sso_loss(
            policy_in,
            {k: v for k, v in ref.items() if not k.startswith("w_")},
            beta=args.beta,
            alpha=args.alpha,
            gamma=args.gamma,
            loss_type=args.loss,
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    policy.eval()
    return ref_seconds, time.time() - started - ref_seconds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="as sso.py --model (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--prompts-per-iter", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--skip-plain", action="store_true", help="time the optimised path only")
    cli = parser.parse_args()
    args = sso.parse_args(
        [
            "--prompts-per-iter",
            str(cli.prompts_per_iter),
            "--max-new-tokens",
            str(cli.max_new_tokens),
            "--batch-size",
            str(cli.batch_size),
            "--output-dir",
            "/tmp/sso-bench",
        ]
    )
    args.model = sso.resolve_model(cli.model)
    print(f"model: {args.model} | threads: {torch.get_num_threads()} | torch {torch.__version__}")
    principles = sso.load_principles(args.principles)
    queries = sso.load_prompts(args.prompts)[: args.prompts_per_iter]

    cold_s = None
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SSO_CACHE"] = cache  # empty: a GGUF's first load dequantises it and writes the copy
        if args.model.endswith(".gguf"):
            started = time.time()
            sso.load_model(args.model, torch.device("cpu"), torch.float32)
            cold_s = time.time() - started
        started = time.time()
        policy, tokenizer = sso.load_model(args.model, torch.device("cpu"), torch.float32)  # a GGUF: from the copy
        load_s = time.time() - started
    del os.environ["SSO_CACHE"]
    initial = copy.deepcopy(policy.state_dict())
    eot_id, pad_id = sso.end_of_turn_id(tokenizer), tokenizer.pad_token_id

    # optimised: exactly what sso.py runs for one iteration
    started = time.time()
    policy, triples, record, t = sso.run_iteration(policy, tokenizer, queries, principles, args, 1, lambda r, s: None)
    fast_rss = peak_rss_mb()
    fast = {
        "model load": (load_s, None),
        "feature selection": (t["select_s"], None),  # phase: (seconds, tokens)
        "sampling": (t["sample_s"], t["sample_tokens"]),
        "reference log-probs": (t["reference_s"], t["reference_tokens"]),
        "training": (t["train_s"], t["train_tokens"]),
    }
    plain = {}
    if not cli.skip_plain:  # plain: same start weights; the log-prob phases use the same triples, so the same tokens
        policy.load_state_dict(initial)
        stop_ids = sso.stop_token_ids(policy, tokenizer)
        sso.seed_everything(args.seed)
        started = time.time()
        with mock.patch.object(sso, "generate_batched", plain_generate):  # sso's own steps, one prompt at a time
            features = sso.select_features(policy, tokenizer, queries, principles, args, random.Random(0), stop_ids)
            plain["feature selection"] = (time.time() - started, None)
            systems, contexts = sso.build_contexts(tokenizer, queries, features, principles)
            started = time.time()
            sampled = sso.sample_triples(policy, tokenizer, queries, features, systems, contexts, args, stop_ids)
        plain["sampling"] = (
            time.time() - started,
            sum(len(x.chosen_ids) + len(x.rejected_ids) + len(x.plain_ids) for x in sampled),
        )
        ref_s, train_s = plain_train(policy, sso.frozen_copy(policy), triples, eot_id, pad_id, args)
        plain.update(
            {
                "model load": (cold_s or load_s, None),
                "reference log-probs": (ref_s, fast["reference log-probs"][1]),
                "training": (train_s, fast["training"][1]),
            }
        )

    print(
        f"\n{len(queries)} prompts, {args.max_new_tokens} new tokens, batch size {args.batch_size}, "
        f"{record['kept']} triples kept\n"
    )
    print("| phase | optimised s | optimised tokens/s | plain s | plain tokens/s | plain / optimised |")
    print("|---|---|---|---|---|---|")
    rate = lambda seconds, tokens: f"{tokens / seconds:.0f}" if tokens else "-"  # noqa: E731
    for name, (seconds, tokens) in fast.items():
        plain_s, plain_tokens = plain.get(name, (None, None))
        print(
            f"| {name} | {seconds:.1f} | {rate(seconds, tokens)} | "
            + (
                f"{plain_s:.1f} | {rate(plain_s, plain_tokens)} | {plain_s / seconds:.2f}x |"
                if plain_s
                else "- | - | - |"
            )
        )
    fast_total = sum(seconds for seconds, _ in fast.values())
    plain_total = sum(seconds for seconds, _ in plain.values())
    whole = f"**{plain_total:.1f}** | | **{plain_total / fast_total:.2f}x** |" if plain else "- | | - |"
    print(f"| **whole iteration** | **{fast_total:.1f}** | | {whole}")
    print(f"\npeak RSS: optimised path {fast_rss:.0f} MB; whole benchmark {peak_rss_mb():.0f} MB")
    if cold_s:
        print(f"model load: {cold_s:.1f} s the first time (dequantise the GGUF, write the copy), {load_s:.1f} s after")


if __name__ == "__main__":
    main()
