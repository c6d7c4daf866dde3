"""lorakit.fast: training the top layers from cached hidden states is exact, and it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lorakit.data import ACTIONS, SYSTEM, regression_texts, task_splits
from lorakit.fast import (
    accuracy,
    cache_hidden_states,
    cached_logits,
    cached_loss,
    evaluate_cached,
    label_token_ids,
    perplexity,
    top_layer_targets,
    train_cached,
)
from lorakit.lora import add_lora
from lorakit.models import load_smollm2
from lorakit.train import answer_loss, collate, encode

TOP_K = 2


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    return load_smollm2()


@pytest.fixture(scope="module")
def tickets():
    return task_splits(8, 0, 4, seed=0)


@pytest.fixture(scope="module")
def adapted(smollm2, tickets):
    """SmolLM2 with non-zero LoRA adapters in its top layers, and caches of its lower layers."""
    model, tokenizer = smollm2
    train_cache = cache_hidden_states(model, tokenizer, tickets["train"], top_k=TOP_K, progress=False)
    test_cache = cache_hidden_states(model, tokenizer, tickets["test"], top_k=TOP_K, progress=False)
    model = add_lora(copy.deepcopy(model), top_layer_targets(model, TOP_K), r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.02)  # a trained-looking adapter, so the top layers differ from the base
    return model, tokenizer, train_cache, test_cache


def test_label_tokens_are_distinct(smollm2):
    tokenizer = smollm2[1]
    ids = label_token_ids(tokenizer)
    assert len(set(ids)) == len(ACTIONS)
    for action, i in zip(ACTIONS, ids, strict=True):
        assert action.startswith(tokenizer.decode([i]))


def test_top_layer_targets(smollm2):
    model = smollm2[0]
    assert top_layer_targets(model, 1, ["q_proj"]) == ["model.layers.29.self_attn.q_proj"]
    names = top_layer_targets(model, 2)
    assert len(names) == 14 and all(n.startswith(("model.layers.28.", "model.layers.29.")) for n in names)
    with pytest.raises(ValueError, match="31"):
        top_layer_targets(model, 31)
    with pytest.raises(ValueError, match="qproj"):
        top_layer_targets(model, 2, ["qproj"])


def test_cached_path_equals_the_full_forward(adapted, tickets):
    model, tokenizer, cache, _ = adapted
    batch = collate(tokenizer, tickets["train"], system=SYSTEM)
    assert cache.hidden.shape[:2] == batch["input_ids"].shape
    with torch.no_grad():
        full_loss = answer_loss(model, batch)
        full_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.arange(len(cache))
    expected = full_logits[rows, cache.answer_pos][:, cache.label_ids]  # (N, 4)
    with torch.no_grad():
        torch.testing.assert_close(cached_loss(model, cache, range(len(cache))), full_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_logits(model, cache), expected, rtol=1e-4, atol=1e-4)
    # the answer position is the prompt's last token: the next label is the answer's first token
    assert (batch["labels"][rows, cache.answer_pos + 1] == torch.tensor(cache.label_ids)[cache.targets]).all()
    # scoring without the cache (any model) ranks the actions the same way
    assert accuracy(model, tokenizer, tickets["train"]) == evaluate_cached(model, cache)


def test_gradients_match_the_full_model(adapted, tickets):
    model, tokenizer, cache, _ = adapted
    params = [p for p in model.parameters() if p.requires_grad]
    answer_loss(model, collate(tokenizer, tickets["train"][:4], system=SYSTEM)).backward()
    full = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    cached_loss(model, cache, range(4)).backward()
    for p, g in zip(params, full, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_a_shared_prefix_is_computed_once_with_the_same_result(adapted, tickets):
    model, tokenizer, cache, _ = adapted
    ids = [encode(tokenizer, t["prompt"], t["answer"], SYSTEM)[0] for t in tickets["train"]]
    p = cache.prefix_len
    assert p > 0 and all(row[:p] == ids[0][:p] for row in ids), "every ticket starts with the same p tokens"
    assert len({row[p] for row in ids}) > 1, "and no longer prefix is shared"
    prefix = tokenizer.decode(ids[0][:p])
    assert prefix.endswith(f"{SYSTEM}<|im_end|>\n<|im_start|>user\n"), prefix  # the system turn, the user's start
    assert p <= int(cache.answer_pos.min())
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [5, 0, 3, 6]
    plain = cached_loss(model, cache, rows)
    shared = cached_loss(model, cache, rows, share_prefix=True)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    for g_shared, g_plain in zip(torch.autograd.grad(shared, params), torch.autograd.grad(plain, params), strict=True):
        torch.testing.assert_close(g_shared, g_plain, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # one row: nothing to share, the plain path
        assert torch.equal(cached_loss(model, cache, [2], share_prefix=True), cached_loss(model, cache, [2]))
    torch.testing.assert_close(cached_logits(model, cache, share_prefix=True), cached_logits(model, cache),
                               rtol=1e-4, atol=1e-4)


def test_caching_with_a_shared_prefix_gives_the_same_hidden_states(smollm2, adapted, tickets):
    base, tokenizer = smollm2
    model, _, cache, _ = adapted
    shared = cache_hidden_states(base, tokenizer, tickets["train"], top_k=TOP_K, batch_size=3, share_prefix=True,
                                 progress=False)  # batches of 3, 3 and 2 rows: each computes the prefix once
    assert shared.prefix_len == cache.prefix_len > 0
    for name in ("attention_mask", "labels", "answer_pos", "targets"):
        assert torch.equal(getattr(shared, name), getattr(cache, name)), name
    real = cache.attention_mask.bool()  # padding positions hold whatever the layers give them: never read
    a, b = shared.hidden[real], cache.hidden[real]  # after 28 layers: float rounding, about 5e-7 of the whole
    assert (a - b).norm() < 1e-5 * b.norm(), (a - b).norm() / b.norm()
    p = cache.prefix_len
    assert torch.equal(shared.hidden[:3, :p], shared.hidden[:1, :p].expand(3, -1, -1)), "one prefix, repeated"
    with torch.no_grad():
        torch.testing.assert_close(cached_loss(model, shared, range(len(shared))),
                                   cached_loss(model, cache, range(len(cache))), rtol=1e-5, atol=1e-5)


def test_peft_dora_uses_the_cache_too(smollm2, adapted, tickets):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = smollm2
    targets = top_layer_targets(model, TOP_K, ["q_proj", "v_proj"])
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    cache = adapted[2]
    batch = collate(tokenizer, tickets["train"], system=SYSTEM)
    with torch.no_grad():
        full = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = full[torch.arange(len(cache)), cache.answer_pos][:, cache.label_ids]
    torch.testing.assert_close(cached_logits(peft_model, cache), expected, rtol=1e-4, atol=1e-4)
    assert len(train_cached(peft_model, cache, steps=1, batch_size=4, progress=False)) == 1


def test_training_from_the_cache_lowers_the_loss(adapted):
    model, _, cache, test_cache = adapted
    model = copy.deepcopy(model)
    losses = train_cached(model, cache, steps=6, batch_size=4, lr=5e-3, progress=False)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert len(evaluate_cached(model, test_cache)) == len(test_cache) == 4


def test_train_cached_refuses_adapters_below_the_cache(smollm2, adapted):
    model = add_lora(copy.deepcopy(smollm2[0]), ["layers.0.self_attn.q_proj"], r=2, alpha=4)
    with pytest.raises(ValueError, match="layers.0"):
        train_cached(model, adapted[2], steps=1, batch_size=4, progress=False)
    frozen = copy.deepcopy(smollm2[0]).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter"):
        train_cached(frozen, adapted[2], steps=1, batch_size=4, progress=False)


def test_perplexity_on_real_text(smollm2):
    model, tokenizer = smollm2
    texts = regression_texts(4, seed=0)
    ppl = perplexity(model, tokenizer, texts)
    assert 1.0 < ppl < 1000.0
    # batching and padding do not change the number
    assert math.isclose(ppl, perplexity(model, tokenizer, texts, batch_size=1), rel_tol=1e-4)
    assert perplexity(model, tokenizer, regression_texts(2, seed=0, chat=True)) > 1.0
