"""The warehouse task generator and the shared training loop."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.data import (
    ACTIONS,
    SYSTEM,
    accuracy_with_stderr,
    format_accuracy,
    make_tickets,
    regression_texts,
    required_action,
    short_prompt,
    task_splits,
)
from lorakit.lora import add_lora
from lorakit.models import prepare_smollm2
from lorakit.train import IGNORE_INDEX, collate, encode, prompt_ids, train


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare_smollm2())  # the tokenizer alone: no need to load the weights


def test_tickets_are_seeded_balanced_and_follow_the_policy():
    tickets = make_tickets(200, seed=7)
    assert tickets == make_tickets(200, seed=7) and tickets != make_tickets(200, seed=8)
    assert Counter(t["answer"] for t in tickets) == {a: 50 for a in ACTIONS}
    for t in tickets:
        assert t["answer"] == required_action(t["carrier"], t["damaged"], t["value"], t["days"])
        assert t["carrier"] in t["prompt"] and f"{t['days']} days" in t["prompt"]
    assert required_action("Kestrel", True, 49, 3) == "REPLACE"
    assert required_action("Kestrel", True, 50, 3) == "ESCALATE"
    with pytest.raises(ValueError, match="-1"):
        make_tickets(-1)


def test_loss_is_on_answer_tokens_only(tokenizer):
    tickets = make_tickets(4, seed=0)
    batch = collate(tokenizer, tickets)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, ticket in enumerate(tickets):
        answer = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(answer) == ticket["answer"] + tokenizer.eos_token
        # padding is masked out of attention and of the loss
        assert ((batch["attention_mask"][row] == 0) <= (batch["labels"][row] == IGNORE_INDEX)).all()


def _tiny_llama(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def test_train_lowers_the_loss(tokenizer):
    model = _tiny_llama(tokenizer)
    losses = train(model, tokenizer, make_tickets(16, seed=0), steps=20, batch_size=8, lr=1e-2, progress=False)
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="0"):
        train(model, tokenizer, make_tickets(16), steps=0)


def test_train_reports_every_step_to_after_step(tokenizer):
    seen = []
    model = _tiny_llama(tokenizer)
    losses = train(model, tokenizer, make_tickets(16, seed=0), steps=4, batch_size=8, lr=1e-2, progress=False,
                   after_step=lambda n, loss: seen.append((n, loss, model.training)))
    assert seen == [(n, loss, True) for n, loss in enumerate(losses, start=1)]  # during training, in training mode
    # the hook does not change what is learned: the same losses without it
    assert train(_tiny_llama(tokenizer), tokenizer, make_tickets(16, seed=0), steps=4, batch_size=8, lr=1e-2,
                 progress=False) == losses


def test_train_moves_adapters_only(tokenizer):
    model = add_lora(_tiny_llama(tokenizer), "all-linear", r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tokenizer, make_tickets(16, seed=0), steps=3, batch_size=8, lr=1e-2, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name  # trainable moved, frozen did not


def test_splits_are_deterministic_disjoint_and_balanced():
    splits = task_splits(40, 12, 200, seed=3)
    assert splits == task_splits(40, 12, 200, seed=3) and splits != task_splits(40, 12, 200, seed=4)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [40, 12, 200]
    texts = [{t["prompt"] for t in splits[k]} for k in ("train", "val", "test")]
    assert sum(map(len, texts)) == 252  # no ticket repeats, within or across splits
    assert len({t["long_prompt"] for k in splits for t in splits[k]}) == 252
    # the test set does not depend on how much training data is drawn
    assert task_splits(8, 0, 200, seed=3)["test"] == splits["test"]
    for name, tickets in splits.items():
        assert Counter(t["answer"] for t in tickets) == {a: len(tickets) // 4 for a in ACTIONS}, name
        for t in tickets:
            assert t["answer"] == required_action(t["carrier"], t["damaged"], t["value"], t["days"])
            assert ACTIONS[t["label"]] == t["answer"] and t["prompt"] == short_prompt(
                t["carrier"], t["damaged"], t["value"], t["days"])
    with pytest.raises(ValueError, match="-5"):
        task_splits(-5)


def test_short_prompt_is_short(tokenizer):
    lengths = [len(prompt_ids(tokenizer, t["prompt"], SYSTEM)) for t in task_splits(0, 0, 40, seed=0)["test"]]
    assert max(lengths) <= 45
    # with no system message the template adds SmolLM2's default one: longer
    t = task_splits(1, 0, 0)["train"][0]
    assert len(prompt_ids(tokenizer, t["prompt"])) > len(prompt_ids(tokenizer, t["prompt"], SYSTEM)) + 5
    # the default (no system argument) is the template's, as notebook 03 uses it
    assert encode(tokenizer, "hi", "DENY") == encode(tokenizer, "hi", "DENY", system=None)


def test_accuracy_with_stderr():
    p, se = accuracy_with_stderr([True] * 87 + [False] * 13)
    assert p == 0.87 and math.isclose(se, math.sqrt(0.87 * 0.13 / 100))
    assert accuracy_with_stderr([1, 1]) == (1.0, 0.0)
    assert format_accuracy([True] * 174 + [False] * 26) == "0.87 ± 0.02 (n=200)"
    with pytest.raises(ValueError, match="empty"):
        accuracy_with_stderr([])


def test_regression_texts_are_real_english():
    texts = regression_texts(50, seed=0)
    assert len(texts) == 50 and texts == regression_texts(50, seed=0) and texts != regression_texts(50, seed=1)
    assert all(isinstance(t, str) and "\n" in t and len(t) > 5 for t in texts)
    assert len(set(texts)) > 45
    words = " ".join(texts).lower().split()
    assert sum(w in {"the", "a", "is", "you", "i"} for w in words) > 50  # English prose, not noise
    chats = regression_texts(3, seed=0, chat=True)
    assert [m["role"] for m in chats[0][:2]] == ["user", "assistant"]
    assert chats[0][0]["content"] == texts[0].split("\n")[0]
    assert len(regression_texts(None)) > 500
    with pytest.raises(ValueError, match="100000"):
        regression_texts(100000)
