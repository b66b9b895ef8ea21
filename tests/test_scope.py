"""Contact scoping rules (scope.py): who counts as a candidate's address."""

from __future__ import annotations

import pytest

from inboxd.scope import contact_set, in_scope, normalize_address


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
