"""Seed runs and sweeps of sso.py at classroom scale (SmolLM2-135M-Instruct, 2 CPU cores), filed in results.jsonl.

    python experiments/sweep.py --only default --seeds 0 1 2    # the default command on three seeds
    python experiments/sweep.py --only lr1e-4 no-w --seeds 0    # other settings
    python experiments/sweep.py --report-only                   # the README's tables and sweep.png, from results.jsonl

Each run is `python benchmarks/bench_sso.py --default-run` with the setting's flags and the seed: the default command
(`python sso.py --iters 3`) plus those flags, from an empty $SSO_CACHE, with its phases timed. It runs in a process of
its own, so its wall time and peak memory are its own, and appends one line to experiments/results.jsonl: the
setting, seed, resolved config, the held-out check after every iteration (margin against π_0 with its 95% interval,
accuracy, length and looping share of the plain answers y0), wall time, peak memory and the time of each phase. A
(setting, seed) already in the file is skipped, so a sweep stopped midway continues where it stopped; run one at a
time, since two runs side by side take twice as long each.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
SETTINGS = {  # name: flags added to sso.py's defaults
    "default": [],
    "lr1e-4": ["--lr", "1e-4"],
    "lr2e-5": ["--lr", "2e-5"],
    "prompts16": ["--prompts-per-iter", "16"],
    "prompts24": ["--prompts-per-iter", "24"],
    "prompts32": ["--prompts-per-iter", "32"],
    "tokens128": ["--max-new-tokens", "128"],  # more responses end before the limit
    "tokens256": ["--max-new-tokens", "256"],
    "lora16-lr3e-4": ["--lora-rank", "16", "--lr", "3e-4"],
    "lora16-lr1e-3": ["--lora-rank", "16", "--lr", "1e-3"],
    "dpo": ["--loss", "dpo"],
    "loopfilter-none": ["--loop-filter", "none"],
    "steer": ["--principles", "data/smollm2_principles.json"],  # the paper's Concision alone: a class sees it steer
    "steer-lora16-lr3e-4": ["--principles", "data/smollm2_principles.json", "--lora-rank", "16", "--lr", "3e-4"],
    "no-w": ["--no-w"],  # paper Table 12 ablations
    "no-g": ["--no-g"],
    "pbaa": ["--no-w", "--no-g"],
}


def load(path: Path = RESULTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def command(row: dict) -> str:
    return " ".join(["python sso.py --iters 3", *row["flags"]])


def report(rows: list[dict]) -> str:
    """One markdown row per run: the held-out check after the last iteration, and iteration 0 → last for y0."""
    lines = [
        "| setting | command | held-out margin [95% interval] | acc | looping y0 | length y0 | wall time | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["setting"] != "default", r["setting"], r["seed"])):
        first, last = row["iterations"][0], row["iterations"][-1]
        setting = f"{row['setting']} ({row['note']})" if "note" in row else row["setting"]  # a run of a variant
        lines.append(
            f"| {setting} | `{command(row)}` | {last['heldout_margin']:+.4f} [{last['heldout_low']:+.4f}, "
            f"{last['heldout_high']:+.4f}] | {last['heldout_acc']:.2f} | {first['heldout_looping']:.2f} → "
            f"{last['heldout_looping']:.2f} | {first['heldout_len_plain']:.0f} → {last['heldout_len_plain']:.0f} | "
            f"{row['wall_min']:.1f} min | {row['peak_rss_mb'] / 1024:.1f} GB |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Held-out margin (with its interval) and looping share after each iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 colours: up to 20 runs, each its own
    for row in rows:
        checks = row["iterations"]
        iters = [c["iter"] for c in checks]
        margin = [c["heldout_margin"] for c in checks]
        below = [c["heldout_margin"] - c["heldout_low"] for c in checks]
        above = [c["heldout_high"] - c["heldout_margin"] for c in checks]
        label = f"{row['setting']}, seed {row['seed']}"
        line = left.errorbar(iters, margin, yerr=[below, above], marker="o", capsize=3, label=label)
        right.plot(iters, [c["heldout_looping"] for c in checks], marker="o", color=line[0].get_color())
    left.axhline(0, color="gray", lw=0.8)
    left.set(xlabel="iteration", ylabel="held-out base-pair margin vs initial (95% interval)", xticks=iters)
    right.set(xlabel="iteration", ylabel="looping share of held-out plain answers y0", xticks=iters)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["default"], choices=list(SETTINGS), help="settings to run")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--root", default="runs/sweep", help="one run folder per setting and seed")
    parser.add_argument("--results", default=str(RESULTS), help="the file each finished run appends its line to")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plot", default=str(HERE / "sweep.png"), help="the figure written from the results file")
    cli, extra = parser.parse_known_args(argv)  # anything else goes to every run, e.g. --model
    results = Path(cli.results)
    for name in [] if cli.report_only else cli.only:
        for seed in cli.seeds:
            if any(r["setting"] == name and r["seed"] == seed for r in load(results)):
                continue
            out = Path(cli.root) / f"{name}_s{seed}"
            shutil.rmtree(out, ignore_errors=True)  # a run stopped midway starts again: its time is measured whole
            print(f"##### {out.name}: {' '.join(SETTINGS[name])}", flush=True)
            bench = [sys.executable, str(HERE.parent / "benchmarks" / "bench_sso.py"), "--default-run"]
            bench += ["--keep", str(out), "--results", str(results), "--setting", name]
            seed_flags = ["--seed", str(seed)] if seed else []  # seed 0 is sso.py's default
            subprocess.run([*bench, *SETTINGS[name], *extra, *seed_flags], check=True)
    rows = load(results)
    print(report(rows))
    if rows:
        plot(rows, Path(cli.plot))


if __name__ == "__main__":
    main()
