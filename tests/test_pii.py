"""PII scrubbing (data.pii): every kind is found, replaced by its placeholder and counted,
and the numbers that only look like PII (dates, prices, ISBNs, versions, private IPs,
citations) are left exactly as they were.
"""
from __future__ import annotations

import os
import sys
from collections import Counter

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from data import pii  # noqa: E402
from data.pii import PLACEHOLDERS, luhn_ok, scrub  # noqa: E402


def assert_scrubbed(value: str, kind: str, before: str = "Contact: ", after: str = " today.") -> None:
    text = before + value + after
    out, counts = scrub(text)
    assert out == before + PLACEHOLDERS[kind] + after, (value, out)
    assert counts == Counter({kind: 1}), (value, counts)


def assert_untouched(text: str) -> None:
    out, counts = scrub(text)
    assert out == text
    assert counts == Counter()
    assert not counts  # counts empty


def test_placeholders_cover_every_kind():
    assert PLACEHOLDERS == {
        "email": "<EMAIL>",
        "ip_address": "<IP_ADDRESS>",
        "phone": "<PHONE>",
        "credit_card": "<CREDIT_CARD>",
        "ssn": "<SSN>",
    }


# ----------------------------------------------------------------------------- true positives

@pytest.mark.parametrize("email", [
    "jane.doe@example.com",
    "j.smith+newsletter@mail.example.co.uk",
    "first_last-99@sub-domain.example.org",
    "ADMIN@EXAMPLE.COM",
])
def test_email(email):
    assert_scrubbed(email, "email")


def test_email_at_sentence_end_keeps_the_period():
    out, counts = scrub("Write to jane.doe@example.com.")
    assert out == "Write to <EMAIL>."
    assert counts == Counter(email=1)


@pytest.mark.parametrize("ip", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "151.101.1.69"])
def test_public_ipv4(ip):
    assert_scrubbed(ip, "ip_address", before="Server at ", after=" responded.")


@pytest.mark.parametrize("before", ["server ", "host:", "observer ", "(", "IP "])
def test_public_ipv4_after_words_that_end_like_numbering_words(before):
    # the "section 2.1.3.4" exclusion must look at whole words only ("server" ends in "ver")
    assert_scrubbed("8.8.8.8", "ip_address", before=before, after=" is up.")


@pytest.mark.parametrize("ip", ["2001:4860:4860::8888", "2606:4700:4700::1111",
                                "2a00:1450:4001:82b::200e", "2001:4860:4860:0:0:0:0:8844"])
def test_public_ipv6(ip):
    assert_scrubbed(ip, "ip_address", before="Server at ", after=" responded.")


PHONES = [
    "+1 415 555 2671",
    "+44 20 7946 0958",
    "+33 1 23 45 67 89",
    "0049 30 1234567",
    "(415) 555-2671",
    "415-555-2671",
    "415.555.2671",
]


@pytest.mark.parametrize("phone", PHONES)
def test_phone(phone):
    assert_scrubbed(phone, "phone", before="Call ", after=" now.")


@pytest.mark.parametrize("phone", PHONES[:6])
def test_phone_in_parentheses_keeps_the_closing_parenthesis(phone):
    # "Call us (+44 20 7946 0958)." must become "Call us (<PHONE>).": the ")" is not
    # part of the number, and eating it leaves the sentence unbalanced
    assert_scrubbed(phone, "phone", before="Call us (", after=").")


@pytest.mark.parametrize("phone", ["+44 20 7946 0958", "(415) 555-2671", "415.555.2671"])
@pytest.mark.parametrize("before, after", [("Tel. ", "."), ('"', '",'), ("[", "];"), ("", "")])
def test_phone_punctuation_around_it_is_kept(phone, before, after):
    assert_scrubbed(phone, "phone", before=before, after=after)


VALID_CARDS = [
    # Visa
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "4012888888881881",
    # Mastercard
    "5555 5555 5555 4444", "5555-5555-5555-4444", "5555555555554444", "5105105105105100",
    "2223 0031 2200 3222",
    # American Express (4-6-5 grouping)
    "3782 822463 10005", "3782-822463-10005", "378282246310005", "371449635398431",
]


@pytest.mark.parametrize("card", VALID_CARDS)
def test_credit_card(card):
    assert luhn_ok(card.replace(" ", "").replace("-", ""))  # the fixture itself is valid
    assert_scrubbed(card, "credit_card", before="Card: ", after=" (exp 12/27).")


@pytest.mark.parametrize("ssn", ["123-45-6789", "078-05-1120", "899-99-9999"])
def test_ssn(ssn):
    assert_scrubbed(ssn, "ssn", before="SSN ", after=".")


# ----------------------------------------------------------------------------- false positives

FALSE_POSITIVES = {
    "no issuer prefix": "Order number 1234567890123456 was shipped.",
    "no issuer, Luhn-valid": "Order number 1234567890123452 was shipped.",
    "nine digits": "Reference 123456789 on the invoice.",
    "iso date": "Published on 2023-01-15 in the journal.",
    "us date": "Due by 01/15/2023 at the latest.",
    "dotted date": "Am 12.03.2024 beginnt der Kurs.",
    "isbn-13 dashed": "ISBN 978-3-16-148410-0 in the catalogue.",
    "isbn-10 dashed": "ISBN 0-306-40615-2 in the catalogue.",
    "isbn-13 plain": "ISBN 9783161484100 in the catalogue.",
    "price dollars": "It costs $1,234.56 before tax.",
    "price euros": "Nur \u20ac99.99 im Angebot.",
    "big number": "About 1,000,000 people attended.",
    "private ipv4 192": "The router is at 192.168.1.1 by default.",
    "private ipv4 10": "The gateway is 10.0.0.1 on the lab network.",
    "private ipv4 172": "The host 172.16.0.1 is internal.",
    "loopback ipv4": "Serve it on 127.0.0.1 for testing.",
    "loopback ipv6": "Bind to ::1 for local tests.",
    "link-local ipv6": "The interface address is fe80::1 on eth0.",
    "documentation ipv4": "The example uses 192.0.2.44 as an address.",
    "time": "The train leaves at 12:30:45 sharp.",
    "version": "Upgrade to Python 3.11.7 first.",
    "luhn-invalid card": "Card 4111 1111 1111 1112 was declined.",
    "ssn area 000": "Invalid number 000-12-3456 in the form.",
    "ssn area 666": "Invalid number 666-12-3456 in the form.",
    "ssn group 00": "Invalid number 123-00-4567 in the form.",
    "ssn serial 0000": "Invalid number 123-45-0000 in the form.",
    "shakespeare citation": "As Hamlet 3.1.56 has it: to be, or not to be.",
    "act scene line": "See Macbeth 5.5.19-28 and King Lear 4.6.1.",
    "short phone-like": "Dial 555-1234 from inside the building.",
    "score": "The final score was 3-2 after extra time.",
    "year range": "The war lasted from 1939-1945.",
    "no digits no at": "A plain sentence without anything personal in it.",
    "section numbering": "See section 2.1.3.4 of the standard.",
    "version numbering": "Released as version 8.8.8.8 last week.",
    "coordinates": "The point lies at +48.856613, +2.352222 on the map.",
    "signed decimal": "It moved by +1234.5678 units.",
}


@pytest.mark.parametrize("text", list(FALSE_POSITIVES.values()), ids=list(FALSE_POSITIVES))
def test_false_positives_left_alone(text):
    assert_untouched(text)


def test_false_positive_fixtures_are_meaningful():
    # the Luhn-valid "order number" would pass the checksum: it is the issuer rule that saves it
    assert luhn_ok("1234567890123452")
    assert not luhn_ok("1234567890123456")
    assert not luhn_ok("4111111111111112")


def test_private_ip_next_to_public_ip():
    out, counts = scrub("From 10.0.0.1 to 8.8.8.8 and back to 192.168.1.1.")
    assert out == "From 10.0.0.1 to <IP_ADDRESS> and back to 192.168.1.1."
    assert counts == Counter(ip_address=1)


# ----------------------------------------------------------------------------- luhn

@pytest.mark.parametrize("digits, ok", [
    ("79927398713", True),
    ("79927398710", False),
    ("4111111111111111", True),
    ("4111111111111112", False),
    ("378282246310005", True),
    ("5555555555554444", True),
    ("6011111111111117", True),
    ("0", True),
    ("18", True),
    ("10", False),
])
def test_luhn_ok(digits, ok):
    assert luhn_ok(digits) is ok


def test_luhn_catches_every_single_digit_error():
    good = "4012888888881881"
    assert luhn_ok(good)
    for i in range(len(good)):
        for d in "0123456789":
            if d != good[i]:
                assert not luhn_ok(good[:i] + d + good[i + 1:]), (i, d)


# ----------------------------------------------------------------------------- paragraphs, kinds

PARAGRAPH = (
    "Dear team,\n"
    "please send the contract to jane.doe@example.com and copy j.smith@corp.example.org. "
    "Jane can be reached at +44 20 7946 0958 or (415) 555-2671, and the office line is "
    "415-555-2671. Her card 4111 1111 1111 1111 was charged on 2023-01-15 for $1,234.56, "
    "and the refund goes to 5555-5555-5555-4444. Her SSN is 123-45-6789. The VPN endpoint "
    "is 8.8.8.8 (not 192.168.1.1) and the backup host is 2001:4860:4860::8888. "
    "Quote from Hamlet 3.1.56 in version 3.11.7 of the handbook.\n"
)


def test_paragraph_counts_by_kind():
    out, counts = scrub(PARAGRAPH)
    assert counts == Counter(email=2, phone=3, credit_card=2, ssn=1, ip_address=2)
    assert out == (
        "Dear team,\n"
        "please send the contract to <EMAIL> and copy <EMAIL>. "
        "Jane can be reached at <PHONE> or <PHONE>, and the office line is "
        "<PHONE>. Her card <CREDIT_CARD> was charged on 2023-01-15 for $1,234.56, "
        "and the refund goes to <CREDIT_CARD>. Her SSN is <SSN>. The VPN endpoint "
        "is <IP_ADDRESS> (not 192.168.1.1) and the backup host is <IP_ADDRESS>. "
        "Quote from Hamlet 3.1.56 in version 3.11.7 of the handbook.\n"
    )
    for value in ("jane.doe", "7946", "2671", "4111", "4444", "6789", "8.8.8.8", "8888"):
        assert value not in out


def test_scrub_is_idempotent():
    once, _ = scrub(PARAGRAPH)
    twice, counts = scrub(once)
    assert twice == once
    assert counts == Counter()


@pytest.mark.parametrize("kind", list(PLACEHOLDERS))
def test_kinds_restricts_to_one_kind(kind):
    full_out, full_counts = scrub(PARAGRAPH)
    out, counts = scrub(PARAGRAPH, kinds=(kind,))
    assert counts == Counter({kind: full_counts[kind]})
    assert out.count(PLACEHOLDERS[kind]) == full_counts[kind]
    for other, placeholder in PLACEHOLDERS.items():
        if other != kind:
            assert placeholder not in out


def test_kinds_subset_and_empty():
    out, counts = scrub(PARAGRAPH, kinds=("email", "ssn"))
    assert counts == Counter(email=2, ssn=1)
    assert "4111 1111 1111 1111" in out and "+44 20 7946 0958" in out and "8.8.8.8" in out
    assert "jane.doe@example.com" not in out and "123-45-6789" not in out
    assert scrub(PARAGRAPH, kinds=()) == (PARAGRAPH, Counter())
    # a list works as well as a tuple (PrepareConfig.pii_kinds is a list)
    assert scrub(PARAGRAPH, kinds=["ssn"])[1] == Counter(ssn=1)


def test_cards_are_not_counted_as_phones():
    # card digit groups look like phone numbers; each card is counted once, as a card
    out, counts = scrub("Cards 5555 5555 5555 4444 and 4012888888881881 on file.")
    assert out == "Cards <CREDIT_CARD> and <CREDIT_CARD> on file."
    assert counts == Counter(credit_card=2)
