"""Benchmark sso.py on SmolLM2-135M-Instruct (the offline GGUF) on this machine's CPU.

    python benchmarks/bench_sso.py --default-run         # `python sso.py --iters 3` as a user first runs it
    python benchmarks/bench_sso.py --default-run --seed 1 --results experiments/results.jsonl --setting default
    python benchmarks/bench_sso.py --default-run --generator     # `python sso_generator.py` (the paper's v2) alike
    python benchmarks/bench_sso.py                       # one iteration, phase by phase
    python benchmarks/bench_sso.py --no-gradient-checkpointing --batch-size 2   # any sso.py flag can be added

--default-run: the default command (plus any sso.py flags given), run in this process as a user runs it (the GGUF
dequantized as it loads). Prints each phase's seconds and share of the whole run's wall time, the peak resident memory
and the held-out lines; with --results, appends one JSON line with the run's settings, held-out check per iteration,
wall time, memory and phases (experiments/sweep.py reads them).

One iteration: exactly what sso.py runs (sso.run_iteration, then the held-out check), timed phase by phase, on the
bundled prompts. The workload defaults to 16 prompts, 128 new tokens and batch size 2, the settings of this
benchmark's earlier versions, so that iteration times compare across versions; loading the model is timed apart.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.time()  # a run's wall time counts from here, before torch and transformers are imported

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sso  # noqa: E402
import sso_generator  # noqa: E402

TIMED = ("load_model", "held_out_data", "select_features", "sample_responses", "reference_logps", "train_epoch")
TIMED += ("held_out_check", "generate_batched")
HELD_OUT_KEYS = ("iter", "kept", "heldout_n", "heldout_margin", "heldout_low", "heldout_high", "heldout_acc")
HELD_OUT_KEYS += ("heldout_len_plain", "heldout_ended", "heldout_looping", "heldout_restates")
QUALITY = ("onpolicy", "acc_ends_shorter", "acc_pi0_reads")  # sso_generator.py: its policy's data, with intervals
HELD_OUT_KEYS += tuple(f"{key}{end}" for key in QUALITY for end in ("", "_low", "_high"))
HELD_OUT_KEYS += ("ended_chosen", "ended_rejected", "len_chosen", "len_rejected")


def record_calls(names=TIMED) -> list[tuple[str, float, float]]:
    """Wrap sso's phase functions (run and run_iteration call them through the module) so that each call appends
    (name, start, end) to the returned list."""
    calls = []
    for name in names:

        def timed(*args, _function=getattr(sso, name), _name=name, **kwargs):
            started = time.time()
            try:
                return _function(*args, **kwargs)
            finally:
                desc = kwargs.get("desc", "sampling")  # generate_batched: which phase called it
                calls.append((f"{_name}:{desc}" if _name == "generate_batched" else _name, started, time.time()))

        setattr(sso, name, timed)
    return calls


def seconds_in(calls, name: str, outside: str | None = None) -> float:
    """Total seconds of the calls of `name`, leaving out those made inside a call of `outside`."""
    spans = [(start, end) for n, start, end in calls if n == outside]
    inner = [(start, end) for n, start, end in calls if n == name]
    return sum(end - start for start, end in inner if not any(a <= start and end <= b for a, b in spans))


def phases(calls, wall: float) -> dict[str, float]:
    """The run's wall time split into its phases, in seconds."""
    features = seconds_in(calls, "select_features", outside="held_out_data")
    answers = seconds_in(calls, "generate_batched:held-out y0")
    split = {
        "load": seconds_in(calls, "load_model"),
        "initial held-out check": seconds_in(calls, "held_out_data"),
        "feature selection": features,
        "sampling": seconds_in(calls, "sample_responses", outside="held_out_data"),
        "reference": seconds_in(calls, "reference_logps"),
        "training": seconds_in(calls, "train_epoch"),
        "held-out checks (margin)": seconds_in(calls, "held_out_check", outside="held_out_data") - answers,
        "held-out answers (y0)": answers,
    }
    return split | {"other": wall - sum(split.values())}  # imports, saving, logging


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or None  # fmt: skip
    except OSError:
        return None


def default_run(flags: list[str], keep: str | None, setting: str, results: str | None, generator=False) -> None:
    """`python sso.py --iters 3 FLAGS` (or `python sso_generator.py FLAGS`) in this process: phases, wall time, peak RSS."""
    os.environ |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = Path(keep) if keep else Path(tempfile.mkdtemp()) / "run"
    started_at = commit()  # the code the run starts with
    calls = record_calls()
    if generator:
        sso_generator.main(["--device", "cpu", *flags, "--output-dir", str(out)])  # the CPU, even where CUDA is
    else:
        sso.main(["--iters", "3", "--device", "cpu", *flags, "--output-dir", str(out)])
    wall, rss = time.time() - STARTED, peak_rss_mb()
    split = phases(calls, wall)
    print(f"\nwall time {wall / 60:.1f} min | peak RSS {rss:.0f} MB\n\n| phase | seconds | share of the run |")
    print("|---|---|---|")
    for name, seconds in split.items():
        print(f"| {name} | {seconds:.0f} | {100 * seconds / wall:.0f}% |")
    rows = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if record["type"] != "step":
            rows.setdefault(record["iter"], {}).update({k: v for k, v in record.items() if k in HELD_OUT_KEYS})
    if results:
        config = json.loads((out / "config.json").read_text())
        row = {"setting": setting, "seed": config["seed"], "flags": flags, "commit": started_at, "config": config}
        row |= {"script": "sso_generator.py"} if generator else {}
        row |= {"wall_min": wall / 60, "peak_rss_mb": rss, "phases": split, "iterations": list(rows.values())}
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")


def one_iteration(extra: list[str]) -> None:
    workload = [
        "--device",
        "cpu",
        "--prompts-per-iter",
        "16",
        "--max-new-tokens",
        "128",
        "--batch-size",
        "2",
        "--eval-prompts",
        "16",
    ]
    args = sso.parse_args([*workload, *extra, "--output-dir", "/tmp/sso-bench"])
    principles = sso.load_principles(args.principles)
    prompts = sso.load_prompts(args.prompts)
    random.Random(args.seed).shuffle(prompts)
    held_queries, queries = prompts[: args.eval_prompts], prompts[args.eval_prompts :][: args.prompts_per_iter]
    started = time.time()
    policy, tokenizer = sso.load_model(args.model or sso.default_model(), args)
    load_s = time.time() - started
    print("config: " + " ".join([*workload, *extra]))
    held = sso.held_out_data(
        Path(tempfile.mkdtemp()), policy, tokenizer, held_queries, principles, args, lambda r, line: print(line), 0
    )
    calls = record_calls()
    policy, triples, record = sso.run_iteration(policy, tokenizer, queries, principles, args, 1, lambda r, s: None)
    sso.held_out_check(policy, tokenizer, held, args, 1, lambda r, s: None)
    features = seconds_in(calls, "select_features")
    sampled = sum(len(ids) for t in triples for ids in t.ids.values())  # the kept triples' sampled tokens
    trained = sum(len(ctx) * 2 + len(a) + len(b) + 2 for t in triples for ctx, a, b in
                  ((t.contexts[c], t.ids[y], t.ids[n]) for c, y, n in sso.PAIRS.values()))  # fmt: skip
    rows = [("model load", load_s, None), ("feature selection", features, None),
            ("sampling y+ y- y0", seconds_in(calls, "sample_responses"), None),
            ("reference log-probs", seconds_in(calls, "reference_logps"), trained),
            ("training", seconds_in(calls, "train_epoch"), trained)]  # fmt: skip
    iteration = sum(s for _, s, _ in rows)
    print(f"\n{len(queries)} prompts, {record['kept']} triples kept ({sampled} tokens sampled in them), "
          f"{args.max_new_tokens} new tokens, batch size {args.batch_size}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}\n")  # fmt: skip
    print("| phase | seconds | tokens/s |\n|---|---|---|")
    for name, s, tokens in rows:
        print(f"| {name} | {s:.1f} | {tokens / s:.0f} |" if tokens else f"| {name} | {s:.1f} | - |")
    print(f"| **one iteration** | **{iteration:.1f}** | |")
    answers = seconds_in(calls, "generate_batched:held-out y0")
    check = seconds_in(calls, "held_out_check") - answers
    print(
        f"| held-out check: margin, interval, accuracy ({len(held['triples'])} prompts) | {check:.1f} "
        f"({100 * check / iteration:.0f}% of the iteration) | |"
    )
    print(
        f"| held-out answers y0 ({len(held['triples'])} prompts) | {answers:.1f} "
        f"({100 * answers / iteration:.0f}% of the iteration) | |"
    )
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default-run", action="store_true", help="time `python sso.py --iters 3` as a user runs it")
    parser.add_argument("--keep", default=None, help="with --default-run: the folder to keep that run in")
    parser.add_argument("--results", default=None, help="with --default-run: append the run's numbers to this file")
    parser.add_argument("--setting", default="default", help="with --results: the name the row is filed under")
    parser.add_argument("--generator", action="store_true", help="with --default-run: sso_generator.py, not sso.py")
    cli, extra = parser.parse_known_args()
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | {os.cpu_count()} CPUs")
    if cli.default_run:
        default_run(extra, cli.keep, cli.setting, cli.results, cli.generator)
    else:
        one_iteration(extra)


if __name__ == "__main__":
    main()
