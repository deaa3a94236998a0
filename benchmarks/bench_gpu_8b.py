"""One SSO iteration with a randomly initialised model of exactly Llama-3.1-8B's shapes, on one GPU.

    python benchmarks/bench_gpu_8b.py                  # CUDA: bf16, LoRA r=16, gradient checkpointing, 16 x 256 tokens
    python benchmarks/bench_gpu_8b.py --tiny           # the same code path on CPU with small shapes (a smoke test)

No weights are downloaded: the model is built from Llama-3.1-8B's config (4096 hidden, 32 layers, 32/8 heads, 14336 MLP,
128,256 vocabulary) and the tokenizer is a word-level stand-in with all 128,256 ids and a Llama-3-style chat template.
Random weights rarely emit the end-of-turn token, so every response runs to --max-new-tokens: the worst case for memory.
Prints seconds per phase and peak GPU memory (torch.cuda.max_memory_allocated). Not yet run on a GPU.
"""

import argparse
import json
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU, to check the script itself")
    parser.add_argument("--prompts-per-iter", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    cli = parser.parse_args()
    device = torch.device("cpu" if cli.tiny else "cuda")
    dtype = torch.float32 if cli.tiny else torch.bfloat16
    flags = {k.replace("_", "-"): v for k, v in vars(cli).items() if k != "tiny"}
    args = sso.parse_args(
        [f"--{k}={v}" for k, v in flags.items()] + ["--iters", "1", "--output-dir", "/tmp/sso-bench-8b"]
    )
    principles = sso.load_principles(args.principles)
    lines = Path(args.prompts).read_text().splitlines()  # plain json: the GPU image may lack `datasets`
    queries = [json.loads(line)["prompt"] for line in lines][: args.prompts_per_iter]

    started = time.time()
    config = LlamaConfig(**(TINY if cli.tiny else LLAMA31_8B))
    with torch.device(device):
        policy = LlamaForCausalLM(config).to(dtype)  # random weights, Llama-3.1-8B shapes
    policy.generation_config.eos_token_id, policy.generation_config.pad_token_id = config.eos_token_id, 128001
    for module in policy.modules():  # dropout off, as sso.load_model does
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    tokenizer = stand_in_tokenizer(config.vocab_size)
    build_s = time.time() - started
    params = sum(p.numel() for p in policy.parameters())
    print(f"device {device} | {params / 1e9:.2f} B parameters | {dtype} | build {build_s:.1f} s")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calls = record_calls()
    policy, triples, record = sso.run_iteration(
        policy, tokenizer, queries, principles, args, 1, lambda r, line: print(line)
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"\n{len(queries)} prompts, {args.max_new_tokens} new tokens, LoRA r={args.lora_rank}, "
        f"batch {args.batch_size}, {record['kept']} triples kept"
    )
    print("| phase | seconds |\n|---|---|")
    seconds = {name: seconds_in(calls, name) for name in ("select_features", "reference_logps", "train_epoch")}
    seconds["sampling"] = seconds_in(calls, "sample_triples") - seconds["select_features"]
    for phase in ("select_features", "sampling", "reference_logps", "train_epoch"):
        print(f"| {phase} | {seconds[phase]:.1f} |")
    print(f"peak GPU memory (max_memory_allocated): {peak:.1f} GiB")


if __name__ == "__main__":
    main()
