"""sso.py and sso_generator.py at Llama-3.1-8B's shapes: memory and time predicted on any CPU, measured on one GPU.

    python benchmarks/bench_gpu_8b.py --predict          # both scripts, the README's 8B command and 64 x 512 tokens
    python benchmarks/bench_gpu_8b.py --predict --tiny   # the same on small shapes, in seconds (a smoke test)
    python benchmarks/bench_gpu_8b.py --check-on-cpu     # the trace beside a real run of SmolLM2-135M's shapes

The model is a random Llama of exactly Llama-3.1-8B's shapes (4096 hidden, 32 layers, 32/8 heads, 14336 MLP, 128,256
vocabulary), built as sso.load_model leaves a model: bf16 weights, dropout off, gradient checkpointing on. The
tokenizer is a word-level stand-in with all 128,256 ids and a Llama-3-style chat template. The code that runs is the
route's own: sso.held_out_data (π_0's features, y+ y- y0 and log-ratios), sso.run_iteration (features, sampling, the
reference pass, one epoch of a new LoRA adapter) and sso.held_out_check; for sso_generator.py its train_generator,
the generator's sampling for the policy's queries, and train_policy.

--predict runs that code on fake tensors (torch's FakeTensorMode: shapes and dtypes, no memory) on the CPU device,
where the attention kernel, like a GPU's, keeps no T x T matrix. A dispatch mode counts the bytes of every live
storage (weights, adapters, gradients, AdamW states, KV cache, activations; the peak of each phase), the FLOPs
(torch.utils.flop_counter's formulas; the CPU attention kernel has none, a few % at these lengths) and the kernels
launched, and decides what fake tensors cannot: every response runs to --max-new-tokens without an end-of-turn token
(random weights rarely emit it: the worst case for memory), with distinct token ids (so no triple is dropped), and
every finite-loss check passes. reference_logps and train_epoch trace one batch, the longest (the others are alike),
and count the FLOPs and kernels of all. Seconds are predicted at stated
H100 SXM figures (H100 below): FLOPs at 40% of bf16's dense peak, plus the bytes each decoding step reads (weights
and KV cache) at 60% of the memory bandwidth, plus 10 µs per kernel launched (eager PyTorch, as generate runs).
Not modelled: the CUDA context and cuBLAS workspaces (about 1 GiB), the caching allocator's fragmentation (what
reserved adds to allocated; hence the 70 GiB target under 80 GB), and the host memory of loading.

On a GPU, benchmarks/check_gpu.py runs sso.py's iteration for real (iteration_with_check): seconds, peak allocated
and reserved memory of each phase (torch.cuda.max_memory_allocated / max_memory_reserved), beside the prediction.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sso  # noqa: E402
import sso_generator  # noqa: E402

LLAMA31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    tie_word_embeddings=False,
)
TINY = dict(
    LLAMA31_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
README_8B = {"prompts": 12, "eval_prompts": 32, "new_tokens": 96, "generator_prompts": 24, "policy_prompts": 48}
SMOLLM2_135M = dict(  # the CPU check of the prediction: a real run of this shape measured beside its trace
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
CPU_CHECK = {"prompts": 6, "eval_prompts": 8, "new_tokens": 64, "generator_prompts": 4, "policy_prompts": 6}
TINY_WORKLOAD = {"prompts": 2, "eval_prompts": 2, "new_tokens": 8, "generator_prompts": 2, "policy_prompts": 2}
WORKLOAD_64x512 = {"prompts": 64, "eval_prompts": 64, "new_tokens": 512, "generator_prompts": 64, "policy_prompts": 64}
H100 = {"bf16 FLOP/s": 989e12, "bytes/s": 3.35e12, "FLOP share": 0.4, "bandwidth share": 0.6, "s per kernel": 10e-6}
PHASES = ("select_features", "sample_responses", "reference_logps", "train_epoch", "held_out_check", "generate_batched")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def stand_in_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over all of the vocabulary's ids; Llama 3's special tokens at Llama 3's ids (the last
    ids of a smaller vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]
    ids = [128000, 128001, 128006, 128007, 128008, 128009] if vocab_size > 128009 else range(vocab_size - 6, vocab_size)
    specials = dict(zip(ids, [*names, "<|eot_id|>"]))
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials.values())})
    return tokenizer


def build(shapes: dict, device: torch.device, dtype: torch.dtype, fake: bool = False):
    """A random Llama of these shapes as sso.load_model leaves one (weights in `dtype`, dropout off, gradient
    checkpointing on), and the stand-in tokenizer. fake: built on the meta device, then given fake tensors."""
    config = LlamaConfig(**shapes)
    with torch.device("meta" if fake else device):
        policy = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    if fake:  # inside FakeTensorMode: empty tensors of the same shapes, no memory and no initialisation
        for module in policy.modules():
            for name, param in module.named_parameters(recurse=False):
                module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype))
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    if config.tie_word_embeddings:  # the LM head is the embedding matrix, as in the checkpoint
        policy.tie_weights()
    tokenizer = stand_in_tokenizer(config.vocab_size)
    ends = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    policy.generation_config.eos_token_id, policy.generation_config.pad_token_id = ends, tokenizer.pad_token_id
    for module in policy.modules():  # dropout off, as sso.load_model does
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    enable = getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)  # as sso.py
    enable({"use_reentrant": False})
    return policy, tokenizer


class LiveBytes(TorchDispatchMode):
    """Op by op: the bytes of live tensor storages (now and peak), the kernels launched and their FLOPs (the formulas
    of torch.utils.flop_counter; FlopCounterMode itself would hold every checkpointed activation through its hooks)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.kernels, self.flops = {}, 0, 0, 0, 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if id(storage) not in self.live:
            self.live[id(storage)] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self.free, id(storage)).atexit = False  # not at exit: fake storages are gone

    def free(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def counted(self, func, args, kwargs):
        out = func(*args, **kwargs)
        self.kernels += 1
        if func.overloadpacket in flop_registry:
            self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.counted(func, args, kwargs or {})


class FakeRun(LiveBytes):
    """Over FakeTensorMode, LiveBytes, and the values fake tensors lack."""

    def __init__(self, new_tokens: int, vocab_size: int):
        super().__init__()
        self.new_tokens, self.vocab_size, self.next_id = new_tokens, vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.uniform_.default, torch.ops.aten.normal_.default):  # LoRA's A: no values
            return args[0]
        if func is torch.ops.aten.randperm.default:  # the order of the training batches: any order, as real numbers
            with unset_fake_temporarily():
                return torch.arange(args[0])
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), .tolist(), bool()
            if args[0].dtype == torch.bool:
                return True  # torch.isfinite(loss): yes
            if args[0].dtype.is_floating_point:
                return 0.0
            self.next_id = (self.next_id + 1) % (self.vocab_size - 200)  # a token id: distinct, never a special one
            return 100 + self.next_id
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            # sequence_logps picks the scored positions with a mask: every response has new_tokens of them
            index = [torch.zeros(self.new_tokens, dtype=torch.long) if i is not None else i for i in args[1]]
            args = (args[0], index)
        return self.counted(func, args, kwargs or {})


def watch_phases(counters, reset, fake: bool) -> dict:
    """Wrap the route's phase functions so that each call adds its seconds, FLOPs, kernels, decoding reads and peak
    memory to the record of its label (prefixed by the stage it runs in: π_0's held-out data, the generator, the
    policy). A phase's figures cover the phases it calls. counters(): FLOPs, kernels, peak and reserved bytes so far;
    reset(): a new peak. fake: generate runs to the token limit (fake values cannot say when it would stop)."""
    stats, stack, stage = {}, [], []
    steps = {"left": 0}

    def unfinished(*_, **__) -> bool:
        steps["left"] -= 1
        return steps["left"] >= 0

    if fake:
        LlamaForCausalLM._has_unfinished_sequences = unfinished

    def generate_batched(model, tokenizer, prompts, stop_ids, max_new_tokens, *args, **kwargs):
        steps["left"] = max_new_tokens
        for entry in stack:  # every enclosing phase reads what decoding reads
            entry["bytes"] += decode_bytes(model, prompts, max_new_tokens)
        return real_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, *args, **kwargs)

    def wrap(module, name: str, prefix: str | None = None):
        function = getattr(module, name)

        def timed(*args, **kwargs):
            label, scale = "".join(stage) + name, 1
            if fake and name in ("reference_logps", "train_epoch"):  # one batch traced, the longest: the rest alike
                size = args[3] if name == "reference_logps" else args[4].batch_size
                batch = sorted(args[1], key=lambda t: sum(map(len, t.contexts.values())), reverse=True)[:size]
                scale, args = len(args[1]) / len(batch), (args[0], batch, *args[2:])
            if stack:  # the enclosing phase's peak so far
                stack[-1]["inner"] = max(stack[-1]["inner"], counters()["peak"])
                stack[-1]["inner_reserved"] = max(stack[-1]["inner_reserved"], counters()["reserved"])
            reset()
            stack.append(
                counters()
                | {"inner": 0, "inner_reserved": 0, "bytes": 0, "extra": 0, "extra_kernels": 0, "time": time.time()}
            )
            stage.extend([prefix] if prefix else [])
            try:
                return function(*args, **kwargs)
            finally:
                del stage[len(stage) - bool(prefix) :]
                begin, end = stack.pop(), counters()
                record = stats.setdefault(label, dict.fromkeys(("seconds", "flops", "kernels", "bytes", "calls"), 0))
                record["seconds"] += time.time() - begin["time"]
                flops, kernels = end["flops"] - begin["flops"], end["kernels"] - begin["kernels"]
                record["flops"] += scale * flops + begin["extra"]
                record["kernels"] += scale * kernels + begin["extra_kernels"]
                for entry in stack:  # the batches not traced count in every enclosing phase too
                    entry["extra"] += (scale - 1) * flops
                    entry["extra_kernels"] += (scale - 1) * kernels
                record["bytes"] += begin["bytes"]
                record["calls"] += 1
                record["peak"] = max(record.get("peak", 0), end["peak"], begin["inner"])
                record["reserved"] = max(record.get("reserved", 0), end["reserved"], begin["inner_reserved"])
                if stack:
                    stack[-1]["inner"] = max(stack[-1]["inner"], record["peak"])
                    stack[-1]["inner_reserved"] = max(stack[-1]["inner_reserved"], record["reserved"])

        setattr(module, name, timed)

    real_generate, sso.generate_batched = sso.generate_batched, generate_batched
    for name in ("select_features", "sample_responses", "reference_logps", "train_epoch", "held_out_check"):
        wrap(sso, name)
    wrap(sso, "held_out_data", prefix="π_0: ")
    wrap(sso_generator, "train_generator", prefix="generator: ")
    wrap(sso_generator, "train_policy", prefix="policy: ")
    return stats


def decode_bytes(model, prompts: list, max_new_tokens: int) -> int:
    """What the decoding steps of one generate call read: every weight, then each row's KV cache, once a step."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize  # K and V
    context = max(map(len, prompts)) + max_new_tokens / 2  # the KV cache's mean length over the steps (left-padded)
    return int(max_new_tokens * (weights + len(prompts) * context * per_token))


def flags_for(workload: dict, script: str) -> list[str]:
    flags = ["--eval-prompts", str(workload["eval_prompts"]), "--max-new-tokens", str(workload["new_tokens"])]
    if script == "sso.py":
        return [*flags, "--prompts-per-iter", str(workload["prompts"]), "--iters", "1"]
    flags += ["--generator-prompts", str(workload["generator_prompts"])]
    return [*flags, "--policy-prompts", str(workload["policy_prompts"])]


def queries_for(count: int) -> list[str]:
    """The bundled prompts, repeated where a workload asks for more."""
    lines = (sso.HERE / "data" / "prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    return [prompts[i % len(prompts)] for i in range(count)]


def run_route(policy, tokenizer, workload: dict, script: str) -> dict:
    """The route's own code at this workload: held-out data from π_0, then sso.py's iteration or sso_generator.py's
    generator and policy, then the held-out check. Returns the last iteration record."""
    flags = sso.FLAGS if script == "sso.py" else sso_generator.FLAGS
    args = sso.parse_args([*flags_for(workload, script), "--device", "cpu"], flags)
    args.device, args.dtype = str(policy.device), str(policy.dtype).removeprefix("torch.")
    args.iters = 1 if script == "sso.py" else 2
    principles = sso.load_principles(args.principles)

    def log(record, line):  # sso's own progress lines
        print(f"    {line}"[:150], flush=True)

    queries = queries_for(args.eval_prompts + getattr(args, "prompts_per_iter", 0))
    held = sso.held_out_data(
        Path(tempfile.mkdtemp()), policy, tokenizer, queries[: args.eval_prompts], principles, args, log, 0
    )
    if script == "sso.py":
        policy, _, record = sso.run_iteration(policy, tokenizer, queries[args.eval_prompts :], principles, args, 1, log)
        sso.held_out_check(policy, tokenizer, held, args, 1, log)
        return record
    queries = queries_for(args.generator_prompts + args.policy_prompts)
    generator, *_ = sso_generator.train_generator(
        policy, tokenizer, queries[: args.generator_prompts], principles, args, None, log
    )
    triples = sso_generator.principled_triples(
        policy, tokenizer, queries[args.generator_prompts :], principles, args, 2, None, log
    )
    triples = sso_generator.sampled(generator, tokenizer, triples, args, ("chosen", "rejected"), "generator", 2, log)
    del generator
    policy, record = sso_generator.train_policy(policy, tokenizer, triples, args, 2, log)
    sso.held_out_check(policy, tokenizer, held, args, 2, log)
    return record


def predicted_seconds(record: dict) -> float:
    """FLOPs, decoding reads and kernel launches at the H100 figures."""
    compute = record["flops"] / (H100["bf16 FLOP/s"] * H100["FLOP share"])
    reads = record["bytes"] / (H100["bytes/s"] * H100["bandwidth share"])
    return compute + reads + record["kernels"] * H100["s per kernel"]


def keep_in_place(layer, adapter_name: str, device=None) -> None:
    """peft moves a new adapter to its base layer's device and dtype, then back to fp32 (autocast_adapter_dtype);
    fake tensors cannot be moved in a module, and are already where that ends: fp32, on the base's device."""


def swap_unless_alike(param, applied) -> None:
    """Module.to() swaps a fake parameter with its converted copy, which FakeTensorMode forbids; the adapters' moves
    to their own device and dtype change nothing, so nothing is swapped (any other move fails here)."""
    assert (param.shape, param.dtype, param.device) == (applied.shape, applied.dtype, applied.device), "a real move"


def predict(shapes: dict, workload: dict, dtype: torch.dtype = torch.bfloat16, script: str = "sso.py", report=None):
    """The route on fake tensors: each phase's peak bytes, FLOPs and predicted seconds; the run's peak (GiB).
    report: called with the result as soon as the route has run (freeing the fake tensors afterwards has crashed)."""
    real = {name: getattr(module, name) for module, name in ORIGINALS}
    hf_logging.set_verbosity_error()  # generate's checks of fake values (all True here) would warn
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_run = FakeRun(workload["new_tokens"], shapes["vocab_size"])
        policy, tokenizer = build(shapes, torch.device("cpu"), dtype, fake=True)
        for tensor in [*policy.parameters(), *policy.buffers()]:
            fake_run.track(tensor)

        def counters() -> dict:
            return {
                "flops": fake_run.flops,
                "kernels": fake_run.kernels,
                "peak": fake_run.peak,
                "reserved": fake_run.peak,
            }

        def reset() -> None:
            fake_run.peak = fake_run.now

        stats = watch_phases(counters, reset, fake=True)
        move, swap = BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.utils.swap_tensors
        BaseTunerLayer._move_adapter_to_device_of_base_layer = keep_in_place  # fake tensors cannot be swapped
        torch.utils.swap_tensors = swap_unless_alike
        try:
            with fake_run:
                run_route(policy, tokenizer, workload, script)
            result = summary(stats)
            if report:
                report(result)
        finally:
            BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.utils.swap_tensors = move, swap
            for (module, name), function in zip(ORIGINALS, real.values()):
                setattr(module, name, function)
            del LlamaForCausalLM._has_unfinished_sequences  # the class's own again
    return result


def summary(stats: dict) -> dict:
    """Each phase's peak (GiB), predicted seconds and TFLOP, and the run's peak."""
    phases = {label: {"peak_gib": r["peak"] / 2**30, "seconds": predicted_seconds(r), "tflop": r["flops"] / 1e12}
              for label, r in stats.items()}  # fmt: skip
    return {"phases": phases, "peak_gib": max(p["peak_gib"] for p in phases.values())}


ORIGINALS = [(sso, name) for name in ("select_features", "sample_responses", "reference_logps", "train_epoch")]
ORIGINALS += [(sso, "generate_batched"), (sso, "held_out_check"), (sso, "held_out_data")]
ORIGINALS += [(sso_generator, "train_generator"), (sso_generator, "train_policy")]


def iteration_with_check(shapes: dict, device: torch.device, dtype: torch.dtype, workload: dict) -> dict:
    """sso.py's held-out data from π_0, one iteration and the held-out check, run for real on the device: seconds,
    peak allocated and reserved memory of each phase (GiB; on a CPU, the peak is not measured: nan)."""
    cuda = device.type == "cuda"
    real = {name: getattr(module, name) for module, name in ORIGINALS}
    policy, tokenizer = build(shapes, device, dtype)

    def counters() -> dict:
        peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
        reserved = torch.cuda.max_memory_reserved() if cuda else float("nan")
        return {"flops": 0, "kernels": 0, "peak": peak, "reserved": reserved}

    def reset() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    stats = watch_phases(counters, reset, fake=False)
    try:
        record = run_route(policy, tokenizer, workload, "sso.py")
    finally:
        for (module, name), function in zip(ORIGINALS, real.values()):
            setattr(module, name, function)
    return {
        "seconds": {label: r["seconds"] for label, r in stats.items()},
        "peak_gib": {label: r["peak"] / 2**30 for label, r in stats.items()},
        "reserved_gib": {label: r["reserved"] / 2**30 for label, r in stats.items()},
        "record": record,
    }


def measured_on_cpu(script: str) -> None:
    """--measure (in a process of its own): a real run of the SmolLM2-135M-shaped model at CPU_CHECK in fp32; prints
    the growth of the process's peak resident memory from before the model was built (GiB)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    policy, tokenizer = build(SMOLLM2_135M, torch.device("cpu"), torch.float32)
    with LiveBytes() as live:  # the same count of live storages as the trace's, on real tensors
        for tensor in [*policy.parameters(), *policy.buffers()]:
            live.track(tensor)
        run_route(policy, tokenizer, CPU_CHECK, script)
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before
    print(json.dumps({"growth_gib": growth, "live_peak_gib": live.peak / 2**30}))


SHAPES = {"Llama-3.1-8B": LLAMA31_8B, "tiny": TINY, "SmolLM2-135M": SMOLLM2_135M}
WORKLOADS = {"the README's 8B command": README_8B, "64 x 512": WORKLOAD_64x512, "tiny": TINY_WORKLOAD}
WORKLOADS["the CPU check"] = CPU_CHECK


def in_own_process(*flags: str) -> dict:
    """This script run with the flags in a process of its own; the JSON line it prints last."""
    done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted(shapes: str, workload: str, script: str, dtype: str = "bfloat16") -> dict:
    """predict() in a process of its own (a second trace in one process can crash torch as the first one's fake
    storages are freed): --predict-one prints the result as JSON."""
    return in_own_process("--predict-one", shapes, workload, script, dtype)


def check_on_cpu() -> None:
    """The trace of the SmolLM2-135M-shaped route beside a real run of it (fp32, this CPU), both scripts."""
    print(
        "| script | predicted peak GiB | real run: peak of live tensors, GiB | real run: growth of peak RSS, GiB |\n|---|---|---|---|"
    )
    for script in ("sso.py", "sso_generator.py"):
        predicted_peak = predicted("SmolLM2-135M", "the CPU check", script, "float32")["peak_gib"]
        real = in_own_process("--measure", script)
        print(
            f"| {script} | {predicted_peak:.2f} | {real['live_peak_gib']:.2f} | {real['growth_gib']:.2f} |", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predict", action="store_true", help="predict on fake tensors (any machine)")
    parser.add_argument("--tiny", action="store_true", help="small shapes and budgets, to check the script")
    parser.add_argument(
        "--check-on-cpu", action="store_true", help="the trace beside a real run, SmolLM2-135M's shapes"
    )
    parser.add_argument("--measure", choices=("sso.py", "sso_generator.py"), help=argparse.SUPPRESS)  # its real run
    parser.add_argument("--predict-one", nargs=4, help=argparse.SUPPRESS)  # SHAPES WORKLOAD SCRIPT DTYPE: one trace
    cli = parser.parse_args()
    if cli.predict_one:
        shapes, workload, script, dtype = cli.predict_one

        def report(result: dict) -> None:
            print(json.dumps(result), flush=True)

        predict(SHAPES[shapes], WORKLOADS[workload], getattr(torch, dtype), script, report)
        os._exit(0)  # the JSON is out; the fake tensors need not be freed
    if cli.measure or cli.check_on_cpu:
        hf_logging.set_verbosity_error()
        if cli.measure:
            measured_on_cpu(cli.measure)
        else:
            check_on_cpu()
        return
    if not cli.predict:
        sys.exit("error: --predict traces the route; on a GPU, benchmarks/check_gpu.py runs it beside its prediction")
    workloads = (
        {"tiny": TINY_WORKLOAD} if cli.tiny else {"the README's 8B command": README_8B, "64 x 512": WORKLOAD_64x512}
    )
    for name, workload in workloads.items():
        for script in ("sso.py", "sso_generator.py"):
            started = time.time()
            result = predicted("tiny" if cli.tiny else "Llama-3.1-8B", name, script)
            sizes = f"{workload['eval_prompts']} held out, {workload['new_tokens']} new tokens, " + (
                f"{workload['prompts']} prompts" if script == "sso.py"
                else f"{workload['generator_prompts']} + {workload['policy_prompts']} prompts"
            )  # fmt: skip
            print(f"\n{script}, {name} ({sizes}), bf16 base, LoRA r=16: peak {result['peak_gib']:.1f} GiB")
            print("| phase | peak GiB | TFLOP | predicted seconds |\n|---|---|---|---|")
            for label, phase in result["phases"].items():
                print(f"| {label} | {phase['peak_gib']:.1f} | {phase['tflop']:.0f} | {phase['seconds']:.1f} |")
            print(f"(traced in {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
