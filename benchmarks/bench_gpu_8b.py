"""One SSO iteration with a randomly initialised model of exactly Llama-3.1-8B's shapes, on one GPU.

    python benchmarks/bench_gpu_8b.py                  # CUDA: bf16 compute, LoRA r=16, checkpointing, 16 x 256 tokens
    python benchmarks/bench_gpu_8b.py --tiny           # the same code path on the CPU with small shapes (a smoke test)

No weights are downloaded: the model is built from Llama-3.1-8B's config (4096 hidden, 32 layers, 32/8 heads, 14336 MLP,
128,256 vocabulary) and the tokenizer is a word-level stand-in with all 128,256 ids and a Llama-3-style chat template.
Random weights rarely emit the end-of-turn token, so every response runs to --max-new-tokens: the worst case for memory.
The model is left as sso.load_model leaves one (fp32 weights, bf16 compute), and the run is sso.py's: the held-out
data from π_0, one iteration, the held-out check. Prints seconds per phase and peak GPU memory
(torch.cuda.max_memory_allocated). benchmarks/check_gpu.py runs it after its checks. Not yet run on a GPU.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_sso import record_calls, seconds_in  # noqa: E402  (this folder is on sys.path when the script runs)

import sso  # noqa: E402

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
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def stand_in_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over all of Llama 3's ids; the special tokens sit at Llama 3's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
    }
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


def build(shapes: dict, device: torch.device, dtype: torch.dtype):
    """A random Llama of these shapes, as sso.load_model leaves a model: fp32 weights computing in `dtype`, dropout
    off, gradient checkpointing on; and the stand-in tokenizer."""
    config = LlamaConfig(**shapes)
    with torch.device(device):
        policy = LlamaForCausalLM(config).eval()  # random weights, fp32 (NOTE(impl) 13 of sso.py)
    policy.compute_dtype = dtype
    policy.generation_config.eos_token_id, policy.generation_config.pad_token_id = config.eos_token_id, 128001
    for module in policy.modules():  # dropout off, as sso.load_model does
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    return policy, stand_in_tokenizer(config.vocab_size)


def iteration_with_check(shapes: dict, device: torch.device, dtype: torch.dtype, flags: list[str]) -> dict:
    """sso.py's held-out data from π_0, one iteration and the held-out check after it, phase by phase.
    Returns the seconds of each phase, the peak GPU memory (GiB; nan on a CPU) and the iteration's record."""
    args = sso.parse_args([*flags, "--iters", "1", "--output-dir", "/tmp/sso-bench-8b"])
    principles = sso.load_principles(args.principles)
    lines = Path(args.prompts).read_text().splitlines()  # plain json, the prompts file's own format
    prompts = [json.loads(line)["prompt"] for line in lines]
    held_queries, queries = prompts[: args.eval_prompts], prompts[args.eval_prompts :][: args.prompts_per_iter]
    started = time.time()
    policy, tokenizer = build(shapes, device, dtype)
    seconds = {"build": time.time() - started}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calls = record_calls()
    log = lambda record, line: print(line)  # noqa: E731
    held = sso.held_out_data(Path(tempfile.mkdtemp()), policy, tokenizer, held_queries, principles, args, log, 0)
    policy, triples, record = sso.run_iteration(policy, tokenizer, queries, principles, args, 1, log)
    sso.held_out_check(policy, tokenizer, held, args, 1, log)
    for name in ("held_out_data", "select_features", "reference_logps", "train_epoch"):
        seconds[name] = seconds_in(calls, name, outside="held_out_data" if name != "held_out_data" else None)
    seconds["sampling"] = seconds_in(calls, "sample_responses", outside="held_out_data")
    seconds["held_out_check"] = seconds_in(calls, "held_out_check", outside="held_out_data")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "seconds": seconds,
        "peak_gib": peak,
        "record": record,
        "params": sum(p.numel() for p in policy.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU in bf16, to check the script")
    parser.add_argument("--prompts-per-iter", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    cli = parser.parse_args()
    device = torch.device("cpu" if cli.tiny else "cuda")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(cli).items() if k != "tiny"]
    result = iteration_with_check(TINY if cli.tiny else LLAMA31_8B, device, torch.bfloat16, flags)
    print(
        f"\ndevice {device} | {result['params'] / 1e9:.2f} B parameters, fp32 weights, bf16 compute | "
        f"{cli.prompts_per_iter} prompts, {cli.eval_prompts} held out, {cli.max_new_tokens} new tokens, "
        f"LoRA r={cli.lora_rank}, batch {cli.batch_size}, {result['record']['kept']} triples kept"
    )
    print("| phase | seconds |\n|---|---|")
    for phase, seconds in result["seconds"].items():
        print(f"| {phase} | {seconds:.1f} |")
    print(f"peak GPU memory (max_memory_allocated): {result['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
