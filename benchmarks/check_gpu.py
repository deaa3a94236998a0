"""Checks the GPU route of sso.py, sso_generator.py and the experiments scripts, one line per check, then a verdict.

    python benchmarks/check_gpu.py          # one CUDA GPU: checks on a tiny random Llama, then one 8B-shaped iteration
    python benchmarks/check_gpu.py --cpu    # the same checks on the CPU in bf16, tiny shapes for the 8B (the tests)

Each check runs the code a user runs, in this process, on a tiny random Llama (Llama-3.1-8B's vocabulary, small
layers) saved to a temporary folder, on the device:
- sso.py's CLI with --device auto --dtype auto (--cpu: cpu, bfloat16), two iterations of LoRA with batches of two:
  the resolved device and dtype in config.json; the held-out margin of iteration 0 (π_0 against itself) is 0; at
  step 1 of each iteration every pair's margin is 0 (the reference and the training pass score the same batches);
  each merged policy computes, in fp32, what the adapted policy did; the saved weights are fp32; --resume redoes a
  removed iteration 2 with the same triples and held-out margin;
- full fine-tuning (--lora-rank 0) for one iteration: every linear weight moved (fp32 master weights);
- sso_generator.py end to end (the generator, then the policy, then the held-out check);
- experiments/margin_parts.py on the run folder (its config says the device), contrast.py --device, and
  offline.py / reward_model.py where TRL is installed;
- then one iteration of the Llama-3.1-8B-shaped model with the held-out check (benchmarks/bench_gpu_8b.py): seconds
  per phase and peak GPU memory.
On a lent machine: pip install datasets first (its wheel carried in), as sso.py reads prompts with it.
"""

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from bench_gpu_8b import LLAMA31_8B, TINY, build, iteration_with_check  # noqa: E402

import sso  # noqa: E402
import sso_generator  # noqa: E402

SMALL_RUN = ["--prompts-per-iter", "3", "--eval-prompts", "4", "--max-new-tokens", "8", "--lr", "1e-3"]
RESULTS = []  # (passed, name, detail)


def check(name: str, passed: bool, detail: str = "") -> None:
    RESULTS.append((passed, name, detail))
    print(f"{'PASS' if passed else 'FAIL'} | {name} | {detail}", flush=True)


def fp32_logits(model, input_ids):
    copied = copy.deepcopy(model).float()
    copied.compute_dtype = torch.float32
    with torch.no_grad():
        return copied(input_ids=input_ids).logits.cpu()


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lora_cli_run(model: str, run: Path, precision: list[str], device: str) -> None:
    """sso.py's CLI, two LoRA iterations in bf16; the merge is watched from inside."""
    probe = torch.tensor([[128000, 5, 17, 300, 4000]], device=device)  # any ids: the function, not a text
    merges, real_train_model, real_train_epoch = [], sso.train_model, sso.train_epoch

    def train_epoch(model, *rest):  # the adapted policy, before its merge
        out = real_train_epoch(model, *rest)
        merges.append({"adapted": fp32_logits(model, probe)})
        return out

    def train_model(model, *rest, **kwargs):
        initial = fp32_logits(model, probe)
        model, means = real_train_model(model, *rest, **kwargs)
        merges[-1] |= {"initial": initial, "returned": fp32_logits(model, probe)}
        return model, means

    sso.train_epoch, sso.train_model = train_epoch, train_model
    try:
        sso.main(
            ["--model", model, "--iters", "2", "--batch-size", "2", *SMALL_RUN, *precision, "--output-dir", str(run)]
        )
    finally:
        sso.train_epoch, sso.train_model = real_train_epoch, real_train_model
    config = json.loads((run / "config.json").read_text())
    want = ("cuda", "bfloat16") if device == "cuda" else ("cpu", "bfloat16")
    check(
        "config.json keeps the resolved device and dtype",
        (config["device"], config["dtype"]) == want,
        f"{config['device']}, {config['dtype']}",
    )
    logged = records(run)
    first = next(r for r in logged if r["type"] == "held_out" and r["iter"] == 0)
    check("held-out margin of π_0 against itself is 0", first["heldout_margin"] == 0, f"{first['heldout_margin']}")
    steps = [r for r in logged if r["type"] == "step" and r["step"] == 1]
    margins = [r[f"margin_{pair}"] for r in steps for pair in sso.PAIRS]
    check("every pair's margin is 0 at step 1", len(steps) == 2 and margins == [0.0] * 6, f"{margins}")
    off = [((m["returned"] - m["adapted"]).norm() / (m["adapted"] - m["initial"]).norm()).item() for m in merges]
    detail = "off by " + ", ".join(f"{100 * x:.2f}%" for x in off) + " of the trained change (fp32 logits)"
    check("each merged policy computes what the adapted one did", len(off) == 2 and max(off) < 1e-2, detail)
    dtypes = {str(t.dtype) for t in load_file(str(run / "iter_2" / "model.safetensors")).values()}
    check("saved weights are fp32 (what training learned)", dtypes == {"torch.float32"}, ", ".join(sorted(dtypes)))


def resume_check(run: Path) -> None:
    before = json.loads((run / "iter_2" / "metrics.json").read_text())
    triples = (run / "iter_2" / "triples.jsonl").read_text()
    shutil.rmtree(run / "iter_2")
    sso.main(["--output-dir", str(run), "--resume"])
    after = json.loads((run / "iter_2" / "metrics.json").read_text())
    same = (run / "iter_2" / "triples.jsonl").read_text() == triples
    gap = abs(after["heldout_margin"] - before["heldout_margin"])
    check(
        "--resume redoes iteration 2 alike", same and gap < 1e-3, f"same triples: {same}, margins differ by {gap:.1e}"
    )


def full_fine_tuning(model: str, run: Path, precision: list[str]) -> None:
    sso.main(
        [
            "--model",
            model,
            "--iters",
            "1",
            "--lora-rank",
            "0",
            "--lr",
            "5e-5",
            *SMALL_RUN,
            *precision,
            "--output-dir",
            str(run),
        ]
    )
    start, end = load_file(str(Path(model) / "model.safetensors")), load_file(str(run / "iter_1" / "model.safetensors"))
    linear = [name for name in start if name.endswith("proj.weight")]
    moved = sum((start[n] != end[n]).sum().item() for n in linear) / sum(start[n].numel() for n in linear)
    check("full fine-tuning moves every linear weight", moved > 0.99, f"{100 * moved:.1f}% moved")


def generator_run(model: str, run: Path, precision: list[str]) -> None:
    sso_generator.main(
        [
            "--model",
            model,
            "--generator-prompts",
            "3",
            "--policy-prompts",
            "4",
            "--eval-prompts",
            "4",
            "--max-new-tokens",
            "8",
            *precision,
            "--output-dir",
            str(run),
        ]
    )
    logged = records(run)
    finished = (run / "generator").is_dir() and (run / "policy").is_dir()
    last = [r for r in logged if r["type"] == "held_out"][-1]
    check("sso_generator.py: generator, policy, held-out check", finished and last["iter"] == 2, f"{last}"[:120])


def experiments(model: str, run: Path, device: str) -> None:
    import contrast
    import margin_parts

    rows = margin_parts.margin_parts(run)
    logged = next(r for r in records(run) if r["type"] == "held_out" and r["iter"] == 2)
    gap = abs(rows[-1]["mean"] - logged["heldout_margin"])
    check("experiments/margin_parts.py on the run's device", gap < 1e-3, f"margin {rows[-1]['mean']:+.4f}")
    principles = str(ROOT / "data" / "smollm2_principles.json")  # one feature: one contrast
    found = contrast.main(
        [
            "--model",
            model,
            "--principles",
            principles,
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "8",
            "--device",
            device,
        ]
    )
    check("experiments/contrast.py --device " + device, found is None, "ran")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("SKIP | experiments/offline.py, reward_model.py | trl is not installed")
        return
    import offline
    import reward_model

    for script in (offline, reward_model):
        script.main([str(run)])
        check(f"experiments/{script.__name__}.py on the run's device", True, "ran")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the checks on the CPU in bf16, a tiny model for the 8B")
    cli = parser.parse_args()
    device = "cpu" if cli.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; --cpu runs the checks on the CPU")
    precision = ["--device", "cpu", "--dtype", "bfloat16"] if cli.cpu else ["--device", "auto", "--dtype", "auto"]
    folder = Path(tempfile.mkdtemp(prefix="sso-check-"))
    model, tokenizer = build(TINY, torch.device(device), torch.float32)
    model.save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    started = time.time()
    for name, step in (
        ("sso.py, LoRA", lambda: lora_cli_run(str(folder / "tiny"), folder / "lora", precision, device)),
        ("sso.py --resume", lambda: resume_check(folder / "lora")),
        ("sso.py, full fine-tuning", lambda: full_fine_tuning(str(folder / "tiny"), folder / "full", precision)),
        ("sso_generator.py", lambda: generator_run(str(folder / "tiny"), folder / "v2", precision)),
        ("experiments/", lambda: experiments(str(folder / "tiny"), folder / "lora", device)),
    ):
        try:
            step()
        except BaseException as err:  # a crash is a failed check (SystemExit from a CLI included), not the end
            traceback.print_exc()
            check(name, False, f"raised {err!r:.200}")
    print(f"tiny-model checks: {time.time() - started:.0f} s")
    shapes = TINY if cli.cpu else LLAMA31_8B
    flags = ["--prompts-per-iter", "2", "--eval-prompts", "2", "--max-new-tokens", "8"] if cli.cpu else []
    result = iteration_with_check(shapes, torch.device(device), torch.bfloat16, flags)
    print("8B-shaped iteration" if not cli.cpu else "tiny-shaped iteration (--cpu)", end=" | ")
    print(" | ".join(f"{phase} {seconds:.1f} s" for phase, seconds in result["seconds"].items()), end=" | ")
    print(f"peak GPU memory {result['peak_gib']:.1f} GiB")
    failed = [name for passed, name, _ in RESULTS if not passed]
    print(f"verdict: {'FAIL' if failed else 'PASS'} ({len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed)")
    shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
