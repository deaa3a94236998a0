"""Where a run's held-out margin comes from: each held-out prompt's Δ against π_0, grouped by how π_0's y+ and y- end.

    python experiments/margin_parts.py runs/sso              # after the run's last iteration
    python experiments/margin_parts.py runs/sso --iter 1

A response either ended (its end-of-turn token was sampled, and is scored) or was cut at --max-new-tokens (no
end-of-turn token). The held-out margin is the mean of Δ = [log π(y+|x) − log π(y-|x)] − [the same under π_0], in
mean token log-probs, over the held-out prompts. Where one of y+, y- ended and the other was cut, Δ moves with the
probability of ending an answer, and a short response's mean is dominated by its few tokens; where both were cut, Δ
compares the wording alone. The table gives each group's count, mean Δ, share of Δ > 0 and part of the margin (its
Δ summed over the group, divided by the number of all held-out prompts): the parts add up to the margin the run
logged for that iteration.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline import finished_run  # noqa: E402

import sso  # noqa: E402


def margin_parts(run: Path, iteration: int | None = None) -> list[dict]:
    """Per group of (y+ ended?, y- ended?): its prompts, mean Δ, share of Δ > 0 and part of the margin; then all.
    After `iteration`, by default the run's last."""
    args, held = finished_run(str(run))
    policy, tokenizer = sso.load_model(str(run / f"iter_{iteration or args.iters}"), args)
    with torch.no_grad():
        logps = sso.pair_logps(policy, held["triples"], tokenizer.pad_token_id, {"base": sso.PAIRS["base"]})
    delta = sso.margin_against_initial(logps, held)  # (N,) Δ against π_0
    eot = sso.stop_token_ids(policy, tokenizer)[0]
    ended = []  # (y+, y-) of each held-out prompt: "ended" or "cut"
    for t in held["triples"]:
        ended.append(tuple("ended" if t.ids[side][-1] == eot else "cut" for side in ("chosen", "rejected")))
    rows = []
    for group in sorted(set(ended)) + [("all", "all")]:
        mask = torch.tensor([group in (kinds, ("all", "all")) for kinds in ended])
        part = delta[mask]
        row = {"y+": group[0], "y-": group[1], "prompts": int(mask.sum()), "mean": part.mean().item()}
        rows.append(row | {"positive": (part > 0).float().mean().item(), "part": part.sum().item() / len(delta)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished sso.py run folder (--output-dir)")
    parser.add_argument("--iter", type=int, default=None, help="the iteration to look at (default: the last)")
    cli = parser.parse_args(argv)
    try:
        rows = margin_parts(Path(cli.run), cli.iter)
    except sso.SSOError as err:
        sys.exit(f"error: {err}")
    print("| y+ | y- | prompts | mean Δ | share Δ > 0 | part of the margin |\n|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["y+"], row["y-"], row["prompts"], f"{row['mean']:+.4f}", f"{row['positive']:.2f}"]
        print("| " + " | ".join(map(str, cells)) + f" | {row['part']:+.4f} |")


if __name__ == "__main__":
    main()
