"""A deterministic sample dataset: support tickets to classify, in alpaca format.

Each row is ``{"instruction", "input", "output"}``. The instruction is fixed, the input is a
short customer ticket, and the output is compact JSON with a fixed key order::

    {"category": "shipping", "priority": "high", "product": "orbit_watch"}

Every label is determined by a cue in the ticket, so the task is learnable, but the surface
forms vary so that it is not string copying:

- ``product``: the ticket names exactly one product brand, written one of several ways
  ("Orbit 2 smartwatch" -> ``orbit_watch``);
- ``priority``: exactly one urgency phrase ("no rush ..." -> ``low``, "... blocking
  production ..." -> ``urgent``); no phrase of one level is a substring of another level's;
- ``category``: the topic sentence (and the optional detail sentence) of one category.

A small instruct model does not answer in this exact JSON zero-shot (it does not know the label
ids), which is what makes the fine-tune measurable. All randomness comes from one
``random.Random(seed)``: the same ``(n, seed)`` always gives the same rows, byte for byte.

``python -m phiops.datagen`` rewrites ``data/raw/tickets.jsonl`` (1200 rows, seed 0) and
``data/examples/broken.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phiops.io import write_jsonl, write_text

INSTRUCTION = "Classify the support ticket. Answer with JSON: category, priority, product."

CATEGORIES: tuple[str, ...] = ("billing", "bug", "account", "shipping", "feature_request")
PRIORITIES: tuple[str, ...] = ("low", "medium", "high", "urgent")

# product id -> the ways a customer writes it. The brand word is the cue; the rest varies.
PRODUCTS: dict[str, tuple[str, ...]] = {
    "atlas_laptop": ("Atlas Laptop", "Atlas laptop", "Atlas 14 laptop", "Atlas notebook", "Atlas Pro laptop"),
    "nimbus_router": ("Nimbus Router", "Nimbus router", "Nimbus mesh router", "Nimbus Wi-Fi router", "Nimbus AX router"),
    "pulse_speaker": ("Pulse Speaker", "Pulse speaker", "Pulse Mini speaker", "Pulse Bluetooth speaker", "Pulse Max speaker"),
    "orbit_watch": ("Orbit Watch", "Orbit watch", "Orbit smartwatch", "Orbit 2 smartwatch", "Orbit Sport watch"),
    "vela_tablet": ("Vela Tablet", "Vela tablet", "Vela 11 tablet", "Vela drawing tablet", "Vela Air tablet"),
}
BRANDS: dict[str, str] = {pid: aliases[0].split()[0] for pid, aliases in PRODUCTS.items()}

# Each phrase carries its level and nothing else; tests check that no phrase of one level
# contains a phrase of another, so the cue is never ambiguous.
PRIORITY_CUES: dict[str, tuple[str, ...]] = {
    "low": (
        "No rush on this, whenever you get a chance is fine.",
        "This is not time sensitive at all.",
        "Just letting you know, there is no hurry.",
        "Take your time, it is only a minor annoyance.",
        "Low priority, answer whenever it suits you.",
        "Whenever you have a spare moment would be fine.",
    ),
    "medium": (
        "I would appreciate a reply within the next few days.",
        "It is getting a bit annoying, so please look into it this week.",
        "A response in the coming days would be appreciated.",
        "Please get back to me sometime this week.",
        "It is not the end of the world, but I would like it sorted soon.",
        "Medium priority, but please do not forget about it.",
    ),
    "high": (
        "This is seriously affecting my work, please prioritize it.",
        "I need this resolved by tomorrow at the latest.",
        "Please treat this as high priority, it is holding up my whole team.",
        "It is causing real problems for me every day, so a quick fix would help a lot.",
        "Please escalate this, I have a client meeting on Monday and depend on it.",
        "I really need this fixed before the end of the week.",
    ),
    "urgent": (
        "This is urgent, please help ASAP!",
        "Our production line is blocked until this is fixed, we need help immediately.",
        "This is an emergency, I need someone to call me right now.",
        "URGENT: please respond within the hour.",
        "It is blocking production for our entire office, please act immediately.",
        "Please treat this as an emergency, we are losing money every minute.",
    ),
}
# Feature requests are rarely emergencies; shipping and bugs skew higher. The weights only
# shape the label mix: the priority itself is always stated by the cue phrase.
_PRIORITY_WEIGHTS: dict[str, tuple[int, ...]] = {
    "billing": (2, 4, 3, 1),
    "bug": (1, 3, 4, 2),
    "account": (1, 3, 4, 2),
    "shipping": (2, 3, 3, 2),
    "feature_request": (5, 4, 1, 0),
}

# Topic sentences: each names the product ({p}) and states the category. Keywords of one
# category ("refund", "tracking", "password", "crashes", "would love") never appear in
# another category's sentences.
TOPICS: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for my {p} and only one payment should have gone through.",
        "The invoice for my {p} shows ${amount} but the checkout page said ${amount2}.",
        "I returned my {p} {days} days ago and the refund still has not reached my card.",
        "My card was billed ${amount} for the {p} protection plan even though I cancelled it.",
        "Could you send me a proper VAT invoice for the {p} I bought last month?",
        "The price of the {p} dropped a week after I paid, can I get the difference refunded?",
        "I was charged ${amount} in extra fees when I bought my {p}, which nobody mentioned.",
        "My monthly payment for the {p} insurance went up to ${amount} without any notice.",
    ),
    "bug": (
        "My {p} crashes every time I open the settings menu after the latest update.",
        "Since the last software update my {p} freezes for about {n} seconds whenever I {action}.",
        "The {p} keeps showing error code E{code} and then restarts on its own.",
        "The battery indicator on my {p} jumps from {pct} percent to zero in minutes, which looks like a bug.",
        "The screen of my {p} starts to flicker whenever the brightness is below {pct} percent.",
        "After the update my {p} drops the connection every few minutes and shows error code E{code}.",
        "The companion app crashes as soon as I try to pair my {p}.",
        "My {p} freezes completely when I {action}, and only a hard reset helps.",
    ),
    "account": (
        "I cannot sign in to the {p} companion app because it says my password is wrong.",
        "The password reset link for my {p} account never shows up in my inbox.",
        "Please change the email address on the account I use for my {p}.",
        "The two-factor code for my {p} account is rejected every single time.",
        "A stranger's name shows up on the profile linked to my {p}, and I worry my account is not secure.",
        "I want to merge the two accounts I accidentally created when I registered my {p}.",
        "My {p} account was locked after too many sign in attempts and I cannot unlock it.",
        "I would like to delete the account and all personal data tied to my {p}.",
    ),
    "shipping": (
        "My {p} was supposed to arrive {days} days ago but the tracking page has not changed since.",
        "The courier marked my {p} as delivered, but nothing was left at my door.",
        "The box with my {p} arrived crushed and the charger was missing from the package.",
        "I ordered a {p} with express delivery and it still has not shipped.",
        "Can you change the delivery address for my {p}, since I am moving to {city} next week?",
        "The tracking number you sent for my {p} does not work on the courier website.",
        "I received someone else's package instead of the {p} I ordered.",
        "My {p} has been stuck at the {city} depot for {days} days according to the tracking.",
    ),
    "feature_request": (
        "It would be great if the {p} could {feature}.",
        "Please add an option to {feature} on the {p}.",
        "I would love to be able to {feature} with my {p}.",
        "Have you considered adding a way to {feature} on the {p}?",
        "Feature suggestion for the {p}: let users {feature}.",
        "My only wish for the {p} is the ability to {feature}.",
        "Could a future version of the {p} software let me {feature}?",
        "I would love a setting on the {p} to {feature}.",
    ),
}

# Optional second sentences. They never name a product and never contain another
# category's keywords, so they reinforce the category without adding a conflicting cue.
DETAILS: dict[str, tuple[str, ...]] = {
    "billing": (
        "The order number is {order}.",
        "I have attached a screenshot of my bank statement.",
        "I paid with a credit card ending in {card4}.",
        "The charge is visible on my statement from {month}.",
    ),
    "bug": (
        "I already tried a factory reset and it did not help.",
        "It started right after version {ver} was installed.",
        "It happens on both my home and office network.",
        "The problem is easy to reproduce, it happens every time.",
    ),
    "account": (
        "I have tried three different browsers with the same result.",
        "My username is {user}.",
        "I still receive your newsletter, so the address itself works.",
        "I have not changed anything in my settings recently.",
    ),
    "shipping": (
        "The order number is {order}.",
        "I was home all day and nobody rang the bell.",
        "I chose two-day shipping at checkout.",
        "The parcel was meant to be a birthday present.",
    ),
    "feature_request": (
        "Several competitors already offer this.",
        "It would save me a lot of time every week.",
        "I think many other users would appreciate it too.",
        "Right now I have to use a separate app for this.",
    ),
}

_ACTIONS = (
    "switch between apps", "plug in the charger", "connect to Bluetooth",
    "open the camera", "join a video call", "start a backup",
)
_FEATURES = (
    "export my data to CSV", "schedule a quiet mode at night", "use a dark theme",
    "set custom keyboard shortcuts", "share settings between family members",
    "show the battery level of paired devices", "rename devices from the app",
    "pause all notifications for a day", "choose a custom startup sound",
)
_CITIES = ("Lisbon", "Denver", "Osaka", "Leeds", "Toronto", "Lyon", "Austin", "Gdansk", "Perth")
_MONTHS = ("January", "March", "April", "June", "September", "November")
_NAMES = (
    "Maria", "James", "Aiko", "Omar", "Priya", "Lukas", "Sofia", "Daniel", "Chen", "Fatima",
    "Tom", "Elena", "Kwame", "Ines", "Raj", "Hannah", "Mateo", "Yuki", "Noah", "Amara",
)
_GREETINGS = ("", "", "", "Hi,", "Hello,", "Hi team,", "Good morning,", "Hello support,")
_SIGNOFFS = ("", "", "", "Thanks, {name}.", "Best regards, {name}", "Cheers, {name}", "Thank you, {name}.")

MIN_WORDS, MAX_WORDS = 20, 50


def label_json(category: str, priority: str, product: str) -> str:
    """The output string of a row: compact JSON with a fixed key order.

    Args:
        category: one of :data:`CATEGORIES`.
        priority: one of :data:`PRIORITIES`.
        product: a key of :data:`PRODUCTS`.

    Returns:
        e.g. ``{"category": "bug", "priority": "low", "product": "vela_tablet"}``.
    """
    return json.dumps({"category": category, "priority": priority, "product": product}, separators=(", ", ": "))


def _fill(rng: random.Random, template: str, alias: str) -> str:
    # Every slot is filled even if the template does not use it, so the number of rng draws
    # per ticket does not depend on the template (keeps streams stable when templates change).
    amount = rng.randint(19, 1499) + rng.choice((0.0, 0.99, 0.49))
    slots = {
        "p": alias,
        "amount": f"{amount:.2f}",
        "amount2": f"{amount - rng.randint(5, 60):.2f}",
        "days": rng.randint(3, 14),
        "n": rng.randint(5, 40),
        "code": rng.randint(100, 999),
        "pct": rng.choice((10, 15, 20, 25, 30, 40, 50)),
        "action": rng.choice(_ACTIONS),
        "feature": rng.choice(_FEATURES),
        "city": rng.choice(_CITIES),
        "order": f"#{rng.choice('ABCDEFGH')}{rng.randint(1000000, 9999999)}",
        "card4": f"{rng.randint(0, 9999):04d}",
        "month": rng.choice(_MONTHS),
        "ver": f"{rng.randint(2, 6)}.{rng.randint(0, 9)}.{rng.randint(0, 19)}",
        "user": f"{rng.choice(_NAMES).lower()}{rng.randint(10, 99)}",
        "name": rng.choice(_NAMES),
    }
    return template.format(**slots)


def _after_greeting(sentence: str) -> str:
    first = sentence.split(" ", 1)[0]
    if first in ("I", "URGENT:") or first.startswith("I'"):
        return sentence
    return sentence[0].lower() + sentence[1:]


def _ticket(rng: random.Random) -> dict[str, Any]:
    category = rng.choice(CATEGORIES)
    priority = rng.choices(PRIORITIES, weights=_PRIORITY_WEIGHTS[category])[0]
    product = rng.choice(sorted(PRODUCTS))
    alias = rng.choice(PRODUCTS[product])

    topic = _fill(rng, rng.choice(TOPICS[category]), alias)
    detail = _fill(rng, rng.choice(DETAILS[category]), alias)
    cue = rng.choice(PRIORITY_CUES[priority])
    greeting = rng.choice(_GREETINGS)
    signoff = _fill(rng, rng.choice(_SIGNOFFS), alias)
    with_detail = rng.random() < 0.6
    cue_first = rng.random() < 0.25

    body = [topic, detail] if with_detail else [topic]
    sentences = [cue, *body] if cue_first else [*body, cue]
    if greeting:
        sentences[0] = f"{greeting} {_after_greeting(sentences[0])}"
    text = " ".join(sentences)
    if signoff:
        text = f"{text} {signoff}"
    return {"instruction": INSTRUCTION, "input": text, "output": label_json(category, priority, product)}


def generate(n: int = 1200, seed: int = 0) -> list[dict[str, str]]:
    """Generate `n` distinct support-ticket rows.

    Args:
        n: number of rows.
        seed: seed of the private ``random.Random``; the same (n, seed) gives the same rows.

    Returns:
        Rows ``{"instruction", "input", "output"}`` in generation order. Inputs are unique
        (the validate stage rejects duplicates) and 20-50 words long.

    Raises:
        ValueError: `n` is negative, or larger than the templates can make distinct tickets for.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts, budget = 0, 50 * n + 1000
    while len(rows) < n:
        attempts += 1
        if attempts > budget:
            raise ValueError(f"could only make {len(rows)} distinct tickets out of {n} requested")
        row = _ticket(rng)
        words = len(row["input"].split())
        if not MIN_WORDS <= words <= MAX_WORDS or row["input"] in seen:
            continue
        seen.add(row["input"])
        rows.append(row)
    return rows


def write(path: str | Path, n: int = 1200, seed: int = 0) -> int:
    """Generate rows and write them as JSON lines, atomically.

    Args:
        path: the JSONL file to (over)write.
        n: number of rows.
        seed: generator seed.

    Returns:
        The number of rows written.
    """
    return write_jsonl(Path(path), generate(n, seed))


def broken_lines() -> list[str]:
    """The lines of ``data/examples/broken.jsonl``: one of each kind of defect, plus valid rows.

    Line numbers are part of the contract (tests assert ``file:line`` for each defect):

    ====  =========================================================
    line  content
    ====  =========================================================
    1-2   valid
    3     truncated JSON
    4     missing ``output``
    5     empty ``instruction``
    6     ``output`` is a number
    7     exact duplicate of line 1
    8     overlong (well over 1024 tokens)
    9     control character (BEL, ``\\u0007``) in ``input``
    10    blank (skipped, not a row)
    11    a JSON array, not an object
    12-13 valid
    ====  =========================================================

    Returns:
        The lines, without newlines.
    """
    good = generate(6, seed=7)
    dump = lambda row: json.dumps(row, ensure_ascii=False)  # noqa: E731
    truncated = dump(good[2])[:70]
    missing_output = {k: v for k, v in good[3].items() if k != "output"}
    empty_instruction = {**good[4], "instruction": ""}
    numeric_output = {**good[5], "output": 42}
    overlong = {**good[2], "input": " ".join(["The screen flickers again after every restart."] * 220)}
    control = {**good[3], "input": good[3]["input"].replace(" ", " \u0007", 1)}
    return [
        dump(good[0]),
        dump(good[1]),
        truncated,
        dump(missing_output),
        dump(empty_instruction),
        dump(numeric_output),
        dump(good[0]),
        dump(overlong),
        dump(control),
        "",
        json.dumps(["not", "an", "object"]),
        dump(generate(8, seed=8)[6]),
        dump(generate(8, seed=8)[7]),
    ]


def write_broken(path: str | Path) -> None:
    """Write :func:`broken_lines` to `path`, atomically."""
    write_text(Path(path), "\n".join(broken_lines()) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m phiops.datagen [--n 1200] [--seed 0] [--out ...] [--broken ...]``."""
    ap = argparse.ArgumentParser(prog="python -m phiops.datagen", description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("data/raw/tickets.jsonl"))
    ap.add_argument("--broken", type=Path, default=Path("data/examples/broken.jsonl"),
                    help="where to write the deliberately broken example ('' to skip)")
    args = ap.parse_args(argv)
    print(f"{args.out}: {write(args.out, args.n, args.seed)} rows (seed {args.seed})")
    if str(args.broken):
        write_broken(args.broken)
        print(f"{args.broken}: {len(broken_lines())} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
