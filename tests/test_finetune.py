"""lorakit.finetune: the pieces of notebook 11's fine-tune, on a tiny Llama built from a config (random weights,
SmolLM2's tokenizer), so that they run in seconds: replay caching is exact, the KL guard is zero for a fresh adapter
and trains only the adapter, exact match is exact, the greedy replies found by teacher forcing are the generated
ones, the FLOPs formula, MFU, the result line, the activation prediction against the measurement, and the sweep."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorakit import finetune
from lorakit.data import SYSTEM, task_splits
from lorakit.fast import cache_hidden_states, cached_loss, evaluate_cached, perplexity
from lorakit.memory import measure_training_state, predict_training_state
from lorakit.models import prepare_smollm2

TOP_K = 2


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return model, tokenizer


def _perturb_adapters(peft_model, std: float):
    """Draw every lora_B from N(0, std²), so that a fresh adapter changes the model; returns the model."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)
    return peft_model


@pytest.fixture(scope="module")
def data(tiny):
    model, tokenizer = tiny
    splits = task_splits(16, 0, 8, seed=0)
    texts = ["The cat sat on the mat and looked at the door.", "Hello there!", "What is the capital of France?",
             "A longer sentence about warehouses, carriers and the policies that govern damaged parcels.", "Ok"]
    return {
        "splits": splits,
        "texts": texts,
        "train": cache_hidden_states(model, tokenizer, splits["train"], top_k=TOP_K, progress=False),
        "test": cache_hidden_states(model, tokenizer, splits["test"], top_k=TOP_K, progress=False),
        "replay": finetune.cache_texts(model, tokenizer, texts, top_k=TOP_K, max_length=12, batch_size=2,
                                       progress=False),
    }


def _settings(**kw):
    return finetune.Settings(**{"top_k": TOP_K, "r": 4, "alpha": 8, "batch_size": 4, "steps": 3, "replay_batch": 2,
                                "device": "cpu", "dtype": torch.float32, **kw})


def test_settings_reject_bad_values():
    for bad in [{"method": "qlora4"}, {"r": 0}, {"steps": -1}, {"lr": 0}, {"kl_weight": -1}, {"dropout": 1.0},
                {"batch_size": 2.5}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            _settings(**bad)
    assert _settings().as_dict()["dtype"] == "float32"


def test_cpu_defaults_to_float32_and_adamw():
    if torch.cuda.is_available():
        pytest.skip("CPU defaults")
    assert finetune.pick_device() == ("cpu", torch.float32)
    assert finetune.optimizer_factory("cpu") is torch.optim.AdamW
    assert finetune.optimizer_name("cpu") == "torch.AdamW"


def test_available_says_no_without_raising(tmp_path):
    assert finetune.available(str(prepare_smollm2()))
    assert not finetune.available(str(tmp_path / "nothing-here"))


def test_replay_cache_equals_the_full_forward(tiny, data):
    model, tokenizer = tiny
    replay = data["replay"]
    assert len(replay) == 4  # "Ok" is one token: nothing to predict, dropped
    lengths = replay.attention_mask.sum(1).tolist()
    assert lengths == sorted(lengths) and max(lengths) <= 12
    for row in range(len(replay)):
        n = int(lengths[row])
        ids = replay.input_ids[row, :n][None]
        with torch.no_grad():
            full = model(input_ids=ids, output_hidden_states=True).hidden_states[model.config.num_hidden_layers - TOP_K]
        torch.testing.assert_close(replay.hidden[row, :n], full[0], rtol=1e-5, atol=1e-5)
        assert (replay.input_ids[row, n:] == -100).all()


def test_cached_perplexity_is_the_full_models(tiny, data):
    model, tokenizer = tiny
    peft_model = _perturb_adapters(finetune.add_adapter(copy.deepcopy(model), _settings()), std=0.5)
    texts = finetune.cache_texts(model, tokenizer, data["texts"], top_k=TOP_K, max_length=256, progress=False)
    for m in (model, peft_model):  # the base, and an adapter that changes the top layers
        full = perplexity(m, tokenizer, data["texts"])  # cut at 256 tokens too; "Ok" predicts nothing either way
        for batch_size in (1, 3):  # batches of different widths: the padding is never scored
            assert math.isclose(finetune.cached_perplexity(m, texts, batch_size=batch_size), full, rel_tol=1e-5)
    moved = perplexity(peft_model, tokenizer, data["texts"]) / perplexity(model, tokenizer, data["texts"])
    assert abs(moved - 1) > 1e-3, "the adapter must move the number for the check above to mean anything"
    with pytest.raises(ValueError, match="batch_size"):
        finetune.cached_perplexity(model, texts, batch_size=0)
    lengths = texts.attention_mask.sum(1).tolist()
    for size, budget in [(3, 1024), (16, 2 * max(lengths)), (2, 1)]:
        batches = finetune._text_batches(lengths, size, max_tokens=budget)
        assert [i for b in batches for i in b] == list(range(len(texts))), "every row once, in order"
        for b in batches:
            assert len(b) <= size and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget), (b, budget)
    assert len(finetune._text_batches(lengths, 2, max_tokens=1)) == len(texts), "a row too long for the budget: alone"
    assert finetune._text_batches([3, 4, 40], 8, max_tokens=64) == [[0, 1], [2]], "the long text alone"


def test_kl_guard_is_zero_for_a_fresh_adapter_and_trains_only_the_adapter(tiny, data):
    model, _ = tiny
    peft_model = finetune.add_adapter(copy.deepcopy(model), _settings())
    kl = finetune.kl_to_base(peft_model, data["replay"], [0, 1, 2])
    assert abs(kl.item()) < 1e-7
    _perturb_adapters(peft_model, std=0.5)
    kl = finetune.kl_to_base(peft_model, data["replay"], [0, 1, 2])
    assert kl.item() > 1e-4
    kl.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)
    with pytest.raises(TypeError, match="peft model"):
        finetune.kl_to_base(model, data["replay"], [0])


def test_train_guarded_records_both_losses(tiny, data):
    model, _ = tiny
    peft_model = finetune.add_adapter(copy.deepcopy(model), _settings())
    run = finetune.train_guarded(peft_model, data["train"], 3, replay=data["replay"], kl_weight=0.5, replay_batch=2,
                                 batch_size=4, lr=1e-2, progress=False)
    assert len(run["loss"]) == len(run["task_loss"]) == len(run["kl"]) == 3
    for total, task, kl in zip(run["loss"], run["task_loss"], run["kl"], strict=True):
        assert math.isclose(total, task + 0.5 * kl, rel_tol=1e-5)
    assert run["kl"][0] == pytest.approx(0.0, abs=1e-7)  # B = 0 at the first step
    assert run["tokens"] > 0 and run["seconds"] > 0
    # 3 batches of 4 tickets: the shared prefix goes through the layers once a batch, not 4 times
    assert run["tokens"] - run["computed_tokens"] == 3 * 3 * data["train"].prefix_len > 0
    naive = finetune.train_guarded(finetune.add_adapter(copy.deepcopy(model), _settings()), data["train"], 2,
                                   replay=data["replay"], kl_weight=0.0, batch_size=4, progress=False)
    assert naive["kl"] == [] and len(naive["loss"]) == 2
    with pytest.raises(ValueError, match="replay_batch"):
        finetune.train_guarded(peft_model, data["train"], 1, replay=data["replay"], replay_batch=99, batch_size=4)


def test_train_guarded_draws_replay_by_length_and_shares_the_prefix(tiny, data, monkeypatch):
    model, _ = tiny
    replay = data["replay"]
    lengths = replay.attention_mask.sum(1).tolist()
    drawn, kl_to_base = [], finetune.kl_to_base

    def spy(m, cache, idx):
        drawn.append(sorted(idx))
        return kl_to_base(m, cache, idx)

    monkeypatch.setattr(finetune, "kl_to_base", spy)
    runs = {}
    for share in (False, True):
        drawn.clear()
        runs[share] = finetune.train_guarded(finetune.add_adapter(copy.deepcopy(model), _settings()), data["train"],
                                             4, replay=replay, replay_batch=2, batch_size=4, lr=1e-2, progress=False,
                                             share_prefix=share)
        # sorted by length and cut into batches of 2: the two shortest together, the two longest together
        by_length = sorted(range(len(replay)), key=lengths.__getitem__)
        groups = [sorted(by_length[:2]), sorted(by_length[2:])]
        assert all(batch in groups for batch in drawn) and len(drawn) == 4, drawn
        assert drawn[0] != drawn[1] and drawn[2] != drawn[3], "each epoch draws every batch once"
    assert data["train"].prefix_len > 0
    # the shared prefix changes the arithmetic, not the result: the same losses to float rounding
    for key in ("task_loss", "kl"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        finetune.train_guarded(copy.deepcopy(model), data["train"], 1, batch_size=4)


def test_exact_match_is_exact():
    tickets = [{"answer": a} for a in ["ESCALATE", "DENY", "REFUND", "REPLACE"]]
    assert finetune.exact_match(["ESCALATE", "deny", "REFUND.", "REPLACE"], tickets) == [True, False, False, True]
    with pytest.raises(ValueError, match="replies"):
        finetune.exact_match(["DENY"], tickets)


def test_generate_answers_is_deterministic_and_greedy(tiny, data):
    model, tokenizer = tiny
    tickets = data["splits"]["test"][:3]
    first = finetune.generate_answers(model, tokenizer, tickets, max_new_tokens=3, batch_size=2)
    assert first == finetune.generate_answers(model, tokenizer, tickets, max_new_tokens=3, batch_size=3)
    assert len(first) == 3 and all(isinstance(r, str) for r in first)


def test_greedy_replies_are_the_generated_replies(tiny, data, monkeypatch):
    model, tokenizer = tiny
    tickets, cache = data["splits"]["train"], data["train"]
    learner = copy.deepcopy(model)  # the top layers and an untied head trained in full: it memorises fast
    learner.lm_head.weight = nn.Parameter(learner.lm_head.weight.detach().clone())
    learner.lm_head.requires_grad_(True)
    learner.model.layers[-TOP_K:].requires_grad_(True)
    generated = []
    real_generate = finetune.generate_answers

    def spy(m, tok, some, **kw):
        generated.extend(some)
        return real_generate(m, tok, some, **kw)

    monkeypatch.setattr(finetune, "generate_answers", spy)
    seen = []
    for seed in range(12):  # from no ticket answered exactly, through some, towards all
        hits = finetune.greedy_hits(learner, cache)
        generated.clear()
        replies = finetune.greedy_replies(learner, tokenizer, tickets, cache)
        assert replies == real_generate(learner, tokenizer, tickets)
        assert finetune.exact_match(replies, tickets) == hits
        assert len(generated) == hits.count(False), "only the tickets not answered exactly are generated"
        seen.append(sum(hits))
        if all(hits):
            break
        finetune.train_guarded(learner, cache, 10, batch_size=4, lr=1e-2, seed=seed, progress=False)
    assert seen[0] == 0 and any(0 < n < len(tickets) for n in seen), seen
    with pytest.raises(ValueError, match="cache holds 16 tickets"):
        finetune.greedy_replies(learner, tokenizer, tickets[:3], cache)
    with pytest.raises(ValueError, match="row 0 of the cache is not ticket 0"):
        finetune.greedy_replies(learner, tokenizer, tickets[::-1], cache)


def test_flops_per_token_counts_the_top_layers(tiny):
    model, _ = tiny
    peft_model = finetune.add_adapter(copy.deepcopy(model), _settings())
    f = finetune.flops_per_token(peft_model, TOP_K, seq_len=10)
    d, ff, kv = 64, 128, 2 * 16
    base = TOP_K * (2 * d * d + 2 * d * kv + 3 * d * ff)  # q, o; k, v; gate, up, down
    adapters = TOP_K * 4 * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)  # r (d_in + d_out) for each of the seven
    assert f["frozen"] == base and f["trainable"] == adapters
    assert f["flops"] == 4 * base + 6 * adapters + 12 * TOP_K * 10 * d


def test_peak_flops_and_mfu():
    assert finetune.peak_flops("NVIDIA H200") == 989e12
    assert finetune.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert finetune.peak_flops("Some CPU") is None
    assert finetune.estimate_mfu(1e9, 1000, None) is None
    assert finetune.estimate_mfu(1e9, 1000, 1e13) == pytest.approx(0.1)


def test_result_line_is_machine_readable():
    line = finetune.result_line(task_acc_before=0.0, task_acc_after=0.995, regression_ppl_before=51.2981,
                                tokens_per_s=1234.5, peak_mem_measured_mb=600.25, note="cpu")
    assert line.startswith("RESULT ")
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    assert fields == {"task_acc_before": "0", "task_acc_after": "0.995", "regression_ppl_before": "51.3",
                      "tokens_per_s": "1234", "peak_mem_measured_mb": "600.2", "note": "cpu"}


def test_activation_prediction_is_close_to_the_measurement(tiny, data):
    model, _ = tiny
    peft_model = finetune.add_adapter(copy.deepcopy(model), _settings())
    train, replay = data["train"], data["replay"]
    idx, ridx = [0, 1, 2, 3], [1, 3]

    def loss_fn(m, _batch):
        return cached_loss(m, train, idx) + finetune.kl_to_base(m, replay, ridx)

    def shared_loss_fn(m, _batch):
        return cached_loss(m, train, idx, share_prefix=True) + finetune.kl_to_base(m, replay, ridx)

    measured = measure_training_state(peft_model, {}, loss_fn=loss_fn)
    width = int(train.attention_mask[idx].sum(1).max())
    common = {"answer_tokens": int((train.labels[idx, 1:width] != -100).sum()),
              "replay_tokens": len(ridx) * int(replay.attention_mask[ridx].sum(1).max()),
              "replay_positions": int(replay.attention_mask[ridx, 1:].sum())}
    predicted = finetune.predict_activation_bytes(peft_model, TOP_K, ticket_tokens=len(idx) * width, **common)
    assert 0.9 < predicted["total"] / measured.activations < 1.1, (predicted, measured.activations)
    # the prefix shared: p + B (w - p) token positions through the layers, and B p prefix keys and values kept
    shared = measure_training_state(peft_model, {}, loss_fn=shared_loss_fn)
    p = train.prefix_len
    assert shared.activations < measured.activations
    predicted_shared = finetune.predict_activation_bytes(
        peft_model, TOP_K, ticket_tokens=p + len(idx) * (width - p), prefix_kv_tokens=len(idx) * p, **common)
    assert 0.9 < predicted_shared["total"] / shared.activations < 1.1, (predicted_shared, shared.activations)
    state = predict_training_state(peft_model)
    assert (state.gradients, state.optimizer) == (measured.gradients, measured.optimizer)


def test_sweep_runs_every_setting_from_the_same_caches(tiny, data):
    model, _ = tiny
    grid = [{"lr": 1e-2}, {"lr": 1e-3, "targets": ["q_proj", "v_proj"], "r": 2, "alpha": 4}]
    rows = finetune.sweep(model, _settings(), grid, data["train"], data["test"], data["replay"], data["replay"],
                          steps=2, progress=False)
    assert [r["lr"] for r in rows] == [1e-2, 1e-3]
    assert rows[1]["trainable"] < rows[0]["trainable"]
    for r in rows:
        assert 0 <= r["acc"] <= 1 and r["heldout_kl"] >= 0 and r["s_per_step"] > 0 and r["task_loss"] > 0
    table = finetune.format_sweep(rows)
    assert "q_proj,v_proj" in table and len(table.splitlines()) == 3
    assert not any(p.requires_grad for p in model.parameters()), "the sweep never adapts the base it is given"


def test_heldout_task_is_the_cached_accuracy_and_loss(tiny, data):
    model, _ = tiny
    peft_model = _perturb_adapters(finetune.add_adapter(copy.deepcopy(model), _settings()), std=0.5)
    test = data["test"]
    correct, loss = finetune.heldout_task(peft_model, test, batch_size=3)  # batches of 3, 3 and 2
    assert correct == evaluate_cached(peft_model, test)
    labels = test.labels[:, 1:]
    counts = (labels != -100).sum(1)  # answer tokens per ticket: the mean is over tokens, not tickets
    with torch.no_grad():
        per_row = torch.stack([cached_loss(peft_model, test, [i]) for i in range(len(test))])
    assert loss == pytest.approx(float((per_row * counts).sum() / counts.sum()), rel=1e-5)


def test_cached_task_loss_matches_the_full_model(tiny, data):
    model, tokenizer = tiny
    from lorakit.train import answer_loss, collate

    peft_model = _perturb_adapters(finetune.add_adapter(copy.deepcopy(model), _settings()), std=0.1)
    with torch.no_grad():
        full = answer_loss(peft_model, collate(tokenizer, data["splits"]["train"][:4], SYSTEM))
        cached = cached_loss(peft_model, data["train"], [0, 1, 2, 3])
    torch.testing.assert_close(full, cached, rtol=1e-5, atol=1e-5)
