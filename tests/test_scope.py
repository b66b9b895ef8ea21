"""Contact scoping rules (scope.py): who counts as a candidate's address."""

from __future__ import annotations

import pytest

from inboxd.scope import Exclusions, contact_set, in_scope, normalize_address


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Ana@Example.ORG", "ana@example.org"),
        ("j.o.h.n+jobs@gmail.com", "john@gmail.com"),
        ("John@GoogleMail.com", "john@gmail.com"),
        ("first.last+tag@corp.example", "first.last+tag@corp.example"),  # only Gmail ignores dots and tags
        ("  padded@x.test ", "padded@x.test"),
    ],
)
def test_normalize_address(raw: str, normal: str) -> None:
    assert normalize_address(raw) == normal


def test_scope_all_admits_everything() -> None:
    assert in_scope([], None)
    assert in_scope(["anyone@x.test"], None)


def test_contacts_scope_matches_any_participant_normalized() -> None:
    contacts = contact_set(["John.Doe@gmail.com", "ana@example.org", "not-an-address"])
    assert in_scope(["recruiter@corp.test", "johndoe+cv@googlemail.com"], contacts)
    assert in_scope(["ANA@example.org"], contacts)
    assert not in_scope(["recruiter@corp.test", "news@example.org"], contacts)
    assert not in_scope([], contacts)


def test_excluded_addresses_never_make_a_message_storable() -> None:
    exclusions = Exclusions(addresses=frozenset({"@corp.example", "ceo@partner.example"}))
    contacts = contact_set(["colleague@corp.example", "ana@example.org", "ceo@partner.example"])
    # an employee who is also in mail_contacts does not pull internal mail in
    assert not in_scope(["rec@corp.example", "colleague@corp.example"], contacts, exclusions)
    assert not in_scope(["CEO@partner.example"], contacts, exclusions)
    assert in_scope(["rec@corp.example", "ana@example.org"], contacts, exclusions)
    # scope "all": internal-only mail is excluded, anything with an outside party is kept
    assert not in_scope(["rec@corp.example", "x@corp.example"], None, exclusions)
    assert in_scope(["rec@corp.example", "someone@else.example"], None, exclusions)


def test_excluded_labels() -> None:
    exclusions = Exclusions(labels=frozenset({"Private"}))
    assert exclusions.excludes_labels(["INBOX", "Private"])
    assert not exclusions.excludes_labels(["INBOX"])
    assert not Exclusions().excludes_labels(["Private"])
