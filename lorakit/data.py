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
