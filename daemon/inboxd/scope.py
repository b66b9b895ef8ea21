"""Which messages inboxd may store: with scope "contacts", only those exchanged with an HR-app contact.

Address matching ignores case and, for Gmail addresses, dots and +tags (Gmail delivers them to the same mailbox).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


def normalize_address(email: str) -> str:
    local, sep, domain = email.strip().lower().rpartition("@")
    if not sep:
        return email.strip().lower()
    if domain in GMAIL_DOMAINS:
        local = local.split("+", 1)[0].replace(".", "")
        domain = "gmail.com"
    return f"{local}@{domain}"


def contact_set(emails: Iterable[str]) -> frozenset[str]:
    return frozenset(normalize_address(e) for e in emails if "@" in e)


@dataclass(frozen=True, slots=True)
class Exclusions:
    """Admin exclusions: addresses ("hr@corp.example") and domains ("@corp.example") that never make a message
    storable, and labels (Gmail labels, folder names elsewhere) whose messages are never stored."""

    addresses: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()

    def excludes_address(self, address: str) -> bool:
        lowered = address.strip().lower()
        return lowered in self.addresses or "@" + lowered.rpartition("@")[2] in self.addresses

    def excludes_labels(self, labels: Iterable[str]) -> bool:
        return bool(self.labels) and not self.labels.isdisjoint(labels)


NO_EXCLUSIONS = Exclusions()


def in_scope(addresses: Iterable[str], contacts: frozenset[str] | None, exclusions: Exclusions = NO_EXCLUSIONS) -> bool:
    """Whether a message with these participants may be stored.

    Scope "all" (contacts is None): yes, unless every participant is excluded (internal mail).
    Scope "contacts": only when a participant that is not excluded is a contact.
    """
    given = list(addresses)
    kept = [a for a in given if not exclusions.excludes_address(a)]
    if contacts is None:
        return bool(kept) or not given
    return any(normalize_address(a) in contacts for a in kept)
