"""What makes SSO learn visibly on held-out prompts at classroom scale? A sweep on SmolLM2-135M-Instruct, 2 CPU cores.

    python experiments/sweep.py                        # every setting below, 3 iterations each (resumable)
    python experiments/sweep.py --only lr2e-5 lr5e-5   # some settings
    python experiments/sweep.py --only lr5e-5 --seed 1 # another seed (its own folders, name suffix _s1)
    python experiments/sweep.py --report-only          # the markdown table and sweep.png from finished runs

Every setting is `python sso.py` with BASE plus its own flags, so the table does not depend on sso.py's defaults. The
held-out columns come from sso.py's own check (NOTE(impl) 12 in sso.py): the base-pair margin of the final policy
against the initial one on prompts never trained on, its 95% bootstrap interval and accuracy, and the looping share
and length of fresh plain answers y0, before (iteration 0) and after training. A finished setting is skipped, an
unfinished one resumed.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402

BASE = ["--iters", "3", "--prompts-per-iter", "16", "--eval-prompts", "32", "--max-new-tokens", "96"]
BASE += ["--batch-size", "1", "--loss", "ipo", "--beta", "0.1", "--gamma", "0.1", "--loop-filter", "all"]
SETTINGS = {  # name: flags added to BASE (later flags win)
    "lr5e-6": ["--lr", "5e-6"],
    "lr2e-5": ["--lr", "2e-5"],
    "lr3e-5": ["--lr", "3e-5"],
    "lr5e-5": ["--lr", "5e-5"],
    "lr1e-4": ["--lr", "1e-4"],
    "lr5e-5-loopfilter-chosen": ["--lr", "5e-5", "--loop-filter", "chosen"],
    "lr5e-5-loopfilter-none": ["--lr", "5e-5", "--loop-filter", "none"],
    "lr5e-5-batch2": ["--lr", "5e-5", "--batch-size", "2"],
    "lr5e-5-dpo": ["--lr", "5e-5", "--loss", "dpo"],
    "lr5e-5-beta0.5": ["--lr", "5e-5", "--beta", "0.5"],
    "lr5e-5-gamma0.5": ["--lr", "5e-5", "--gamma", "0.5"],
    "lora16-lr3e-4": ["--lora-rank", "16", "--lr", "3e-4"],
    "lora16-lr1e-3": ["--lora-rank", "16", "--lr", "1e-3"],
}


def records(folder: Path) -> dict[int, dict]:
    """Iteration records (iteration 0 = the initial policy's held-out check) of one run."""
    rows = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["type"] != "step":
            rows.setdefault(record["iter"], {}).update(record)
    return rows


def report(root: Path, names: list[str]) -> str:
    """One markdown row per finished run: the final held-out check against iteration 0."""
    lines = [
        "| setting | seed | held-out margin [95% interval] | acc | looping y0, iter 0 → 3 | length y0, iter 0 → 3 |",
        "|---|---|---|---|---|---|",
    ]
    for folder in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").exists()):
        name, _, seed = folder.name.partition("_s")
        if name not in names or not (folder / "iter_3").exists():
            continue
        rows = records(folder)
        first, last = rows[0], rows[max(rows)]
        lines.append(
            f"| {name} | {seed or 0} | {last['heldout_margin']:+.4f} [{last['heldout_low']:+.4f}, "
            f"{last['heldout_high']:+.4f}] | {last['heldout_acc']:.2f} | {first['heldout_looping']:.2f} → "
            f"{last['heldout_looping']:.2f} | {first['heldout_len_plain']:.0f} → {last['heldout_len_plain']:.0f} |"
        )
    return "\n".join(lines)


def plot(root: Path, names: list[str], path: Path) -> None:
    """Held-out margin (with its interval) and looping share after each iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for folder in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").exists()):
        if folder.name.partition("_s")[0] not in names:
            continue
        rows = records(folder)
        iters = sorted(t for t in rows if "heldout_margin" in rows[t])
        margin = [rows[t]["heldout_margin"] for t in iters]
        low = [rows[t]["heldout_margin"] - rows[t]["heldout_low"] for t in iters]
        high = [rows[t]["heldout_high"] - rows[t]["heldout_margin"] for t in iters]
        line = left.errorbar(iters, margin, yerr=[low, high], marker="o", capsize=3, label=folder.name)
        right.plot(iters, [rows[t]["heldout_looping"] for t in iters], marker="o", color=line[0].get_color())
    left.axhline(0, color="gray", lw=0.8)
    left.set(xlabel="iteration", ylabel="held-out base-pair margin vs initial (95% interval)", xticks=[0, 1, 2, 3])
    right.set(xlabel="iteration", ylabel="looping share of held-out plain answers y0", xticks=[0, 1, 2, 3])
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/sweep", help="one folder per setting (and seed)")
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), help="settings to run or report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("sweep.png")), help="PNG written at the end")
    cli, extra = parser.parse_known_args(argv)  # anything else goes to every run, e.g. --model
    root = Path(cli.root)
    root.mkdir(parents=True, exist_ok=True)
    for name in cli.only if not cli.report_only else []:
        out = root / (name if cli.seed == 0 else f"{name}_s{cli.seed}")
        if (out / "iter_3").exists():
            continue
        print(f"##### {out.name}: {' '.join(SETTINGS[name])}", flush=True)
        resume = (out / "config.json").exists()
        flags = [*BASE, *SETTINGS[name], "--seed", str(cli.seed), *extra]
        sso.main(["--output-dir", str(out), "--resume"] if resume else [*flags, "--output-dir", str(out)])
    print(report(root, cli.only))
    plot(root, cli.only, Path(cli.plot))


if __name__ == "__main__":
    main()
