"""PII scrubbing: find personal identifiers and replace them with fixed placeholders.

Kinds: email addresses, public IPv4/IPv6 addresses, phone numbers (international
"+CC ..." / "00CC ..." forms and North-American "(555) 123-4567" forms), credit-card
numbers (issuer prefix + length + Luhn checksum), US social security numbers
(AAA-GG-SSSS with the SSA's never-issued ranges excluded).

Precision matters as much as recall: scrubbing every long number would destroy dates,
prices, ISBNs and tables. So each pattern demands the separators or structure of its
kind, candidates are validated (Luhn, `ipaddress`), and private/reserved IPs, which
identify nobody, are left alone (as BigScience's and StarCoder's pipelines do).
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
    "credit_card": "<CREDIT_CARD>",
    "ssn": "<SSN>",
}

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\d)")
# Candidate IPv6: hex groups with colons (at least two), validated by ipaddress below.
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
SSN = re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
# Cards: 13-19 digits, in groups of 4 (4-6-5 for Amex) separated by one space or dash, or
# contiguous. Validated by issuer prefix and Luhn below.
CARD = re.compile(r"(?<![\w-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -]?)\d{6}\2\d{5})(?![\w-])")
# Phones. International: "+" or "00", a country code, an optional area code in
# parentheses, then at least two digit groups each after a space, dot or dash; or E.164
# written without separators. Requiring separators keeps "+48.856613" (a coordinate)
# and other signed decimals out.
PHONE_INTL = re.compile(r"(?<![\w+])(?:(?:\+|00)[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]\d{1,8}){2,6}"
                        r"|\+[1-9]\d{7,14})(?![\w-])")
# North American: (AAA) BBB-CCCC, AAA-BBB-CCCC, AAA.BBB.CCCC, AAA BBB CCCC; one separator style.
PHONE_NANP = re.compile(r"(?<![\w-])(?:\([2-9]\d{2}\) ?|[2-9]\d{2}(?P<sep>[-. ]))[2-9]\d{2}(?(sep)(?P=sep)|[-. ])\d{4}(?![\w-])")


_ANY_DIGIT = re.compile(r"\d")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_issuer_ok(digits: str) -> bool:
    n = len(digits)
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    two, four = int(digits[:2]), int(digits[:4])
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16  # Mastercard
    if two in (34, 37):
        return n == 15  # American Express
    if digits.startswith("6011") or two == 65 or 644 <= int(digits[:3]) <= 649:
        return 16 <= n <= 19  # Discover
    if 3528 <= four <= 3589:
        return 16 <= n <= 19  # JCB
    if two in (36, 38, 39) or 300 <= int(digits[:3]) <= 305:
        return 14 <= n <= 19  # Diners Club
    return False


def _is_card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 13 <= len(digits) <= 19 and _card_issuer_ok(digits) and luhn_ok(digits)


# "Section 2.1.3.4" and "version 1.2.3.4" are numbering, not hosts.
_NUMBERING_BEFORE = re.compile(r"(?<!\w)(?:section|sections|version|ver\.?|v|chapter|ch\.|clause|rule|step|table|figure|fig\.|§)\s*$",
                               re.IGNORECASE)


def _is_public_ip(match: re.Match) -> bool:
    try:
        ip = ipaddress.ip_address(match.group(0))
    except ValueError:
        return False
    if _NUMBERING_BEFORE.search(match.string, max(0, match.start() - 12), match.start()):
        return False
    return ip.is_global and not ip.is_multicast


def _is_phone(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 8 <= len(digits) <= 15


# Order matters: cards and SSNs before phones (their digit runs would look like phones),
# emails before IPs (an address may hold an IP-literal domain).
_DETECTORS = (
    ("email", EMAIL, None),
    ("credit_card", CARD, _is_card),
    ("ssn", SSN, None),
    ("ip_address", IPV4, _is_public_ip),
    ("ip_address", IPV6, _is_public_ip),
    ("phone", PHONE_INTL, _is_phone),
    ("phone", PHONE_NANP, None),
)


def scrub(text: str, kinds=tuple(PLACEHOLDERS)) -> tuple[str, Counter]:
    """Replace every PII match of the given kinds; returns (new text, Counter of kinds)."""
    counts: Counter = Counter()
    has_digit = _ANY_DIGIT.search(text) is not None
    for kind, pattern, validate in _DETECTORS:
        if kind not in kinds or (kind != "email" and not has_digit):
            continue

        def replace(m: re.Match, kind=kind, validate=validate) -> str:
            if validate is not None and not validate(m):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        if kind == "email" and "@" not in text:
            continue
        text = pattern.sub(replace, text)
    return text, counts
