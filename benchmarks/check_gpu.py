"""Checks the GPU route of sso.py, sso_generator.py and the experiments scripts, one line per check, then a verdict.

    python benchmarks/check_gpu.py          # one CUDA GPU: checks on a tiny random Llama, then the 8B-shaped iteration
    python benchmarks/check_gpu.py --cpu    # the same checks on the CPU in bf16, tiny shapes for the 8B (the tests)

Each check runs the code a user runs, in this process, on a tiny random Llama (Llama-3.1-8B's vocabulary, small
layers) saved to a temporary folder, on the device, in the precision the run computes in (bf16 where the GPU has it,
fp32 where it only emulates it; --cpu: bf16). Nothing is upcast before it is compared.
- sso.py's CLI with --device auto --dtype auto, two LoRA iterations with batches of two: the resolved device and dtype
  in config.json; the held-out margin of iteration 0 (π_0 against itself) is 0; at step 1 of each iteration every
  pair's margin is 0 (the reference and the training pass score the same batches; a GPU's kernels may leave 1e-3);
  each iteration returns exactly the function its training optimized (stacked adapters, no merge); the iteration
  folders hold fp32 adapters alone, and rebuild that function exactly; --merge writes an fp32 model that computes,
  in fp32, what the stacked adapters do; --resume redoes a removed iteration 2 with the same triples and margin;
- full fine-tuning (--lora-rank 0, fp32 weights) at its learning rate 5e-5: every linear weight moved;
- sso_generator.py end to end (the generator, then the policy, then the held-out check);
- experiments/margin_parts.py on the run folder (its config says the device), contrast.py --device, and
  offline.py / reward_model.py where TRL is installed;
- then one iteration of a Llama-3.1-8B-shaped model at 64 prompts x 512 new tokens with the held-out check
  (benchmarks/bench_gpu_8b.py): seconds per phase and peak memory, allocated and reserved, beside the prediction
  of `bench_gpu_8b.py --predict`; a crash there is a failed check, and the verdict line still comes.
On a lent machine: pip install datasets first (its wheel carried in), as sso.py reads prompts with it.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built or saved in this process

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from bench_gpu_8b import SHAPES, TINY, WORKLOADS, build, iteration_with_check, predicted  # noqa: E402

import sso  # noqa: E402
import sso_generator  # noqa: E402

SMALL_RUN = ["--prompts-per-iter", "3", "--eval-prompts", "4", "--max-new-tokens", "8"]
RESULTS = []  # (passed, name, detail)
PROBE = [[128000, 5, 17, 300, 4000, 9, 77]]  # any ids: the function, not a text


def check(name: str, passed: bool, detail: str = "") -> None:
    RESULTS.append((passed, name, detail))
    print(f"{'PASS' if passed else 'FAIL'} | {name} | {detail}", flush=True)


def logits(model) -> torch.Tensor:
    """What the model computes, as the run computes it: in its own precision."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(PROBE, device=model.device)).logits.float().cpu()


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lora_cli_run(model: str, run: Path, precision: list[str], want: tuple[str, str]) -> None:
    """sso.py's CLI, two LoRA iterations; what training optimized and what each iteration returns, watched inside."""
    trained, returned = [], {}
    real_train_epoch, real_save = sso.train_epoch, sso.save_iteration

    def train_epoch(model, *rest):
        out = real_train_epoch(model, *rest)
        trained.append(logits(model))
        return out

    def save_iteration(folder, policy, *rest):
        returned[folder.name] = logits(policy)
        return real_save(folder, policy, *rest)

    sso.train_epoch, sso.save_iteration = train_epoch, save_iteration
    try:
        argv = ["--model", model, "--iters", "2", "--batch-size", "2", *SMALL_RUN, "--lr", "1e-3", *precision]
        sso.main([*argv, "--output-dir", str(run)])
    finally:
        sso.train_epoch, sso.save_iteration = real_train_epoch, real_save
    config = json.loads((run / "config.json").read_text())
    got = (config["device"], config["dtype"])
    check("config.json keeps the resolved device and dtype", got == want, f"{got}, expected {want}")
    logged = records(run)
    first = next(r for r in logged if r["type"] == "held_out" and r["iter"] == 0)
    check("held-out margin of π_0 against itself is 0", first["heldout_margin"] == 0, f"{first['heldout_margin']}")
    steps = [r for r in logged if r["type"] == "step" and r["step"] == 1]
    margins = [r[f"margin_{pair}"] for r in steps for pair in sso.PAIRS]
    tolerance = 0 if want[0] == "cpu" else 1e-3
    check("every pair's margin is 0 at step 1", len(steps) == 2 and max(map(abs, margins)) <= tolerance, f"{margins}")
    gaps = [(returned[f"iter_{t}"] - trained[t - 1]).abs().max().item() for t in (1, 2)]
    detail = f"largest logit difference {max(gaps)} in {config['dtype']}"
    check("each iteration returns exactly the function it trained", len(trained) == 2 and max(gaps) == 0, detail)
    sizes, dtypes, files = [], set(), []
    for t in (1, 2):
        folder = run / f"iter_{t}"
        files += [p.relative_to(run).as_posix() for p in folder.rglob("*.safetensors")]
        for path in folder.rglob("adapter_model.safetensors"):
            sizes.append(path.stat().st_size / 2**20)
            dtypes |= {str(tensor.dtype) for tensor in load_file(str(path)).values()}
    only_adapters = all(name.endswith("adapter_model.safetensors") for name in files) and len(files) == 3
    detail = f"{len(files)} adapter files, {sum(sizes):.1f} MiB in all, {', '.join(sorted(dtypes))}"
    check("iteration folders hold fp32 adapters alone", only_adapters and dtypes == {"torch.float32"}, detail)
    args = sso.parse_args(precision)
    rebuilt, _ = sso.load_model(str(run / "iter_2"), args)
    gap = (logits(rebuilt) - returned["iter_2"]).abs().max().item()
    check("a saved iteration rebuilds the same function", gap == 0, f"largest logit difference {gap}")
    sso.main(["--merge", str(run / "iter_2"), *precision])
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run / "iter_2" / "merged").to(args.device)
    stacked, _ = sso.load_model(str(run / "iter_2"), sso.argparse.Namespace(**vars(args) | {"dtype": "float32"}))
    off = ((logits(merged) - logits(stacked)).norm() / logits(stacked).norm()).item()
    detail = f"{merged.dtype}, relative difference {off:.1e} (both fp32)"
    check(
        "--merge writes an fp32 model computing what the adapters do",
        merged.dtype == torch.float32 and off < 1e-5,
        detail,
    )


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


def full_fine_tuning(model: str, run: Path, device: str) -> None:
    """Every weight trains, in fp32 (sso.py refuses bf16 weights here), at the learning rate full fine-tuning uses."""
    argv = ["--model", model, "--iters", "1", "--lora-rank", "0", "--lr", "5e-5", *SMALL_RUN, "--device", device]
    sso.main([*argv, "--output-dir", str(run)])
    config = json.loads((run / "config.json").read_text())
    start, end = load_file(str(Path(model) / "model.safetensors")), load_file(str(run / "iter_1" / "model.safetensors"))
    linear = [name for name in start if name.endswith("proj.weight")]
    assert {start[n].dtype for n in linear} == {end[n].dtype for n in linear} == {torch.float32}  # same precision
    moved = sum((start[n] != end[n]).sum().item() for n in linear) / sum(start[n].numel() for n in linear)
    detail = f"{100 * moved:.1f}% moved at lr {config['lr']}, {config['dtype']} weights"
    check("full fine-tuning moves every linear weight", moved > 0.99 and config["lr"] == 5e-5, detail)


def generator_run(model: str, run: Path, precision: list[str]) -> None:
    argv = ["--model", model, "--generator-prompts", "3", "--policy-prompts", "4", "--eval-prompts", "4"]
    sso_generator.main([*argv, "--max-new-tokens", "8", *precision, "--output-dir", str(run)])
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
    argv = ["--model", model, "--principles", principles, "--num-prompts", "2", "--max-new-tokens", "8"]
    found = contrast.main([*argv, "--device", device])
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


def eight_b_iteration(cpu: bool, dtype: torch.dtype) -> None:
    """One iteration of the 8B-shaped model at 64 x 512 (--cpu: tiny shapes and budgets), beside the prediction."""
    shapes, workload = ("tiny", "tiny") if cpu else ("Llama-3.1-8B", "64 x 512")  # bench_gpu_8b's SHAPES, WORKLOADS
    prediction = predicted(shapes, workload, "sso.py", str(dtype).removeprefix("torch."))
    predicted_phases = prediction["phases"]
    result = iteration_with_check(SHAPES[shapes], torch.device("cpu" if cpu else "cuda"), dtype, WORKLOADS[workload])
    print(f"{'tiny' if cpu else '8B'}-shaped iteration: measured (predicted); memory on a GPU only")
    for label, seconds in result["seconds"].items():
        guess = predicted_phases.get(label, {"seconds": float("nan"), "peak_gib": float("nan")})
        line = f"  {label}: {seconds:.1f} s ({guess['seconds']:.1f} s) | peak allocated "
        memory = f"{result['peak_gib'][label]:.1f} GiB" if not cpu else "-"
        print(line + f"{memory} ({guess['peak_gib']:.1f} GiB) | reserved {result['reserved_gib'][label]:.1f} GiB")
    peak, reserved = max(result["peak_gib"].values()), max(result["reserved_gib"].values())
    guess = prediction["peak_gib"]
    detail = f"{result['record']['kept']} triples kept; predicted peak {guess:.1f} GiB"
    detail += "" if cpu else f", measured: allocated {peak:.1f} GiB, reserved {reserved:.1f} GiB"
    check("8B-shaped iteration with the held-out check", "loss" in result["record"], detail)
    if not cpu:
        off = abs(peak - guess) / peak
        check("the predicted peak is within 15% of the measured one", off < 0.15, f"off by {100 * off:.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the checks on the CPU in bf16, a tiny model for the 8B")
    cli = parser.parse_args()
    device = "cpu" if cli.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; --cpu runs the checks on the CPU")
    bf16 = cli.cpu or torch.cuda.is_bf16_supported(including_emulation=False)  # a T4 only emulates it: fp32
    dtype = "bfloat16" if bf16 else "float32"
    precision = ["--device", "cpu", "--dtype", "bfloat16"] if cli.cpu else ["--device", "auto", "--dtype", "auto"]
    folder = Path(tempfile.mkdtemp(prefix="sso-check-"))
    model, tokenizer = build(TINY, torch.device(device), torch.float32)
    model.save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    tiny = str(folder / "tiny")
    started = time.time()
    for name, step in (
        ("sso.py, LoRA", lambda: lora_cli_run(tiny, folder / "lora", precision, (device, dtype))),
        ("sso.py --resume", lambda: resume_check(folder / "lora")),
        ("sso.py, full fine-tuning", lambda: full_fine_tuning(tiny, folder / "full", device)),
        ("sso_generator.py", lambda: generator_run(tiny, folder / "v2", precision)),
        ("experiments/", lambda: experiments(tiny, folder / "lora", device)),
        ("8B-shaped iteration", lambda: eight_b_iteration(cli.cpu, getattr(torch, dtype))),
    ):
        try:
            step()
        except BaseException as err:  # a crash is a failed check (SystemExit from a CLI included), not the end
            traceback.print_exc()
            check(name, False, f"raised {err!r:.200}")
    print(f"checks: {time.time() - started:.0f} s")
    failed = [name for passed, name, _ in RESULTS if not passed]
    print(f"verdict: {'FAIL' if failed else 'PASS'} ({len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed)")
    shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
