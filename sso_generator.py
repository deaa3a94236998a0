"""Self-Steering Optimization as a data generator: the paper's published version. Xiang et al., "Self-Steering
Optimization: Autonomous Preference Optimization for Large Language Models", Findings of ACL 2025, pp. 9073–9085
(arXiv 2410.17131v2, https://arxiv.org/abs/2410.17131v2). sso.py is the paper's first version (v1); this file imports
its building blocks (principles, prompts, sampling, filters, log-probs, the preference loss, the held-out check,
saving), so a reader who knows sso.py recognises every call.

v2 keeps v1's contrastive principles and three responses, but instead of steering the policy while it trains, it
trains a data generator from the policy, and the policy then learns from the generator's data (Section 4.1, Figure 2):
1. Principles: for each query x a good principle p+ and a bad one p-, as system messages: x+ = (p+, x), x- = (p-, x).
2. Sampling: the policy π_θ samples y+ ~ π(·|x+), y- ~ π(·|x-) and yo ~ π(·|x).
3. The generator, a copy of the policy, is trained against the frozen policy with L_SSO = L+ + L- (Section 4.2,
   Eq. 1), where L+ = L_Base(x+; y+ ≻ y-) + γ·L_sft(x+, y+) (Eq. 2) and L- = L_Base(x-; yo ≻ y+) + γ·L_sft(x-, yo)
   (Eq. 4): under p+ it must prefer y+, under p- it must stay with the on-policy yo rather than drift to y+. No W and
   no base pair (v1's).
4. The generator samples y+ under x+ and y- under x- for the policy's queries (more than its own), and the policy,
   not the generator, is trained on (x; y+ ≻ y-) with L_Base alone, against its own frozen copy.
Then sso.py's held-out check of the policy against π_0, so that v1 and v2 runs compare line by line. The variants
(Section 6, Tables 3 and 4): PBAA skips step 3 (the policy's own samples under x+ and x- train it); L+ alone; L- alone;
and the L- the paper rejects, Eq. 3 ("Formula 3"), L_Base(x-; y- ≻ y+) + γ·L_sft(x-, y-).

Notation, paper → code:  x, x+, x- → contexts["x"|"pos"|"neg"] of an sso.Triple;  y+, y-, yo → ids / texts
    ["chosen"|"rejected"|"plain"];  π_θ → policy;  the data generator → generator;  L_Base → sso.preference_loss
    (--loss: DPO on sums, IPO on means);  L_sft → -sft_pos, -sft_neg;  β, γ → beta, gamma;  L+, L- → GENERATOR_PAIRS
Run: `python sso_generator.py --principles data/smollm2_principles.json`.  Test: `python -m pytest -q test_sso.py`

Choices the paper leaves open (each marked NOTE(impl) n where it happens):
 1. L_sft is the mean negative log-likelihood of the response tokens alone (the released trainer averages over every
    position of the padded sequence, prompt and padding included).
 2. The generator is a copy of the policy trained with sso.py's route (a new fp32 LoRA adapter of rank 16 on the frozen
    base, or full fine-tuning with --lora-rank 0), one epoch; the policy likewise on the generator's data. lr 1e-4
    for LoRA at batch 1 (Section 5.1: 5e-7, full fine-tuning, batches of 32 and 256); at sso.py's 3e-4, DPO on
    summed log-probs made the policy's answers loop (experiments/README.md, sec. 9).
 3. Budgets for 2 CPU cores: the generator learns from 24 queries, the policy from 48 others (v2, Section 5.1: 8k
    and all 60k, the policy's including the generator's).
 4. The generator's samples are filtered as sso.py filters its own (empty, identical or looping responses).
 5. With --principle-model, a few-shot prompt asks that model for a good and a bad guideline per query, each put in a
    system prompt that asks for a good or a poor answer following it (WRITTEN_SYSTEM), with no feature selection; where
    its answer has no usable pair, the file's p+ / p- for the features the policy picks, counted in the log. The
    held-out check keeps the file's principles either way: it is sso.py's measure, the same for every run.
 6. The data's quality (Figure 3) at the end: on-policy-ness, the mean of exp(mean token log π_0(y|x)) over chosen
    and rejected, and accuracy by two judges (data_quality): a length judge and π_0's own reading of p+ / p- (the
    paper's judge, GPT-4 on 200 pairs in both orders, is out of reach offline).
 7. Step 1 takes p+ / p- from the principles file by default (sso.py's, for the features the policy picks), where
    the paper has a principle model write a pair per query: its writer (Qwen2.5-72B, or 3B in Table 5) is out of
    reach offline on a CPU, and the file's principles keep v1 and v2 runs comparable. --principle-model asks a model
    instead (`policy`: SmolLM2 writing its own at class scale).
 8. yo is sampled as y+ and y- are (temperature 0.7, top-p 0.8, as Section 5.1 has every response); the authors'
    scripts sample it greedily.
"""

import copy
import random
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import sso

GENERATOR_PAIRS = {  # v2 Section 4.2: the pairs of L+ and L- as (context, chosen, rejected); sft on the chosen
    "pos": sso.PAIRS["pos"],  # L+ (Eq. 2): x+: y+ ≻ y-
    "neg": sso.PAIRS["neg"],  # L- (Eq. 4): x-: yo ≻ y+
}
FORMULA_3 = ("neg", "rejected", "chosen")  # the L- the paper rejects (Eq. 3; Section 6.2, Table 4): x-: y- ≻ y+
POLICY_PAIRS = {"base": sso.PAIRS["base"]}  # step 4: the policy learns x: y+ ≻ y- from the generator's data
JUDGE_PAIRS = {"judge_pos": ("pos", "chosen", "rejected"), "judge_neg": ("neg", "chosen", "rejected")}  # π_0's reading
VARIANTS = ("sso", "pbaa", "pos", "neg", "formula3")  # L+ + L-, no generator, L+ alone, L- alone, L+ + Formula 3
PRINCIPLE_PROMPT = """Write two guidelines for answering the query below: one that a good answer follows, and one \
that a bad answer follows. Reply with exactly two lines, "Good: ..." and "Bad: ...".

Query: How do I boil an egg?
Good: Give the steps in order with the times, and say how to tell when the egg is done.
Bad: Skip the times, mix up the steps and wander off into the history of eggs.

Query: Is it safe to look at a solar eclipse?
Good: Warn clearly that looking without eclipse glasses can damage the eyes, and say what is safe to use.
Bad: Say it is fine to look with sunglasses and leave out any warning.

Query: {query}
"""
UNSAID = "\n\nDo not reveal or mention the guideline in your response; simply answer the user."
WRITTEN_SYSTEM = {  # p+ / p- around a written guideline: a good or a poor answer asked for, as the authors' scripts do
    "pos": "Write a good response that follows this guideline:\n\n{guideline}" + UNSAID,
    "neg": "Write a poor response that follows this guideline:\n\n{guideline}" + UNSAID,
}
WRITTEN = "(written by --principle-model)"  # the features field of a query whose principles were written

CHANGED = {  # sso.py's flags whose default or meaning v2 changes
    "--loss": (("dpo", "ipo"), "L_Base (v2's main experiments: DPO; Table 6: IPO)"),
    "--output-dir": ("runs/sso_generator", "generator/ and policy/ checkpoints, their pairs, metrics.jsonl"),
    "--gamma": (0.1, "γ: weight of L_sft in L+ and L-"),
    "--lr": (1e-4, "AdamW learning rate of the generator and of the policy (NOTE(impl) 2)"),
    "--resume": (False, "continue the run in --output-dir from its last finished step"),
    "--batch-size": (1, "queries per optimizer step (generator: 2 pairs, 4 sequences each; policy: 1 pair, 2)"),
}
V1_ONLY = ("--iters", "--prompts-per-iter", "--alpha", "--no-w", "--no-g", "--merge")  # sso.py --merge: any saved model
FLAGS = [(flag, *CHANGED.get(flag, (default, text))) for flag, default, text in sso.FLAGS if flag not in V1_ONLY]
FLAGS += [
    (
        "--variant",
        VARIANTS,
        "sso: L+ + L- | pbaa: no generator | pos: L+ alone | neg: L- alone | formula3: L+ + Formula 3",
    ),
    ("--generator-prompts", 24, "queries the generator learns from (step 3)"),
    ("--policy-prompts", 48, "other queries the generator writes the policy's pairs for (step 4)"),
    (
        "--principle-model",
        None,
        "a model that writes p+ / p- per query (hub id, folder, .gguf, or policy: π_0); default: the file's",
    ),
]


# --- L_SSO = L+ + L- (Eq. 1): a pure function of log-prob tensors (v2 Section 4.2) -----------------------------------
def generator_loss(policy: dict, reference: dict, *, beta=0.1, gamma=0.1, loss_type="dpo", use_pos=True, use_neg=True):
    """L_SSO = L+ + L- with L± = L_Base(x±; chosen ≻ rejected) + γ·L_sft(x±, chosen) (v2 Section 4.2: Eq. 1; L+:
    Eq. 2; L-: Eq. 4, or Eq. 3 with formula3); use_pos / use_neg: the Table 3 ablations. Shape: every value (B,).
    Returns (the batch-mean loss, metrics)."""
    assert use_pos or use_neg, "L_SSO needs L+, L- or both"
    losses, margins, sft = {}, {}, {}
    for pair in ("pos", "neg"):
        losses[pair], margins[pair] = sso.preference_loss(
            policy_chosen_logps=policy[f"{pair}_chosen"],
            policy_rejected_logps=policy[f"{pair}_rejected"],
            ref_chosen_logps=reference[f"{pair}_chosen"],
            ref_rejected_logps=reference[f"{pair}_rejected"],
            beta=beta,
            loss_type=loss_type,
        )
        sft[pair] = -policy[f"sft_{pair}"]  # L_sft, NOTE(impl) 1: mean token NLL of the chosen under its context
    used = [pair for pair, on in (("pos", use_pos), ("neg", use_neg)) if on]
    loss = sum(losses[pair] + gamma * sft[pair] for pair in used).mean()
    metrics = {"loss": loss.item(), "loss_sft": sum(sft[pair] for pair in used).mean().item()}
    for pair in ("pos", "neg"):  # the pair left out of an ablation is still measured
        metrics[f"loss_{pair}"] = losses[pair].mean().item()
        metrics[f"acc_{pair}"] = (margins[pair] > 0).float().mean().item()  # share with Δ > 0
        metrics[f"margin_{pair}"] = margins[pair].mean().item()
    return loss, metrics


def generator_objective(policy_logps: dict, ref_logps: dict, args) -> tuple[torch.Tensor, dict]:
    """L_SSO on one batch of sso.pair_logps values, with the --variant's terms."""
    sft = {"sft_pos": policy_logps["pos_chosen_mean"], "sft_neg": policy_logps["neg_chosen_mean"]}  # means: L_sft
    policy_in = sso.loss_inputs(policy_logps, args.loss, GENERATOR_PAIRS) | sft
    use = {"use_pos": args.variant != "neg", "use_neg": args.variant != "pos"}
    settings = {"beta": args.beta, "gamma": args.gamma, "loss_type": args.loss} | use
    return generator_loss(policy_in, sso.loss_inputs(ref_logps, args.loss, GENERATOR_PAIRS), **settings)


def policy_objective(policy_logps: dict, ref_logps: dict, args) -> tuple[torch.Tensor, dict]:
    """L_Base(x; y+ ≻ y-) alone (v2 Section 4.1): the policy learns from the generator's pairs as from any DPO data."""
    policy_in = sso.loss_inputs(policy_logps, args.loss, POLICY_PAIRS)
    ref_in = sso.loss_inputs(ref_logps, args.loss, POLICY_PAIRS)
    losses, margin = sso.preference_loss(
        policy_chosen_logps=policy_in["base_chosen"],
        policy_rejected_logps=policy_in["base_rejected"],
        ref_chosen_logps=ref_in["base_chosen"],
        ref_rejected_logps=ref_in["base_rejected"],
        beta=args.beta,
        loss_type=args.loss,
    )
    loss = losses.mean()
    return loss, {
        "loss": loss.item(),
        "acc_base": (margin > 0).float().mean().item(),
        "margin_base": margin.mean().item(),
    }


# --- Step 1: principles, from the file or written per query by a principle model --------------------------------------
def with_principles(tokenizer, query: str, features: list[str], systems: dict) -> sso.Triple:
    """x with its p+ / p- (system messages) and the contexts x, x+, x- as sso.py builds them, before any response."""
    contexts = {key: sso.chat_prompt_ids(tokenizer, query, systems.get(key)) for key in ("x", "pos", "neg")}
    return sso.Triple(query, features, systems, contexts, {}, {})


def written_principles(principle_model, queries: list[str], stage: int, log) -> list[dict | None]:
    """p+ / p- written for each query by a principle model (v2 step 1, NOTE(impl) 5), each wrapped in WRITTEN_SYSTEM;
    None where its answer holds no "Good: ..." and "Bad: ..." lines that differ. principle_model: (model, tokenizer)."""
    model, tokenizer = principle_model
    prompts = [sso.chat_prompt_ids(tokenizer, PRINCIPLE_PROMPT.format(query=query)) for query in queries]
    stop_ids = sso.stop_token_ids(model, tokenizer)
    answers = sso.generate_batched(model, tokenizer, prompts, stop_ids, 96, sample=False, desc="principles")
    written = []
    for answer in tokenizer.batch_decode(answers, skip_special_tokens=True):
        good, bad = (re.search(rf"^\W*{side}\W*:[\s*_]*(\S.*)$", answer, re.M | re.I) for side in ("good", "bad"))
        guidelines = {"pos": good[1].strip(), "neg": bad[1].strip()} if good and bad else {}
        if guidelines and guidelines["pos"] != guidelines["neg"]:  # SmolLM2 often writes one line twice: no contrast
            written.append({key: WRITTEN_SYSTEM[key].format(guideline=g) for key, g in guidelines.items()})
        else:
            written.append(None)
    fallback = written.count(None)
    line = f"principles: written for {len(queries) - fallback} of {len(queries)} queries, the file's for {fallback}"
    log({"type": "principles", "iter": stage, "written": len(queries) - fallback, "fallback": fallback}, line)
    return written


def principled_triples(policy, tokenizer, queries, principles, args, key: int, principle_model, log) -> list:
    """x with its p+ / p- (step 1), before any response: written by the principle model, if any; otherwise (and where it
    wrote none) the file's, for the features the policy picks (NOTE(impl) 7). key: 1 for the generator's queries, 2 for
    the policy's in every variant, so that a query gets the same principles in each (as the paper's Section 6.4 gives
    every model the same principles)."""
    written = written_principles(principle_model, queries, key, log) if principle_model else [None] * len(queries)
    rest = [query for query, systems in zip(queries, written) if systems is None]
    rng = random.Random(args.seed * 1000 + key)  # and --resume reproduces an uninterrupted run
    stop_ids = sso.stop_token_ids(policy, tokenizer)
    picks = iter(sso.select_features(policy, tokenizer, rest, principles, args, rng, stop_ids) if rest else [])
    triples = []
    for query, systems in zip(queries, written):
        if systems:  # no features: the principle model wrote the principles for this query alone
            triples.append(with_principles(tokenizer, query, [WRITTEN], systems))
        else:
            features = next(picks)
            systems = sso.principle_system_prompts(features, principles)
            triples.append(with_principles(tokenizer, query, features, systems))
    return triples


# --- Step 3's and step 4's data, and how good it is (Figure 3) --------------------------------------------------------
def sampled(model, tokenizer, triples, args, responses, who: str, stage: int, log) -> list:
    """The responses named, sampled by `model` for every triple (steps 2 and 4), then filtered as sso.py does."""
    torch.manual_seed(args.seed * 1000 + stage)
    sso.sample_responses(
        model, tokenizer, triples, sso.stop_token_ids(model, tokenizer), args.max_new_tokens, responses
    )
    kept, counts = sso.filter_triples(triples, args.loop_filter)  # NOTE(impl) 4
    dropped = ", ".join(f"{k[8:]} {v}" for k, v in counts.items() if k.startswith("dropped_"))
    line = f"{who}: kept {len(kept)} of {len(triples)} | dropped: {dropped}"
    log({"type": "data", "iter": stage, "who": who, **counts}, line)
    if not kept:
        sso.fail(f"{who}: every sampled triple was filtered out; try more --generator-prompts / --policy-prompts")
    return kept


def data_quality(triples, ref: dict, stop_id: int, seed: int = 0) -> dict[str, float]:
    """v2 Figure 3 for the policy's pairs (NOTE(impl) 6), each figure with its 95% bootstrap interval over the pairs
    (`_low`, `_high`): how on-policy (exp of the mean token log π_0(y|x), over chosen and rejected) and how accurate, by
    two judges: `ends_shorter`, the chosen ends and is shorter than the rejected (what data/smollm2_principles.json's
    Concision asks for, checkable by eye; it favours short answers whatever the principles); `pi0_reads`, π_0's own
    reading of the principles, log π_0(y|x+) − log π_0(y|x-) higher for the chosen (it favours what the model already
    associates with p+, right or wrong, and so PBAA's pairs, which π_0 itself sampled under x+ and x-)."""
    likely = (ref["base_chosen_mean"].exp() + ref["base_rejected_mean"].exp()) / 2  # (N,) per pair
    ends_shorter = [t.ids["chosen"][-1] == stop_id and len(t.ids["chosen"]) < len(t.ids["rejected"]) for t in triples]
    lean = ref["judge_pos_chosen_mean"] - ref["judge_neg_chosen_mean"]  # (N,) how much more p+-like y+ is under π_0
    lean_rejected = ref["judge_pos_rejected_mean"] - ref["judge_neg_rejected_mean"]
    per_pair = {"onpolicy": likely, "acc_ends_shorter": torch.tensor(ends_shorter).float()}
    per_pair["acc_pi0_reads"] = (lean > lean_rejected).float()
    quality = {}
    for key, values in per_pair.items():
        low, high = sso.bootstrap_interval(values, seed)
        quality |= {key: values.mean().item(), f"{key}_low": low, f"{key}_high": high}
    for side in ("chosen", "rejected"):  # what the judges look at, for reading the pairs
        quality[f"ended_{side}"] = sum(t.ids[side][-1] == stop_id for t in triples) / len(triples)
        quality[f"len_{side}"] = sum(len(t.ids[side]) for t in triples) / len(triples)
    return quality


# --- The pipeline: steps 1-4, then the held-out check -----------------------------------------------------------------
def generator_pairs(args) -> dict:
    """The pairs of L+ and L- that --variant trains the generator on (formula3: the L- the paper rejects)."""
    return GENERATOR_PAIRS | ({"neg": FORMULA_3} if args.variant == "formula3" else {})


def stages(args) -> list[str]:
    return ["policy"] if args.variant == "pbaa" else ["generator", "policy"]


def train_generator(policy, tokenizer, queries, principles, args, principle_model, log):
    """Steps 1-3: x with p+ / p-; y+, y-, yo from the policy; the generator, a copy of the policy trained against it
    (frozen) with L_SSO. Returns (the generator, its triples, its record, its pairs)."""
    triples = principled_triples(
        policy, tokenizer, queries, principles, args, key=1, principle_model=principle_model, log=log
    )
    responses = ("chosen", "rejected", "plain")  # y+, y-, yo: all three sampled alike (NOTE(impl) 8)
    triples = sampled(policy, tokenizer, triples, args, responses, who="policy's samples", stage=1, log=log)
    pairs = generator_pairs(args)
    pad_id = tokenizer.pad_token_id
    ref = sso.reference_logps(policy, triples, pad_id, args.batch_size, pairs)  # the frozen policy's log-probs
    generator = copy.deepcopy(policy)  # NOTE(impl) 2: initialised from the policy
    generator_log = tag(log, "generator")
    generator, means = sso.train_model(
        generator,
        triples,
        ref,
        pad_id,
        args,
        iteration=1,
        log=generator_log,
        objective=generator_objective,
        pairs=pairs,
    )
    return generator, triples, means | {"type": "generator"}, pairs


def train_policy(policy, tokenizer, triples, args, stage: int, log):
    """Step 4's second half: the policy learns (x: y+ ≻ y-) with L_Base alone, against its own frozen copy (π_0);
    the data's quality is measured on the way. Returns (the policy, its record)."""
    pad_id = tokenizer.pad_token_id
    ref = sso.reference_logps(policy, triples, pad_id, args.batch_size, POLICY_PAIRS | JUDGE_PAIRS)
    quality = data_quality(triples, ref, sso.stop_token_ids(policy, tokenizer)[0], args.seed)
    line = f"the policy's data | on-policy {quality['onpolicy']:.4f} | accurate: ends and shorter "
    line += f"{quality['acc_ends_shorter']:.2f}, π_0's reading {quality['acc_pi0_reads']:.2f}"
    log({"type": "data_quality", "iter": stage} | quality, line)
    policy_log = tag(log, "policy")
    policy, means = sso.train_model(
        policy,
        triples,
        ref,
        pad_id,
        args,
        iteration=stage,
        log=policy_log,
        objective=policy_objective,
        pairs=POLICY_PAIRS,
    )
    return policy, means | quality | {"type": "policy"}


def run(args) -> Path:
    args, done, principles, held_out, prompts, log = sso.start_run(args, FLAGS, stages)
    out, steps = Path(args.output_dir), stages(args)
    if done == len(steps):
        print(f"{out} holds a finished run")
        return out
    if args.generator_prompts + args.policy_prompts > len(prompts):
        sso.fail(f"--generator-prompts + --policy-prompts > the {len(prompts)} prompts left after the held-out ones")
    generator_queries = prompts[: args.generator_prompts]
    policy_queries = prompts[args.generator_prompts :][: args.policy_prompts]  # NOTE(impl) 3: others, more of them
    policy, tokenizer = sso.load_model(args.model, args)  # π_0, on --resume too
    principle_model = None  # (model, tokenizer) that writes p+ / p-, if any
    if args.principle_model == "policy":  # π_0 writes its own: the policy is not trained before step 4's principles
        principle_model = (policy, tokenizer)
    elif args.principle_model:
        principle_model = sso.load_model(args.principle_model, args)
    held = sso.held_out_data(out, policy, tokenizer, held_out, principles, args, log, done) if held_out else None
    # 1.-3. the generator, trained from the policy (PBAA: none, the policy's own samples are its data)
    generator = policy
    if "generator" in steps and done:  # --resume after the generator was saved
        generator, _ = sso.load_model(str(out / "generator"), args)
    elif "generator" in steps:
        generator, triples, record, pairs = train_generator(
            policy, tokenizer, generator_queries, principles, args, principle_model, log
        )
        sso.save_iteration(out / "generator", generator, tokenizer, triples, record, [], pairs)
    # 4. the generator writes y+ under x+ and y- under x- for the policy's queries; the policy learns them
    stage = len(steps)
    triples = principled_triples(
        policy, tokenizer, policy_queries, principles, args, key=2, principle_model=principle_model, log=log
    )
    who = "generator's data" if generator is not policy else "policy's own data (PBAA)"
    triples = sampled(generator, tokenizer, triples, args, ("chosen", "rejected"), who=who, stage=stage, log=log)
    del generator
    policy, record = train_policy(policy, tokenizer, triples, args, stage, log)
    # then sso.py's held-out check of the policy against π_0, and the policy saved with its pairs
    check, answers = sso.held_out_check(policy, tokenizer, held, args, stage, log) if held else ({}, [])
    sso.save_iteration(out / "policy", policy, tokenizer, triples, record | check, answers, POLICY_PAIRS)
    return out


def tag(log, stage: str):
    """The log of one training stage: its records say which model they are of, and its lines begin with it."""
    return lambda record, line: log(record | {"stage": stage}, f"{stage} | {line}")


def main(argv: list[str] | None = None) -> None:
    sso.hf_logging.disable_progress_bar()  # transformers' own load / save bars; tqdm shows the run's phases
    try:
        args = sso.parse_args(argv, FLAGS)
        args.iters = len(stages(args))  # the generator, then the policy: "iter 1/2", "iter 2/2" in the step lines
        run(args)
    except sso.SSOError as err:
        tqdm.write(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        tqdm.write(f"error: {err}; finished steps are kept, continue with --resume", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
