"""The paper's W / G ablations (Tables 5 and 12) and its signal analysis (Figure 4), reproduced small, offline, on CPU.

    python experiments/ablations.py                    # 4 variants x 3 iterations on SmolLM2-135M-Instruct (GGUF)
    python experiments/ablations.py --report-only      # print the tables from the finished runs

Variants (same seed, same prompts): full SSO, without W, without G, without both (the paper's modified PBAA).
Before training, held-out triples are sampled once from the initial model on prompts no variant trains on; afterwards
each variant's final model is scored on them against the initial model (base pair: Δ = final log-ratio − initial
log-ratio, mean token log-probs). A rerun skips finished variants and resumes an interrupted one (sso.py --resume).
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402

VARIANTS = {"sso": [], "no_w": ["--no-w"], "no_g": ["--no-g"], "no_w_no_g": ["--no-w", "--no-g"]}
LABELS = {"sso": "SSO", "no_w": "w/o W", "no_g": "w/o G", "no_w_no_g": "w/o W, G (PBAA)"}
ITERATION_COLUMNS = [
    ("kept", "kept", "{:d}"),
    ("logp_chosen", "logp y+", "{:.3f}"),
    ("logp_rejected", "logp y-", "{:.3f}"),
    ("logp_plain", "logp y0", "{:.3f}"),
    ("len_chosen", "len y+", "{:.0f}"),
    ("len_rejected", "len y-", "{:.0f}"),
    ("len_plain", "len y0", "{:.0f}"),
    ("margin_base", "margin base", "{:.3f}"),
    ("acc_base", "acc base", "{:.2f}"),
    ("w", "W", "{:.3f}"),
]


def split_prompts(source: str, held_out: int, seed: int, root: Path) -> tuple[str, list[str]]:
    """A training prompt file for all variants and the held-out queries, disjoint."""
    prompts = sso.load_prompts(source)
    random.Random(seed).shuffle(prompts)
    train_file = root / "train_prompts.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[held_out:]))
    return str(train_file), prompts[:held_out]


def sample_held_out(model, tokenizer, queries, principles, args, path: Path) -> list[sso.Triple]:
    """Triples from the initial model, sampled once and stored with their token ids."""
    if path.exists():
        return [sso.Triple(**row) for row in json.loads(path.read_text())]
    rng = random.Random(args.seed)
    sso.seed_everything(args.seed)
    stop_ids = sso.stop_token_ids(model, tokenizer)
    features = sso.select_features(model, tokenizer, queries, principles, args, rng, stop_ids)
    systems, contexts = sso.build_contexts(tokenizer, queries, features, principles)
    triples, counts = sso.filter_triples(
        sso.sample_triples(model, tokenizer, queries, features, systems, contexts, args, stop_ids)
    )
    print(f"held-out triples: {counts}")
    path.write_text(json.dumps([t._asdict() for t in triples]))
    return triples


@torch.no_grad()
def held_out_margin(final_model, initial_logps, triples, eot_id, pad_id) -> dict:
    """Base-pair Δ of the final model against the initial model on the held-out triples (mean token log-probs)."""
    final = sso.pair_logps(final_model.eval(), triples, eot_id, pad_id, "cpu", ("base",))
    margin = (final["base_chosen_mean"] - final["base_rejected_mean"]) - (
        initial_logps["base_chosen_mean"] - initial_logps["base_rejected_mean"]
    )
    return {
        "held_out_margin": margin.mean().item(),
        "held_out_acc": (margin > 0).float().mean().item(),
        "held_out_logp_chosen": final["base_chosen_mean"].mean().item(),
        "held_out_n": len(triples),
    }


def report(root: Path, iters: int) -> str:
    """Markdown tables from the run folders: one row per variant and iteration, then the held-out comparison."""
    header = "| variant | iter | " + " | ".join(title for _, title, _ in ITERATION_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(ITERATION_COLUMNS) + 2)]
    held = ["| variant | held-out margin vs initial | held-out acc | triples |", "|---|---|---|---|"]
    for variant, label in LABELS.items():
        for t in range(1, iters + 1):
            path = root / variant / f"iter_{t}" / "metrics.json"
            if path.exists():
                record = json.loads(path.read_text())
                cells = [
                    fmt.format(record[key]) if record.get(key) is not None else "-" for key, _, fmt in ITERATION_COLUMNS
                ]
                lines.append(f"| {label} | {t} | " + " | ".join(cells) + " |")
        evaluation = root / variant / "held_out.json"
        if evaluation.exists():
            e = json.loads(evaluation.read_text())
            held.append(f"| {label} | {e['held_out_margin']:.3f} | {e['held_out_acc']:.2f} | {e['held_out_n']} |")
    return "\n".join(lines) + "\n\n" + "\n".join(held)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/ablations", help="one folder per variant, plus the held-out data")
    parser.add_argument("--model", default=None, help="as sso.py --model (default: SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--prompts", default=str(sso.DEFAULT_PROMPTS))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--prompts-per-iter", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=8, help="prompts kept out of training, sampled once")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true")
    cli, extra = parser.parse_known_args(argv)  # anything else goes to every sso.py run, e.g. --lr 1e-5
    root = Path(cli.root)
    if cli.report_only:
        print(report(root, cli.iters))
        return
    root.mkdir(parents=True, exist_ok=True)
    train_file, held_out_queries = split_prompts(cli.prompts, cli.held_out, cli.seed, root)
    common = [
        "--prompts",
        train_file,
        "--iters",
        str(cli.iters),
        "--prompts-per-iter",
        str(cli.prompts_per_iter),
        "--max-new-tokens",
        str(cli.max_new_tokens),
        "--seed",
        str(cli.seed),
        *extra,
    ]
    args = sso.parse_args(common)
    principles = sso.load_principles(args.principles)

    # 0. the initial model, saved once as plain safetensors (fast to load for every variant), and held-out triples
    initial_dir = root / "initial"
    source = str(initial_dir) if (initial_dir / "config.json").exists() else sso.resolve_model(cli.model)
    initial, tokenizer = sso.load_model(source, torch.device("cpu"), torch.float32)
    if source != str(initial_dir):
        initial.save_pretrained(initial_dir)
        tokenizer.save_pretrained(initial_dir)
    eot_id, pad_id = sso.end_of_turn_id(tokenizer), tokenizer.pad_token_id
    held_triples = sample_held_out(initial, tokenizer, held_out_queries, principles, args, root / "held_out.json")
    initial_logps = sso.pair_logps(initial, held_triples, eot_id, pad_id, "cpu", ("base",))
    del initial

    # 1. the four variants, each resumable
    for number, (variant, flags) in enumerate(VARIANTS.items(), 1):
        out = root / variant
        state = out / "state.json"
        done = json.loads(state.read_text())["completed_iters"] if state.exists() else 0
        print(f"##### variant {number}/4: {LABELS[variant]} ({done}/{cli.iters} iterations already done)")
        if done < cli.iters:
            resume = ["--resume"] if (out / "config.json").exists() else []
            sso.main(
                ["--output-dir", str(out), *resume]
                if resume
                else ["--model", str(initial_dir), "--output-dir", str(out), *common, *flags]
            )
        if not (out / "held_out.json").exists():
            final, _ = sso.load_model(str(out / f"iter_{cli.iters}"), torch.device("cpu"), torch.float32)
            result = held_out_margin(final, initial_logps, held_triples, eot_id, pad_id)
            (out / "held_out.json").write_text(json.dumps(result, indent=2))
    print(report(root, cli.iters))


if __name__ == "__main__":
    main()
