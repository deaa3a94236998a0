"""The paper's W / G ablations (Tables 5 and 12) and its signal analysis (Figure 4), small, offline, on a CPU.

    python experiments/ablations.py                 # 4 variants x 3 iterations on SmolLM2-135M-Instruct (resumable)
    python experiments/ablations.py --report-only   # the tables and ablations.png from finished runs
    python experiments/ablations.py --lr 5e-5       # any other sso.py flag goes to every variant

Variants: full SSO, without W (--no-w), without G (--no-g) and without both (the paper's modified PBAA). Each is
`python sso.py` with its defaults and the same seed, so all four set aside the same held-out prompts and sample the
same held-out y+ and y- from the same initial model: sso.py's own held-out check compares them. A finished variant is
skipped, an unfinished one resumed. The figure needs matplotlib (requirements-dev.txt).
"""

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import plot  # noqa: E402

import sso  # noqa: E402

VARIANTS = {"sso": [], "no_w": ["--no-w"], "no_g": ["--no-g"], "no_w_no_g": ["--no-w", "--no-g"]}
LABELS = {"sso": "SSO", "no_w": "w/o W", "no_g": "w/o G", "no_w_no_g": "w/o W, G (PBAA)"}
COLUMNS = [  # (metrics key, column title, format)
    ("kept", "kept", "{:d}"),
    ("logp_chosen", "logp y+", "{:.3f}"),
    ("logp_rejected", "logp y-", "{:.3f}"),
    ("logp_plain", "logp y0", "{:.3f}"),
    ("len_chosen", "len y+", "{:.0f}"),
    ("len_rejected", "len y-", "{:.0f}"),
    ("margin_base", "margin base", "{:.3f}"),
    ("acc_base", "acc base", "{:.2f}"),
    ("w", "W", "{:.3f}"),
    ("heldout_margin", "held-out margin", "{:+.4f}"),
    ("heldout_acc", "held-out acc", "{:.2f}"),
    ("heldout_len_plain", "held-out len y0", "{:.0f}"),
    ("heldout_looping", "held-out looping", "{:.2f}"),
]


def report(root: Path) -> str:
    """A markdown table: one row per variant and iteration (0 = the initial policy's held-out check)."""
    lines = [
        "| variant | iter | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for variant, label in LABELS.items():
        if not (root / variant / "metrics.jsonl").exists():
            continue
        for t, record in sorted(plot.load(root / variant)[1].items()):
            cells = [fmt.format(record[key]) if key in record else "-" for key, _, fmt in COLUMNS]
            lines.append(f"| {label} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/ablations", help="one folder per variant")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("ablations.png")), help="the figure to write")
    cli, extra = parser.parse_known_args(argv)  # anything else goes to every sso.py run, e.g. --lr 5e-5
    root = Path(cli.root)
    for number, (variant, flags) in enumerate(VARIANTS.items() if not cli.report_only else [], 1):
        out = root / variant
        if (out / f"iter_{sso.parse_args(extra).iters}").exists():
            continue
        print(f"##### variant {number}/4: {LABELS[variant]}", flush=True)
        resume = (out / "config.json").exists()
        sso.main(["--output-dir", str(out), "--resume"] if resume else [*extra, *flags, "--output-dir", str(out)])
    print(report(root))
    runs = [str(root / v) for v in VARIANTS if (root / v / "metrics.jsonl").exists()]
    if runs and importlib.util.find_spec("matplotlib"):
        plot.main([*runs, "--out", cli.plot])


if __name__ == "__main__":
    main()
