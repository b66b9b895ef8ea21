"""Which messages inboxd may store: with scope "contacts", only those exchanged with an HR-app contact.

Address matching ignores case and, for Gmail addresses, dots and +tags (Gmail delivers them to the same mailbox).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def in_scope(addresses: Iterable[str], contacts: frozenset[str] | None) -> bool:
    """True when scope is "all" (contacts is None) or any participant address is a contact's."""
    if contacts is None:
        return True
    return any(normalize_address(a) in contacts for a in addresses)
