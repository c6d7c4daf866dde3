"""The course's running task: a warehouse support assistant learns a new carrier policy.

The lesson's case: a support model already handles returns, but a new carrier policy changes how
damaged items are escalated. Each synthetic ticket names a carrier, whether the item arrived damaged,
the order value and the days since delivery; the answer is the one action the policy requires:

    damaged, carrier Kestrel, value >= 50 USD  -> ESCALATE   (the new rule: a carrier claim)
    damaged, any other case                    -> REPLACE
    not damaged, at most 30 days               -> REFUND
    not damaged, more than 30 days             -> DENY

Tickets are drawn with the four actions equally likely (chance accuracy 0.25) from a seeded
generator, so the same seed always gives the same tickets.

    >>> make_tickets(1, seed=0)[0]["answer"] in ACTIONS
    True
"""

from __future__ import annotations

import math
import random

ACTIONS = ("ESCALATE", "REPLACE", "REFUND", "DENY")
CARRIERS = ("Kestrel", "Northwind", "Bluejay", "Orca")
NEW_POLICY_CARRIER = "Kestrel"
INSTRUCTION = "Reply with exactly one action: ESCALATE, REPLACE, REFUND or DENY."


def required_action(carrier: str, damaged: bool, value: int, days: int) -> str:
    """The action the new policy requires for one ticket."""
    if damaged:
        return "ESCALATE" if carrier == NEW_POLICY_CARRIER and value >= 50 else "REPLACE"
    return "REFUND" if days <= 30 else "DENY"


def _ticket_text(carrier: str, damaged: bool, value: int, days: int) -> str:
    state = "arrived damaged" if damaged else "arrived in good condition but the customer wants to return it"
    return (
        f"Ticket: order worth {value} USD, shipped with {carrier}, delivered {days} days ago. "
        f"The item {state}. {INSTRUCTION}"
    )


def make_tickets(n: int, seed: int = 0) -> list[dict]:
    """`n` tickets as dicts with `prompt`, `answer` and the fields that decide it."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` should be a non-negative integer, but the value passed is {n!r}")
    rng = random.Random(seed)
    tickets = []
    while len(tickets) < n:
        want = ACTIONS[len(tickets) % len(ACTIONS)]  # balanced classes
        while True:  # rejection sampling: draw until the ticket requires the wanted action
            carrier, damaged = rng.choice(CARRIERS), rng.random() < 0.5
            value, days = rng.randint(5, 400), rng.randint(1, 60)
            if want == "ESCALATE":
                carrier, damaged, value = NEW_POLICY_CARRIER, True, max(value, 50)
            action = required_action(carrier, damaged, value, days)
            if action == want:
                break
        tickets.append(
            {"prompt": _ticket_text(carrier, damaged, value, days), "answer": action,
             "carrier": carrier, "damaged": damaged, "value": value, "days": days}
        )
    rng.shuffle(tickets)
    return tickets


# ---------------------------------------------------------------------------------------------------------------
# Held-out splits in a short prompt format, accuracy with its standard error, and real text for regressions.

SYSTEM = "Reply with one action."
"""The short system message of the task's chat format (~40 prompt tokens in all, with `short_prompt`). Pass it
explicitly: with no system message, SmolLM2's chat template inserts its own default one (about 20 tokens),
which only makes every sequence longer. The four action words are learned from the answers."""


def short_prompt(carrier: str, damaged: bool, value: int, days: int) -> str:
    """The ticket in a few words: with `SYSTEM` and SmolLM2's chat template, 38 to 41 tokens.

        >>> short_prompt("Kestrel", True, 120, 3)
        'Kestrel order, 120 USD, delivered 3 days ago, arrived damaged.'
    """
    state = "arrived damaged" if damaged else "return request"
    return f"{carrier} order, {value} USD, delivered {days} days ago, {state}."


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` should be a non-negative integer, but the value passed is {value!r}")
    return value


def task_splits(n_train: int, n_val: int = 0, n_test: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """Train, validation and test tickets in the short prompt format, disjoint and balanced.

    Returns ``{"train": [...], "val": [...], "test": [...]}``; each ticket is a dict with `prompt`
    (`short_prompt`, to go with the system message `SYSTEM`), `long_prompt` (the `make_tickets` text),
    `answer`, `label` (index into `ACTIONS`) and the four fields that decide the answer. No two tickets,
    within a split or across splits, have the same fields, so no ticket text is shared. The test set is drawn
    first: it depends only on `n_test` and `seed`, so runs with different training sizes share it. Every split
    has the four actions in turn (exactly balanced when its size is a multiple of 4), in shuffled order.

        >>> s = task_splits(8, 4, 200, seed=0)
        >>> [len(s[k]) for k in ("train", "val", "test")]
        [8, 4, 200]
    """
    sizes = {"test": _non_negative_int("n_test", n_test), "val": _non_negative_int("n_val", n_val),
             "train": _non_negative_int("n_train", n_train)}
    rng = random.Random(f"lorakit.task_splits/{seed}")  # a str seed is hashed deterministically (sha512)
    seen: set[tuple] = set()
    splits = {}
    for name, size in sizes.items():  # test first, then val, then train
        tickets = []
        while len(tickets) < size:
            want = ACTIONS[len(tickets) % len(ACTIONS)]
            while True:
                carrier, damaged = rng.choice(CARRIERS), rng.random() < 0.5
                value, days = rng.randint(5, 400), rng.randint(1, 60)
                if want == "ESCALATE":
                    carrier, damaged, value = NEW_POLICY_CARRIER, True, max(value, 50)
                key = (carrier, damaged, value, days)
                if required_action(*key) == want and key not in seen:
                    break
            seen.add(key)
            tickets.append(
                {"prompt": short_prompt(*key), "long_prompt": _ticket_text(*key), "answer": want,
                 "label": ACTIONS.index(want), "carrier": carrier, "damaged": damaged, "value": value, "days": days}
            )
        rng.shuffle(tickets)
        splits[name] = tickets
    return {k: splits[k] for k in ("train", "val", "test")}


def accuracy_with_stderr(correct) -> tuple[float, float]:
    """(accuracy, its standard error sqrt(p (1 - p) / n)) of a sequence of right/wrong outcomes.

        >>> accuracy_with_stderr([True] * 3 + [False])
        (0.75, 0.21650635094610965)
    """
    outcomes = [bool(c) for c in correct]
    if not outcomes:
        raise ValueError("accuracy of an empty set of outcomes is undefined: pass at least one")
    n = len(outcomes)
    p = sum(outcomes) / n
    return p, math.sqrt(p * (1 - p) / n)


def format_accuracy(correct) -> str:
    """`'0.87 ± 0.02 (n=200)'`: accuracy, standard error and the number of tickets it rests on."""
    outcomes = [bool(c) for c in correct]
    p, se = accuracy_with_stderr(outcomes)
    return f"{p:.2f} ± {se:.2f} (n={len(outcomes)})"


REGRESSION_PACKAGE = "chatterbot_corpus"
REGRESSION_INSTALL_HINT = "pip install --no-deps chatterbot-corpus==1.2.0   (or run `make lab`)"


def regression_conversations(language: str = "english") -> list[list[str]]:
    """Every conversation of the `chatterbot-corpus` package (BSD-3-Clause, hand-written English Q&A on
    computers, science, history, food, ...) as a list of turns, in a fixed order (files sorted by name)."""
    import importlib.util
    from pathlib import Path

    import yaml

    spec = importlib.util.find_spec(REGRESSION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The regression text package is not installed. Fix: {REGRESSION_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no conversations for language {language!r} in {folder}")
    conversations = []
    for path in files:
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [" ".join(str(t).split()) for t in conversation if isinstance(t, (str, int, float))]
            turns = [t for t in turns if t]
            if len(turns) >= 2:
                conversations.append(turns)
    return conversations


def regression_texts(n: int | None = 64, seed: int = 0, chat: bool = False) -> list:
    """`n` real English conversations from `chatterbot-corpus` (all of them when `n` is None), seeded order.

    Plain strings, a question and its answers one per line (`chat=False`), or message lists that alternate
    user and assistant turns, for a chat template (`chat=True`). For regression checks: a fine-tune that
    damages the model's general language shows up as a higher perplexity on these texts.
    """
    conversations = regression_conversations()
    random.Random(f"lorakit.regression_texts/{seed}").shuffle(conversations)
    if n is not None:
        n = _non_negative_int("n", n)
        if n > len(conversations):
            raise ValueError(f"`n`={n} is more than the {len(conversations)} conversations available")
        conversations = conversations[:n]
    if chat:
        return [[{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(c)] for c in conversations]
    return ["\n".join(c) for c in conversations]
