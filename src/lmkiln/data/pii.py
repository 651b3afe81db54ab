"""Redaction of personal data: e-mail addresses, phone numbers, IP addresses, payment card numbers
(a card network's prefix and length, and the Luhn check: one random number in ten passes Luhn, so order
numbers need the prefix test too) and US social security numbers, each replaced by a placeholder and
counted by kind."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip": "<IP_ADDRESS>",
    "card": "<CARD_NUMBER>",
    "ssn": "<US_SSN>",
}

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
# Any colon-separated hex run with two or more colons; ipaddress decides whether it is an address
# (so times like 10:30:00 stay).
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# International (+CC ...) or North-American style numbers with separators; bare digit runs are not
# phones, nor are digit groups inside a longer run (a card number that failed the Luhn check).
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b(?![ .-]?\d)"
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network_ok(digits: str) -> bool:
    """Whether a digit string has the prefix (IIN) and length of a major card network."""
    n, p2, p3, p4 = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard
        return n == 16
    if p2 in (34, 37):  # American Express
        return n == 15
    if p4 == 6011 or p2 in (62, 65) or 644 <= p3 <= 649 or 3528 <= p4 <= 3589:  # Discover, UnionPay, JCB
        return 16 <= n <= 19
    if 300 <= p3 <= 305 or p2 in (36, 38, 39):  # Diners Club
        return 14 <= n <= 19
    return (p2 == 50 or 56 <= p2 <= 69) and 12 <= n <= 19  # Maestro


def _card(match: re.Match) -> str | None:
    digits = re.sub(r"\D", "", match.group())
    ok = 13 <= len(digits) <= 19 and card_network_ok(digits) and luhn_ok(digits)
    return PLACEHOLDERS["card"] if ok else None


def _ipv6(match: re.Match) -> str | None:
    try:
        ipaddress.IPv6Address(match.group())
    except ValueError:
        return None
    return PLACEHOLDERS["ip"]


RULES = [  # order matters: cards and SSNs before phone numbers, which would match their digits
    ("email", EMAIL, lambda m: PLACEHOLDERS["email"]),
    ("card", CARD, _card),
    ("ssn", SSN, lambda m: PLACEHOLDERS["ssn"]),
    ("ip", IPV4, lambda m: PLACEHOLDERS["ip"]),
    ("ip", IPV6, _ipv6),
    ("phone", PHONE, lambda m: PLACEHOLDERS["phone"]),
]


def redact(text: str, kinds: set[str] | None = None) -> tuple[str, Counter]:
    """The text with personal data replaced by placeholders, and how many of each kind were found."""
    counts: Counter = Counter()
    for kind, pattern, replace in RULES:
        if kinds is not None and kind not in kinds:
            continue

        def sub(match: re.Match, kind=kind, replace=replace) -> str:
            out = replace(match)
            if out is None:
                return match.group()
            counts[kind] += 1
            return out

        text = pattern.sub(sub, text)
    return text, counts
