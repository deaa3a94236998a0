"""Does the model follow the principles? SSO can only steer toward a difference the model itself makes between p+ and
p-. For every feature of a principles file this script builds the single-feature p+ and p- with sso.py's own
functions, samples y+ ~ π(·|p+,x) and y- ~ π(·|p-,x) on N prompts, and prints one line per feature, strongest first:

    FEATURE | contrast C [lo, hi] | ended y+ A y- B | length y+ L y- M

C is a symmetric divergence per token between π(·|p+,x) and π(·|p-,x), estimated from the samples:
    C = E_{y~p+}[log π(y|p+,x) − log π(y|p-,x)] + E_{y~p-}[log π(y|p-,x) − log π(y|p+,x)]
on mean token log-probs (a Jeffreys divergence per token; 0 when p+ = p-), with its 95% bootstrap interval over the
prompts. A, B: the shares of y+ and y- that end before --max-new-tokens; L, M: their mean lengths in tokens.

    python experiments/contrast.py                                   # SmolLM2-135M, principles.json, 16 prompts
    python experiments/contrast.py --principles data/my.json --num-prompts 32 --seed 1
    python experiments/contrast.py --results experiments/contrast.jsonl   # also file the table (the experiments page)

Any other sso.py flag (--model, --prompts, --max-new-tokens, --device, ...) is passed on, with sso.py's defaults.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402


def mean_logps(model, contexts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean token log π(response | context) of each row, (N,), in one right-padded batch on the model's device."""
    rows = [context + response for context, response in zip(contexts, responses)]
    batch = sso.pad_batch(rows, [len(context) for context in contexts], pad_id)
    device = next(model.parameters()).device
    logp_sum, n_tokens = sso.sequence_logps(model, **{key: value.to(device) for key, value in batch.items()})
    return (logp_sum / n_tokens).cpu()


def divergence(logps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per prompt: [log π(y+|p+) − log π(y+|p-)] + [log π(y-|p-) − log π(y-|p+)], each a mean token log-prob. (N,)"""
    return (logps["pos_on_pos"] - logps["pos_on_neg"]) + (logps["neg_on_neg"] - logps["neg_on_pos"])


@torch.no_grad()
def feature_contrast(model, tokenizer, queries: list[str], feature: str, principles: dict, args) -> dict:
    """Sample y+ under p+ and y- under p- for one feature, score each under both, and summarize."""
    systems = sso.principle_system_prompts([feature], principles)
    contexts = {side: [sso.chat_prompt_ids(tokenizer, q, systems[side]) for q in queries] for side in ("pos", "neg")}
    stop_ids = sso.stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(args.seed)  # the same random numbers for every feature
    sampled = sso.generate_batched(model, tokenizer, contexts["pos"] + contexts["neg"], stop_ids, args.max_new_tokens)
    responses = {"pos": sampled[: len(queries)], "neg": sampled[len(queries) :]}  # y+ ~ π(·|p+,x), y- ~ π(·|p-,x)
    logps = {}
    for drawn in ("pos", "neg"):
        for scored in ("pos", "neg"):
            logps[f"{drawn}_on_{scored}"] = mean_logps(model, contexts[scored], responses[drawn], pad_id)
    values = divergence(logps)
    low, high = sso.bootstrap_interval(values, args.seed)
    row = {"feature": feature, "contrast": values.mean().item(), "low": low, "high": high}
    for side, name in (("pos", "chosen"), ("neg", "rejected")):
        row[f"ended_{name}"] = sum(ids[-1:] == stop_ids[:1] for ids in responses[side]) / len(queries)
        row[f"len_{name}"] = sum(map(len, responses[side])) / len(queries)
    return row


def line(row: dict) -> str:
    return (
        f"{row['feature']} | contrast {row['contrast']:.3f} [{row['low']:.3f}, {row['high']:.3f}] | "
        f"ended y+ {row['ended_chosen']:.2f} y- {row['ended_rejected']:.2f} | "
        f"length y+ {row['len_chosen']:.0f} y- {row['len_rejected']:.0f}"
    )


def table(run: dict) -> str:
    """A filed run as a markdown table, strongest contrast first (experiments/README.md)."""
    lines = [
        "| feature | contrast C [95% interval] | ended y+ | ended y- | length y+ | length y- |",
        "|---|---|---|---|---|---|",
    ]
    for row in run["features"]:
        lines.append(
            f"| {row['feature']} | {row['contrast']:.3f} [{row['low']:.3f}, {row['high']:.3f}] | "
            f"{row['ended_chosen']:.2f} | {row['ended_rejected']:.2f} | {row['len_chosen']:.0f} | "
            f"{row['len_rejected']:.0f} |"
        )
    return "\n".join(lines)


def contrast_table(argv: list[str] | None = None) -> dict:
    """Every feature's contrast, strongest first, printed as it is measured; returns the run as a dict."""
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16, help="N: the first N prompts in the seed's order")
    parser.add_argument("--results", default=None, help="a JSON Lines file to append the run to")
    cli, rest = parser.parse_known_args(argv)
    args = sso.parse_args(rest)  # sso.py's flags and defaults: --model, --principles, --prompts, --seed, ...
    if cli.num_prompts < 1:
        sso.fail(f"argument error: --num-prompts {cli.num_prompts} is out of range")
    principles = sso.load_principles(args.principles)
    prompts = sso.load_prompts(args.prompts, args.prompts_split, args.prompts_column)
    random.Random(args.seed).shuffle(prompts)  # as sso.py shuffles them: the first ones are its held-out prompts
    policy, tokenizer = sso.load_model(args.model or sso.default_model(), args)
    rows = []
    for feature in principles["features"]:
        rows.append(feature_contrast(policy, tokenizer, prompts[: cli.num_prompts], feature, principles, args))
        print(line(rows[-1]), flush=True)
    rows.sort(key=lambda row: -row["contrast"])
    seconds = time.time() - started
    print(f"\nstrongest first ({len(prompts[: cli.num_prompts])} prompts, {seconds / 60:.1f} min):")
    for row in rows:
        print(line(row))
    run = {"flags": rest, "num_prompts": cli.num_prompts, "seconds": seconds, "features": rows}
    if cli.results:
        with open(cli.results, "a") as f:
            f.write(json.dumps(run) + "\n")
    return run


def main(argv: list[str] | None = None) -> None:
    try:
        contrast_table(argv)
    except sso.SSOError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
