"""A Gmail-dialect IMAP + SMTP server for inboxd's tests: All Mail and label folders with their own UIDs,
X-GM-MSGID/THRID/LABELS, X-GM-RAW, CONDSTORE, IDLE, XOAUTH2, and injectable Gmail failures.

Start it with the ``gmail_server`` fixture (tests/conftest.py), ``gmail.server.GmailServer(...).start()`` or
``cd tests && python -m gmail.server --port N``. Nothing is imported here, so ``-m gmail.server`` runs cleanly.
"""
