"""TLS is verified on every IMAP connection: a server whose certificate no trusted CA signed is refused, over
STARTTLS and implicit TLS alike, and `ca_file` only adds a CA (it never turns verification off)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import MailStack, make_message
from inboxd.errors import AccountFailed
from inboxd.imap import ImapEndpoint, connect

pytestmark = pytest.mark.mailstack


def other_ca(path: Path) -> Path:
    """A CA that signed nothing the stack serves."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the stack's CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("tls", ["starttls", "tls"])
@pytest.mark.parametrize("trusted", ["system CAs only", "another CA"])
def test_an_untrusted_server_certificate_is_refused(
    mailstack: MailStack, tmp_path: Path, tls: str, trusted: str
) -> None:
    user = mailstack.new_user("tls")
    port = mailstack.imap_port if tls == "starttls" else mailstack.imaps_port
    ca_file = other_ca(tmp_path / "other-ca.pem") if trusted == "another CA" else None
    endpoint = ImapEndpoint(host=mailstack.host, port=port, tls=tls, ca_file=ca_file, timeout=10)
    token = mailstack.access_token(user)
    with pytest.raises(AccountFailed, match="CERTIFICATE_VERIFY_FAILED"):
        connect(endpoint, username=user, access_token=lambda: token)


def test_the_stack_ca_makes_the_same_server_trusted(mailstack: MailStack) -> None:
    user = mailstack.new_user("tls")
    endpoint = ImapEndpoint(host=mailstack.host, port=mailstack.imap_port, tls="starttls", ca_file=mailstack.ca_cert)
    token = mailstack.access_token(user)
    session = connect(endpoint, username=user, access_token=lambda: token)
    session.close()


def test_no_fetched_mail_or_token_is_formatted_for_imaplibs_debug_log(
    mailstack: MailStack, caplog: pytest.LogCaptureFixture
) -> None:
    """IMAPClient turns imaplib's debug output on and routes it to the "imapclient.imaplib" logger; imaplib formats
    every line (bodies, the XOAUTH2 exchange) with %r before any logger can drop it. connect() turns it off: nothing
    reaches that logger even at DEBUG, so no mail or token is there to leak, and no CPU goes into formatting it."""
    user = mailstack.new_user("debuglog")
    mailstack.deliver(user, make_message("cand@example.org", user, "secret-looking subject", "body-marker-6731"))
    endpoint = ImapEndpoint(host=mailstack.host, port=mailstack.imap_port, tls="starttls", ca_file=mailstack.ca_cert)
    token = mailstack.access_token(user)
    with caplog.at_level(logging.DEBUG, logger="imapclient"):
        session = connect(endpoint, username=user, access_token=lambda: token)
        try:
            session.select("INBOX")
            bodies = session.fetch_bodies([1])
        finally:
            session.close()
    assert any(b"body-marker-6731" in body for body in bodies.values())
    imaplib_lines = [r.getMessage() for r in caplog.records if r.name == "imapclient.imaplib"]
    assert imaplib_lines == []
    assert not any("body-marker-6731" in r.getMessage() or token in r.getMessage() for r in caplog.records)
