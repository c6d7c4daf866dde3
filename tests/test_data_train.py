"""The warehouse task generator and the shared training loop."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.data import ACTIONS, make_tickets, required_action
from lorakit.lora import add_lora
from lorakit.models import load_smollm2
from lorakit.train import IGNORE_INDEX, collate, train


@pytest.fixture(scope="module")
def tokenizer():
    return load_smollm2()[1]


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


def test_train_moves_adapters_only(tokenizer):
    model = add_lora(_tiny_llama(tokenizer), "all-linear", r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tokenizer, make_tickets(16, seed=0), steps=3, batch_size=8, lr=1e-2, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name  # trainable moved, frozen did not
