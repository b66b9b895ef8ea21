"""B1's floor: the bare imapclient fetch of a whole mailbox, what any Python IMAP sync costs at the least.

Run as its own process (its wall time and peak RSS are measured from outside): STARTTLS, XOAUTH2, then for each
folder SELECT and UID FETCH BODY.PEEK[] in batches of inboxd's batch size; the bytes are counted and dropped.
Prints one JSON line: {"messages": N, "bytes": N, "folders": N}.

imaplib's debug output is off, as inboxd has it (inboxd.imap.connect): IMAPClient sets imaplib's debug level to 5,
and imaplib then repr()s every response line and every FETCH reply before its logger can drop them. Left on, that
formatting is about 70% of this process's CPU and the floor would measure it, not the fetch (20k messages: 12.4 s
with it, 3.9-5.3 s without, on the development machine on 2026-11-26).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys

from imapclient import IMAPClient


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--token-file", required=True, help="an XOAUTH2 access token")
    parser.add_argument("--batch-size", type=int, default=200)
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.ca_file)
    client = IMAPClient(args.host, args.port, ssl=False, timeout=60)
    client._imap.debug = 0  # see the module docstring
    client.starttls(context)
    with open(args.token_file) as token:
        client.oauth2_login(args.user, token.read().strip())
    messages = size = folders = 0
    for _flags, _sep, folder in client.list_folders():
        folders += 1
        client.select_folder(folder, readonly=True)
        uids = client.search(["ALL"])
        for start in range(0, len(uids), args.batch_size):
            fetched = client.fetch(uids[start : start + args.batch_size], [b"BODY.PEEK[]"])
            for data in fetched.values():
                size += len(data[b"BODY[]"])
            messages += len(fetched)
    client.logout()
    json.dump({"messages": messages, "bytes": size, "folders": folders}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
