"""Draw sso.py runs into one PNG. Needs matplotlib (pip install -r requirements-dev.txt); sso.py itself does not.

    python experiments/plot.py runs/sso                        # one run, four panels: runs/sso/run.png
    python experiments/plot.py runs/ablations/* --out cmp.png  # several runs side by side

One run: the loss per optimizer step; the margin Δ of each pair per step (a dot per step, its accuracy as a line);
per iteration, the mean token log-probs of y+, y- and y0 under the plain prompt x before training (how on-policy the
signals are, paper Figure 4); and the held-out margin of the policy against the initial one, with its 95% interval.
Several runs: the held-out margin with its interval, the looping share and length of held-out plain answers y0, and
W, per iteration, one line per run.
"""

import argparse
import json
from pathlib import Path


def load(run: Path) -> tuple[list[dict], dict[int, dict]]:
    """The step records and, per iteration (0 = the initial policy), the merged iteration and held-out records."""
    steps, iters = [], {}
    for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        if record["type"] == "step":
            steps.append(record)
        else:
            iters.setdefault(record["iter"], {}).update(record)
    return steps, iters


def held_out(axis, iters: dict, label=None):
    """The held-out margin per iteration with its bootstrap interval as error bars."""
    ts = sorted(t for t in iters if "heldout_margin" in iters[t])
    margin = [iters[t]["heldout_margin"] for t in ts]
    below = [iters[t]["heldout_margin"] - iters[t]["heldout_low"] for t in ts]
    above = [iters[t]["heldout_high"] - iters[t]["heldout_margin"] for t in ts]
    axis.errorbar(ts, margin, yerr=[below, above], marker="o", capsize=3, label=label)
    axis.axhline(0, color="gray", lw=0.8)
    axis.set(xlabel="iteration (0: initial policy)", ylabel="held-out margin vs initial, 95% interval", xticks=ts)


def one_run(run: Path, out: Path, plt) -> None:
    steps, iters = load(run)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    x = range(1, len(steps) + 1)
    boundaries = [i + 0.5 for i in range(1, len(steps)) if steps[i]["iter"] != steps[i - 1]["iter"]]
    axes[0, 0].plot(x, [s["loss"] for s in steps], marker=".")
    axes[0, 0].set(xlabel="optimizer step", ylabel="loss L = ℓ_base + W·γ·G")
    for pair, color in zip(("base", "pos", "neg"), ("C0", "C1", "C2")):
        axes[0, 1].plot(x, [s[f"margin_{pair}"] for s in steps], ".", color=color, label=f"margin Δ {pair}")
    axes[0, 1].axhline(0, color="gray", lw=0.8)
    axes[0, 1].set(xlabel="optimizer step", ylabel="margin Δ (a dot per step)")
    accuracy = axes[0, 1].twinx()
    for pair, color in zip(("base", "pos", "neg"), ("C0", "C1", "C2")):
        acc = [s[f"acc_{pair}"] for s in steps]
        running = [sum(acc[max(0, i - 7) : i + 1]) / len(acc[max(0, i - 7) : i + 1]) for i in range(len(acc))]
        accuracy.plot(x, running, color=color, lw=1, alpha=0.6)
    accuracy.set(ylabel="accuracy, mean of the last 8 steps (lines)", ylim=(-0.05, 1.05))
    for axis in (axes[0, 0], axes[0, 1]):
        for b in boundaries:
            axis.axvline(b, color="gray", ls=":", lw=0.8)
    axes[0, 1].legend(fontsize=8)
    ts = sorted(t for t in iters if "logp_chosen" in iters[t])
    for key, label in (("chosen", "y+"), ("rejected", "y-"), ("plain", "y0")):
        axes[1, 0].plot(ts, [iters[t][f"logp_{key}"] for t in ts], marker="o", label=f"log π({label}|x)")
    axes[1, 0].set(xlabel="iteration", ylabel="mean token log-prob under x, before training", xticks=ts)
    axes[1, 0].legend(fontsize=8)
    held_out(axes[1, 1], iters)
    fig.suptitle(str(run))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def several_runs(runs: list[Path], out: Path, plt) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for run in runs:
        _, iters = load(run)
        held_out(axes[0], iters, label=run.name)
        for axis, key in zip(axes[1:], ("heldout_looping", "heldout_len_plain", "w")):
            ts = sorted(t for t in iters if key in iters[t])
            axis.plot(ts, [iters[t][key] for t in ts], marker="o", label=run.name)
    labels = ("looping share of held-out y0", "held-out y0 length (tokens)", "W, mean over training steps")
    for axis, label in zip(axes[1:], labels):
        axis.set(xlabel="iteration (0: initial policy)", ylabel=label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders written by sso.py (--output-dir)")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN/run.png for one run)")
    cli = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(run) for run in cli.runs if (Path(run) / "metrics.jsonl").exists()]
    out = Path(cli.out or runs[0] / "run.png")
    one_run(runs[0], out, plt) if len(runs) == 1 else several_runs(runs, out, plt)
    print(f"wrote {out}")
    return str(out)


if __name__ == "__main__":
    main()
