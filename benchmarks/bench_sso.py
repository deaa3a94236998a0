"""Benchmark sso.py on SmolLM2-135M-Instruct (the offline GGUF) on this machine's CPU.

    python benchmarks/bench_sso.py                       # one iteration, phase by phase
    python benchmarks/bench_sso.py --no-gradient-checkpointing --batch-size 2   # any sso.py flag can be added
    python benchmarks/bench_sso.py --default-run         # `python sso.py --iters 3` as a user first runs it

One iteration: exactly what sso.py runs (sso.run_iteration, then the held-out check), timed phase by phase, on the
bundled prompts. The workload defaults to 16 prompts, 128 new tokens and batch size 2, the settings of this
benchmark's earlier versions, so that iteration times compare across versions; the model is loaded from the
dequantized copy (a first run dequantizes it). Prints seconds and tokens/s per phase and the peak resident memory.

--default-run: the default command in a subprocess, with an empty temporary $SSO_CACHE so that the GGUF is
dequantized as on a user's first run; prints its wall time, its peak resident memory and its last held-out line.
"""

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sso  # noqa: E402

PHASES = ("select_features", "sample_triples", "reference_logps", "train_epoch", "held_out_check")


def time_phases(names=PHASES) -> dict:
    """Wrap sso's phase functions so that each call adds its wall time (run_iteration calls them through the module);
    the last result of each is kept under ("result", name)."""
    seconds = dict.fromkeys(names, 0.0)
    for name in names:

        def timed(*args, _function=getattr(sso, name), _name=name, **kwargs):
            started = time.time()
            try:
                seconds["result", _name] = _function(*args, **kwargs)
                return seconds["result", _name]
            finally:
                seconds[_name] += time.time() - started

        setattr(sso, name, timed)
    return seconds


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def default_run(keep: str | None) -> None:
    """`python sso.py --iters 3` in a subprocess with an empty $SSO_CACHE: its wall time, peak RSS, held-out lines."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as scratch:
        started = time.time()
        env = {**os.environ, "SSO_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        out = keep or f"{scratch}/run"
        result = subprocess.run([sys.executable, str(ROOT / "sso.py"), "--iters", "3", "--output-dir", out], env=env,
                                capture_output=True, text=True)  # fmt: skip
        minutes, rss = (time.time() - started) / 60, peak_rss_mb(resource.RUSAGE_CHILDREN)
        held = [line for line in result.stdout.splitlines() if line.startswith("held-out after")]
        print(f"exit {result.returncode} | wall time {minutes:.1f} min | peak RSS {rss:.0f} MB")
        print("\n".join(held) or result.stderr[-2000:])
        if keep:
            (Path(keep) / "stdout.txt").write_text(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--default-run", action="store_true", help="time `python sso.py --iters 3` from a cold cache")
    parser.add_argument("--keep", default=None, help="with --default-run: the folder to keep that run in")
    cli, extra = parser.parse_known_args()
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | {os.cpu_count()} CPUs")
    if cli.default_run:
        return default_run(cli.keep)
    workload = ["--prompts-per-iter", "16", "--max-new-tokens", "128", "--batch-size", "2", "--eval-prompts", "16"]
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
    seconds = time_phases()
    policy, triples, record = sso.run_iteration(policy, tokenizer, queries, principles, args, 1, lambda r, s: None)
    sso.held_out_check(policy, tokenizer, held, args, 1, lambda r, s: None)
    seconds["sampling"] = seconds.pop("sample_triples") - seconds["select_features"]
    sampled = sum(len(ids) for t in seconds["result", "sample_triples"] for ids in t.ids.values())  # all sampled
    trained = sum(len(ctx) * 2 + len(a) + len(b) + 2 for t in triples for ctx, a, b in
                  ((t.contexts[c], t.ids[y], t.ids[n]) for c, y, n in sso.PAIRS.values()))  # fmt: skip
    rows = [("model load", load_s, None), ("feature selection", seconds["select_features"], None),
            ("sampling y+ y- y0", seconds["sampling"], sampled), ("reference log-probs", seconds["reference_logps"], trained),
            ("training", seconds["train_epoch"], trained)]  # fmt: skip
    iteration = sum(s for _, s, _ in rows)
    print(f"\n{len(queries)} prompts, {record['kept']} triples kept, {args.max_new_tokens} new tokens, batch size "
          f"{args.batch_size}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}\n")  # fmt: skip
    print("| phase | seconds | tokens/s |\n|---|---|---|")
    for name, s, tokens in rows:
        print(f"| {name} | {s:.1f} | {tokens / s:.0f} |" if tokens else f"| {name} | {s:.1f} | - |")
    print(f"| **one iteration** | **{iteration:.1f}** | |")
    check = seconds["held_out_check"]
    print(
        f"| held-out check ({args.eval_prompts} prompts) | {check:.1f} ({100 * check / iteration:.0f}% of the iteration) | |"
    )
    print(f"\npeak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
