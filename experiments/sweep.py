"""Runs of sso.py at classroom scale (SmolLM2-135M-Instruct, 2 CPU cores), filed in results.jsonl, and the experiments
page made from that file.

    python experiments/sweep.py --only default --seeds 0 1 2    # the default command on three seeds
    python experiments/sweep.py --only steer --seeds 0 1 2      # the run a class sees steer (README.md)
    python experiments/sweep.py --only no-w no-g pbaa           # the paper's W/G ablations (Table 12), seed 0
    python experiments/sweep.py --only v2-steer v2-steer-pbaa --seeds 0 1 2   # sso_generator.py (the paper's v2)
    python experiments/sweep.py --report-only                   # the tables of both READMEs, and the figures

Each run is `python benchmarks/bench_sso.py --default-run` with the setting's flags and the seed: `python sso.py
--iters 3` plus those flags (a setting whose first flag is sso_generator.py: `python sso_generator.py` plus the
others), with its phases timed. It runs in a process of its own, so its
wall time and peak memory are its own, and appends one line to experiments/results.jsonl: the setting, seed, resolved
config, the held-out check after every iteration (margin against π_0 with its 95% interval, accuracy, and the plain
answers' length and shares that end, loop and restate the prompt), wall time, peak memory and the time of each phase.
A run is known by its command: the flags in which its config differs from sso.py's defaults of today, so a row keeps
its meaning when a default changes, and a command already in the file is not run again (a sweep stopped midway
continues where it stopped) unless --rerun asks for it; the pages show the run of a command filed last. Run one at a time: two runs side by side take twice as long each.

--report-only rewrites the tables between `<!-- table NAME -->` and `<!-- /table -->` in README.md and
experiments/README.md and draws the figures of the latter, from results.jsonl and contrast.jsonl alone: nothing there
is typed twice.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import contrast  # noqa: E402

import sso  # noqa: E402
import sso_generator  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
FULL = ["--lora-rank", "0", "--lr", "5e-5"]  # the paper's full fine-tuning, at the learning rate that suits it
V2 = "sso_generator.py"  # a setting's first flag: a run of sso_generator.py, not sso.py
SETTINGS = {  # name: flags added to sso.py's defaults
    "default": [],
    "steer": ["--principles", "data/smollm2_principles.json"],  # the paper's Concision alone: a class sees it steer
    "steer-lora16-lr3e-4": ["--principles", "data/smollm2_principles.json", "--lora-rank", "16", "--lr", "3e-4"],
    "steer-full": ["--principles", "data/smollm2_principles.json", *FULL],  # full fine-tuning overshoots?
    "steer-prompts24": ["--principles", "data/smollm2_principles.json", "--prompts-per-iter", "24"],  # v2's 72 prompts
    "full": FULL,
    "full-lr1e-4": ["--lora-rank", "0", "--lr", "1e-4"],
    "full-lr2e-5": ["--lora-rank", "0", "--lr", "2e-5"],
    "prompts16": [*FULL, "--prompts-per-iter", "16"],
    "prompts24": [*FULL, "--prompts-per-iter", "24"],
    "prompts32": [*FULL, "--prompts-per-iter", "32"],
    "tokens128": [*FULL, "--max-new-tokens", "128"],  # more responses end before the limit
    "tokens256": [*FULL, "--max-new-tokens", "256"],
    "lora16-lr3e-4": ["--lora-rank", "16", "--lr", "3e-4"],
    "lora16-lr1e-3": ["--lora-rank", "16", "--lr", "1e-3"],
    "dpo": ["--loss", "dpo"],
    "loopfilter-none": ["--loop-filter", "none"],
    "no-w": [*FULL, "--no-w"],  # paper Table 12 ablations, with full fine-tuning as in the paper
    "no-g": [*FULL, "--no-g"],
    "pbaa": [*FULL, "--no-w", "--no-g"],
    # the paper's published version (sso_generator.py): SSO's generator and PBAA, with each principles file
    "v2-steer": [V2, "--principles", "data/smollm2_principles.json"],
    "v2-steer-pbaa": [V2, "--principles", "data/smollm2_principles.json", "--variant", "pbaa"],
    "v2-steer-pos": [V2, "--principles", "data/smollm2_principles.json", "--variant", "pos"],  # L+ alone
    "v2-steer-neg": [V2, "--principles", "data/smollm2_principles.json", "--variant", "neg"],  # L- alone
    "v2-steer-formula3": [V2, "--principles", "data/smollm2_principles.json", "--variant", "formula3"],
    "v2-steer-ipo": [V2, "--principles", "data/smollm2_principles.json", "--loss", "ipo"],  # L_Base: IPO (Table 6)
    "v2-steer-lr3e-4": [V2, "--principles", "data/smollm2_principles.json", "--lr", "3e-4"],  # sso.py's lr
    "v2-steer-pbaa-lr3e-4": [V2, "--principles", "data/smollm2_principles.json", "--variant", "pbaa", "--lr", "3e-4"],
    "v2-steer-ipo-lr3e-4": [V2, "--principles", "data/smollm2_principles.json", "--loss", "ipo", "--lr", "3e-4"],
    "v2": [V2],
    "v2-pbaa": [V2, "--variant", "pbaa"],
    "v2-written": [V2, "--principle-model", "policy"],  # step 1 as the paper has it, SmolLM2 writing its own p+ / p-
}
PAGE = {  # experiments/README.md: table name -> the settings whose runs it shows
    "default": ["default"],
    "steer": ["steer"],
    "steer-full": ["steer-full"],
    "full": ["full"],
    "ablations": ["full", "no-w", "no-g", "pbaa"],
    "settings": ["full", "full-lr1e-4", "full-lr2e-5", "prompts16", "prompts24", "prompts32", "tokens128", "tokens256"]
    + ["lora16-lr1e-3"],  # LoRA at lr 3e-4 is the default command (its own table)
    "v2-steer": ["steer", "steer-prompts24", "v2-steer-pbaa", "v2-steer"],  # v1 beside v2, Concision alone
    "v2-readme": ["v2-steer"],
    "v2-lr": ["v2-steer-pbaa-lr3e-4", "v2-steer-lr3e-4", "v2-steer-ipo-lr3e-4"],  # seed 0, beside the table above
    "v2": ["default", "v2-pbaa", "v2"],  # v1 beside v2, principles.json
    "v2-written": ["v2", "v2-written"],  # the file's principles against those π_0 writes
    "v2-ablations": ["steer", "v2-steer", "v2-steer-pos", "v2-steer-neg", "v2-steer-formula3", "v2-steer-ipo"],
    "v2-terms": ["v2-steer-pos", "v2-steer-neg"],  # L+ alone and L- alone on every seed run
}
PAGE_SEEDS = {"v2-ablations": [0], "v2-written": [0]}  # tables of one seed: its other seeds are in the tables above
FIGURES = {  # experiments/README.md: figure -> its panels, each (title, settings, seeds); at most 6 runs a panel
    "default.png": [("the default command", ["default"], [0, 1, 2]), ("full fine-tuning", ["full"], [0, 1, 2])],
    "steer.png": [
        ("Concision alone (data/smollm2_principles.json)", ["steer"], [0, 1, 2]),
        ("the same with full fine-tuning", ["steer-full"], [0, 1, 2]),
    ],
    "ablations.png": [("the W/G ablations, full fine-tuning, seed 0", PAGE["ablations"], [0])],
    "settings.png": [
        ("budget, seed 1", ["full", "prompts16", "prompts24", "prompts32"], [1]),
        ("tokens and learning rate, seed 1", ["full", "tokens128", "tokens256", "full-lr1e-4", "full-lr2e-5"], [1]),
        ("LoRA rank 16", ["lora16-lr3e-4", "lora16-lr1e-3"], [0, 1, 2]),
    ],
}
CPU_ROUTE = {"device": ("auto", "cpu"), "dtype": ("auto", "float32")}  # what every run here used
DEFAULTS = {  # each script's settings of today, against which a filed run's command is spelled
    "sso.py": vars(sso.parse_args([])),
    V2: vars(sso.parse_args([], sso_generator.FLAGS)),
}
CURVES = [  # the rows of every figure: (held-out key, axis label)
    ("heldout_margin", "base-pair margin against π_0"),
    ("heldout_len_plain", "length of plain answers y0 (tokens)"),
    ("heldout_ended", "share of y0 that end"),
    ("heldout_looping", "share of y0 stuck in a loop"),
]


def short_path(path: str) -> str:
    """A bundled file's path from the repository root, wherever the repository was (data/x.json, principles.json)."""
    path = Path(path)
    return f"data/{path.name}" if path.parent.name == "data" else path.name


def spelled(value: float) -> str:
    """A float as one would type it: 0.1, 5e-5, 2.5e-5."""
    if not value or abs(value) >= 1e-2:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def command_flags(config: dict, seed: bool = True, script: str = "sso.py") -> list[str]:
    """The flags in which a run's config differs from its script's defaults of today: the run's command now."""
    flags = []
    for key, value in config.items():
        default = DEFAULTS[script].get(key, value)  # a flag sso.py no longer has (micro_batch_size) says nothing
        if key in ("prompts", "principles"):
            value, default = short_path(value), short_path(default)
        if key == "model" and str(value).endswith(sso.GGUF_FILE):  # the default model, wherever it was installed
            value = default
        if value == default or key in ("output_dir", "resume", "iters") or (key == "seed" and not seed):
            continue
        if value in CPU_ROUTE.get(key, ()):  # the CPU in fp32, as "auto" there or resolved (sso.resolve_precision)
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            flags += [flag, spelled(value) if isinstance(value, float) else str(value)]
    return flags


def setting_flags(flags: list[str]) -> list[str]:
    """The script and command flags of a run that FLAGS will make, spelled as run_flags spells a finished run's."""
    if flags[:1] == [V2]:
        try:
            return [V2, *command_flags(vars(sso.parse_args(flags[1:], sso_generator.FLAGS)), script=V2)]
        except sso.SSOError:  # an sso.py flag added to every setting (--prompts-per-iter): no v2 run has it
            return None
    return ["sso.py", *command_flags(vars(sso.parse_args(flags)))]


def run_flags(row: dict, seed: bool = True) -> list[str]:
    """The script of a filed run and the flags of its command today."""
    script = row.get("script", "sso.py")
    return [script, *command_flags(row["config"], seed, script)]


def command(row: dict) -> str:
    script, *flags = run_flags(row)
    return " ".join([f"python {script}" + (" --iters 3" if script == "sso.py" else ""), *flags])


def runs_of(rows: list[dict], settings: list[str], seeds: list[int] | None = None, extra=()) -> list[dict]:
    """The filed runs of these settings (in this order, each with the extra flags), on these seeds (default: all)."""
    wanted = [setting_flags([*SETTINGS[name], *extra]) for name in settings]
    latest = {}  # (command, seed) -> the run filed last: a rerun (--rerun) replaces an earlier one on the page
    for row in rows:
        flags = run_flags(row, seed=False)
        if flags in wanted and (seeds is None or row["seed"] in seeds):
            latest[wanted.index(flags), row["seed"]] = row
    return [latest[key] for key in sorted(latest)]


def filings(rows: list[dict], settings: list[str], seed: int) -> list[dict]:
    """Every filed run of these settings on this seed, in filing order: a rerun beside the runs it replaced."""
    wanted = [setting_flags(SETTINGS[name]) for name in settings]
    found = [row for row in rows if run_flags(row, seed=False) in wanted and row["seed"] == seed]
    return [row | {"note": f"filed at {row.get('commit') or 'an uncommitted tree'}"} for row in found]


def label(row: dict) -> str:
    script, *flags = run_flags(row, seed=False)
    words = " ".join(flags) or "the default command"
    return ("" if script == "sso.py" else f"{script}: ") + f"{words}, seed {row['seed']}"


def markdown(header: list[str], cells: list[list[str]]) -> str:
    """A markdown table: the header, then one row of cells per run."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def table(rows: list[dict]) -> str:
    """One markdown row per run: the held-out check after the last iteration, π_0's → the last for the plain y0."""
    header = ["command", "held-out margin [95% interval]", "acc", "length y0", "ended y0", "looping y0"]
    header += ["restates y0", "wall time", "peak memory"]
    cells = []
    for row in rows:
        first, last = row["iterations"][0], row["iterations"][-1]
        note = f" ({row['note']})" if "note" in row else ""  # a run of a variant of sso.py
        run = [f"`{command(row)}`{note}"]
        run.append(f"{last['heldout_margin']:+.4f} [{last['heldout_low']:+.4f}, {last['heldout_high']:+.4f}]")
        run.append(f"{last['heldout_acc']:.2f}")
        run.append(f"{first['heldout_len_plain']:.0f} → {last['heldout_len_plain']:.0f}")
        for key in ("heldout_ended", "heldout_looping", "heldout_restates"):
            run.append(f"{first[key]:.2f} → {last[key]:.2f}" if key in last else "-")  # older rows lack some
        run += [f"{row['wall_min']:.1f} min", f"{row['peak_rss_mb'] / 1024:.1f} GB"]
        cells.append(run)
    return markdown(header, cells)


def quality_table(rows: list[dict]) -> str:
    """sso_generator.py's runs: the policy's training data (v2 Figure 3) beside the held-out outcome."""
    header = ["command", "data on-policy", "accurate: ends and shorter", "accurate: π_0's reading"]
    header += ["data ended y+ / y-", "data length y+ / y-", "held-out margin", "ended y0", "looping y0"]
    cells = []
    for row in rows:
        first, last = row["iterations"][0], row["iterations"][-1]
        run = [f"`{command(row)}`"]
        for key, form in (("onpolicy", ".3f"), ("acc_ends_shorter", ".2f"), ("acc_pi0_reads", ".2f")):
            interval = f" [{last[key + '_low']:{form}}, {last[key + '_high']:{form}}]" if key + "_low" in last else ""
            run.append(f"{last[key]:{form}}{interval}")  # runs filed before intervals were logged: the figure alone
        for key, form in (("ended", ".2f"), ("len", ".0f")):  # runs filed before these were logged: "-"
            pair = [last.get(f"{key}_{side}") for side in ("chosen", "rejected")]
            run.append(" / ".join(f"{value:{form}}" for value in pair) if None not in pair else "-")
        run.append(f"{last['heldout_margin']:+.4f}")
        run += [f"{first[key]:.2f} → {last[key]:.2f}" for key in ("heldout_ended", "heldout_looping")]
        cells.append(run)
    return markdown(header, cells)


def variant_of(row: dict) -> str:
    """How a run of sso_generator.py made its data: --variant, and who wrote the principles."""
    written = row["config"].get("principle_model")
    return f"--variant {row['config']['variant']}" + (f" --principle-model {written}" if written else "")


def error_bars(runs: list[dict], key: str) -> list[list[float]]:
    """matplotlib's asymmetric error bars of a figure: how far each run's interval reaches below it and above it."""
    return [[run[key] - run[f"{key}_low"] for run in runs], [run[f"{key}_high"] - run[key] for run in runs]]


def plot_quality(rows: list[dict], path: Path) -> None:
    """v2 Figure 3 at class scale: each run's policy data, accuracy against on-policy-ness, a panel per judge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Concision alone: the chosen ends and is shorter", "acc_ends_shorter", "data/smollm2_principles.json"),
        ("principles.json: π_0's reading of p+ / p- (favours PBAA)", "acc_pi0_reads", "principles.json"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.2), squeeze=False)
    for axis, (title, key, principles) in zip(axes[0], panels):
        chosen = [row for row in rows if short_path(row["config"]["principles"]) == principles]
        variants = sorted({variant_of(row) for row in chosen})
        for number, variant in enumerate(variants):
            runs = [row["iterations"][-1] for row in chosen if variant_of(row) == variant]
            x, y = [run["onpolicy"] for run in runs], [run[key] for run in runs]
            bars = {}  # 95% intervals, where the run logged them
            if all(f"{key}_low" in run for run in runs):
                bars = {"xerr": error_bars(runs, "onpolicy"), "yerr": error_bars(runs, key)}
            label = f"{variant} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            axis.errorbar(x, y, **bars, fmt="o", color=f"C{number}", label=label, elinewidth=0.8, alpha=0.8)
        axis.set(title=title, xlabel="on-policy: mean exp(mean token log π_0(y|x))", ylabel="accuracy of the pairs")
        if variants:
            axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)  # each under its panel
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def contrast_tables(path: Path) -> dict[str, str]:
    """Each filed contrast.py run as its command and table, named by its principles file."""
    tables = {}
    for run in map(json.loads, path.read_text().splitlines() if path.exists() else []):
        args = sso.parse_args(run["flags"])
        flags = " ".join([*run["flags"], "--num-prompts", str(run["num_prompts"])])
        heading = f"`python experiments/contrast.py {flags}` ({run['seconds'] / 60:.1f} min), strongest first:\n\n"
        tables[f"contrast {short_path(args.principles)}"] = heading + contrast.table(run)
    return tables


def write_page(page: Path, tables: dict[str, str]) -> None:
    """Replace each `<!-- table NAME -->` ... `<!-- /table -->` block of the page with its table."""
    text = page.read_text()
    for name, markdown in tables.items():
        block = re.compile(rf"(<!-- table {re.escape(name)} -->\n).*?(<!-- /table -->)", re.DOTALL)
        text = block.sub(lambda match: match.group(1) + markdown + "\n" + match.group(2), text)
    page.write_text(text)


def plot(rows: list[dict], path: Path, panels: list[tuple], extra=()) -> None:
    """One column per panel, one row per curve (CURVES) against the iteration; each run a line, the legend below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(CURVES), len(panels), figsize=(5 * len(panels), 2.6 * len(CURVES) + 1.2), squeeze=False
    )
    for column, (title, settings, seeds) in enumerate(panels):
        for number, row in enumerate(runs_of(rows, settings, seeds, extra)):
            checks = row["iterations"]
            iters = [c["iter"] for c in checks]
            color = f"C{number}"  # the run's colour in every row of the panel
            for axis, (key, _) in zip(axes[:, column], CURVES):
                if key in checks[0]:  # runs of an older sso.py did not log every key
                    axis.plot(iters, [c[key] for c in checks], marker="o", label=label(row), color=color)
            low = [c["heldout_low"] for c in checks]
            high = [c["heldout_high"] for c in checks]
            axes[0, column].fill_between(iters, low, high, alpha=0.12, color=color)
        axes[0, column].set_title(title, fontsize=10)
        axes[0, column].axhline(0, color="gray", lw=0.8)
        for axis, (_, ylabel) in zip(axes[:, column], CURVES):
            axis.set(xlabel="iteration (0: the initial policy π_0)", ylabel=ylabel, xticks=[0, 1, 2, 3])
        if axes[-1, column].lines:  # a panel with no run filed yet stays empty
            axes[-1, column].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # the legends below the axes included
    plt.close(fig)


def report(rows: list[dict], pages: list[Path], contrasts: Path, figures: Path, extra=()) -> None:
    tables = {name: table(runs_of(rows, settings, PAGE_SEEDS.get(name), extra)) for name, settings in PAGE.items()}
    known = [setting_flags([*flags, *extra]) for flags in SETTINGS.values()]
    tables["variants"] = table([row for row in rows if run_flags(row, seed=False) not in known])
    v2_rows = runs_of(rows, [name for name, flags in SETTINGS.items() if flags[:1] == [V2]], extra=extra)
    tables["v2-quality"] = quality_table(v2_rows)
    tables["route"] = table(filings(rows, ["steer", "default"], 0))  # LoRA merged each iteration, then stacked
    figure_3 = ["v2-steer-pbaa", "v2-steer", "v2-steer-pos", "v2-steer-neg", "v2-steer-formula3", "v2-pbaa", "v2"]
    figure_3 += ["v2-written"]
    for page in pages:
        write_page(page, tables | contrast_tables(contrasts))
    for name, panels in FIGURES.items():
        plot(rows, figures / name, panels, extra)
    plot_quality(runs_of(rows, figure_3, extra=extra), figures / "v2_quality.png")  # the defaults' variants
    print(f"wrote the tables of {', '.join(map(str, pages))} and the figures in {figures}")


def load(path: Path = RESULTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["default"], choices=list(SETTINGS), help="settings to run")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--root", default="runs/sweep", help="one run folder per setting and seed")
    parser.add_argument("--results", default=str(RESULTS), help="the file each finished run appends its line to")
    parser.add_argument("--rerun", action="store_true", help="run a command filed already (a newer sso.py)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the page's tables and figures")
    pages = [str(HERE.parent / "README.md"), str(HERE / "README.md")]
    parser.add_argument("--pages", nargs="*", default=pages, help="the pages whose tables --report-only writes")
    parser.add_argument("--figures", default=str(HERE), help="the folder --report-only draws the figures in")
    cli, extra = parser.parse_known_args(argv)  # anything else goes to every run, e.g. --model
    results = Path(cli.results)
    for name in [] if cli.report_only else cli.only:
        for seed in cli.seeds:
            flags = [*SETTINGS[name], *extra, "--seed", str(seed)]
            if not cli.rerun and any(run_flags(row) == setting_flags(flags) for row in load(results)):
                continue  # filed already
            out = Path(cli.root) / f"{name}_s{seed}"
            shutil.rmtree(out, ignore_errors=True)  # a run stopped midway starts again: its time is measured whole
            print(f"##### {out.name}: {' '.join(flags)}", flush=True)
            bench = [sys.executable, str(HERE.parent / "benchmarks" / "bench_sso.py"), "--default-run"]
            bench += ["--keep", str(out), "--results", str(results), "--setting", name]
            if flags[:1] == [V2]:
                bench, flags = [*bench, "--generator"], flags[1:]
            subprocess.run([*bench, *flags], check=True)
    if cli.report_only:
        pages = [Path(page) for page in cli.pages]
        report(load(results), pages, HERE / "contrast.jsonl", Path(cli.figures), extra)


if __name__ == "__main__":
    main()
