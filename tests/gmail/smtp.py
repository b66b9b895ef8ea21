"""The Gmail test server's SMTP submission side: EHLO, STARTTLS, AUTH XOAUTH2/PLAIN, MAIL/RCPT/DATA, with Gmail's
reply lines. Accepted mail is filed by the server (``GmailServer.file_sent``): \\Sent for the sender, INBOX for
local recipients, as Gmail does by itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import secrets
import time
from typing import TYPE_CHECKING

from gmail.imap import XOAUTH2_ERROR, parse_xoauth2

if TYPE_CHECKING:
    from gmail.server import GmailServer

MAX_RECIPIENTS = 100
SIZE_LIMIT = 35882577


class SmtpSession:
    def __init__(self, server: GmailServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tls = False
        self.user: str | None = None
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.id = secrets.token_hex(8)

    def suffix(self) -> str:
        return f"{self.id} - gsmtp"

    async def reply(self, *lines: str) -> None:
        self.writer.write("".join(line + "\r\n" for line in lines).encode())
        await self.writer.drain()

    async def run(self) -> None:
        try:
            await self.reply(f"220 smtp.gmail.com ESMTP {self.suffix()}")
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                verb, _, arg = line.decode("utf-8", "replace").strip().partition(" ")
                handler = getattr(self, "cmd_" + verb.lower(), None)
                if handler is None:
                    await self.reply(f"502 5.5.1 Unrecognized command. {self.suffix()}")
                    continue
                if await handler(arg.strip()) is False:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 1)

    async def cmd_ehlo(self, arg: str) -> None:
        self.mail_from, self.rcpts = None, []
        lines = ["smtp.gmail.com at your service, [127.0.0.1]", f"SIZE {SIZE_LIMIT}", "8BITMIME"]
        if self.server.tls_context is not None and not self.tls:
            lines.append("STARTTLS")
        # Gmail also offers LOGIN PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH and CHUNKING: not implemented here
        lines += ["AUTH PLAIN XOAUTH2", "ENHANCEDSTATUSCODES", "PIPELINING", "SMTPUTF8"]
        await self.reply(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")

    async def cmd_helo(self, arg: str) -> None:
        await self.reply("250 smtp.gmail.com at your service")

    async def cmd_starttls(self, arg: str) -> None:
        if self.server.tls_context is None or self.tls:
            await self.reply(f"502 5.5.1 Unrecognized command. {self.suffix()}")
            return
        await self.reply("220 2.0.0 Ready to start TLS")
        await self.writer.start_tls(self.server.tls_context)
        self.tls = True
        self.user, self.mail_from, self.rcpts = None, None, []

    async def cmd_auth(self, arg: str) -> None:
        if self.user:
            await self.reply(f"503 5.5.1 Already authenticated. {self.suffix()}")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in ("XOAUTH2", "PLAIN"):
            await self.reply(f"504 5.7.4 Unrecognized Authentication Type. {self.suffix()}")
            return
        if not initial:
            await self.reply("334 ")
            initial = (await self.reader.readline()).decode().strip()
        try:
            decoded = base64.b64decode(initial, validate=True)
        except binascii.Error:
            await self.reply(f"501 5.5.2 Cannot Decode response. {self.suffix()}")
            return
        if mechanism == "PLAIN":
            _, user, password = ([*decoded.decode("utf-8", "replace").split("\x00"), "", "", ""])[:3]
            ok = self.server.passwords.get(user.lower()) == password
        else:
            user, token = parse_xoauth2(decoded)
            loop = asyncio.get_running_loop()
            ok = bool(user) and await loop.run_in_executor(None, self.server.check_token, user, token)
            if not ok:
                await self.reply("334 " + XOAUTH2_ERROR.decode())
                await self.reader.readline()
        if not ok:
            await self.reply(
                "535-5.7.8 Username and Password not accepted. For more information, go to",
                f"535 5.7.8  https://support.google.com/mail/?p=BadCredentials {self.suffix()}",
            )
            return
        self.user = user.lower()
        await self.reply("235 2.7.0 Accepted")

    async def cmd_mail(self, arg: str) -> bool | None:
        if self.user is None:
            await self.reply(
                "530-5.7.0 Authentication Required. For more information, go to",
                f"530 5.7.0  https://support.google.com/mail/?p=WantAuthError {self.suffix()}",
            )
            return None
        if self.server.faults.take_count("temp_fail"):
            await self.reply(f"421 4.7.0 Try again later, closing connection. (MAIL) {self.suffix()}")
            return False
        if self.server.faults.has(self.server.faults.daily_limit, self.user):
            await self.reply(
                "550-5.4.5 Daily user sending limit exceeded. For more information on Gmail",
                "550-5.4.5 sending limits go to",
                f"550 5.4.5  https://support.google.com/a/answer/166852 {self.suffix()}",
            )
            return None
        match = re.match(r"FROM:\s*<([^>]*)>", arg, re.IGNORECASE)
        if not match:
            await self.reply(f"555 5.5.2 Syntax error. {self.suffix()}")
            return None
        self.mail_from, self.rcpts = match.group(1), []
        await self.reply(f"250 2.1.0 OK {self.suffix()}")
        return None

    async def cmd_rcpt(self, arg: str) -> None:
        match = re.match(r"TO:\s*<([^>]+)>", arg, re.IGNORECASE)
        if self.mail_from is None:
            await self.reply(f"503 5.5.1 MAIL first. {self.suffix()}")
        elif not match:
            await self.reply(f"555 5.5.2 Syntax error. {self.suffix()}")
        elif len(self.rcpts) >= MAX_RECIPIENTS:
            await self.reply(f"452 4.5.3 Your message has too many recipients. {self.suffix()}")
        else:
            self.rcpts.append(match.group(1).strip().lower())
            await self.reply(f"250 2.1.5 OK {self.suffix()}")

    async def cmd_data(self, arg: str) -> bool | None:
        if not self.rcpts or self.user is None:
            await self.reply(f"503 5.5.1 RCPT first. {self.suffix()}")
            return None
        await self.reply(f"354  Go ahead {self.suffix()}")
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                return False
            if line in (b".\r\n", b".\n"):
                break
            lines.append(line[1:] if line.startswith(b".") else line)
        self.server.file_sent(self.user, b"".join(lines), self.rcpts)
        self.mail_from, self.rcpts = None, []
        if self.server.faults.take_count("drop_after_data"):
            return False  # filed, but the client never hears so: it must not resend blindly
        await self.reply(f"250 2.0.0 OK  {int(time.time())} {self.suffix()}")
        return None

    async def cmd_rset(self, arg: str) -> None:
        self.mail_from, self.rcpts = None, []
        await self.reply(f"250 2.1.5 Flushed {self.suffix()}")

    async def cmd_noop(self, arg: str) -> None:
        await self.reply(f"250 2.0.0 OK {self.suffix()}")

    async def cmd_quit(self, arg: str) -> bool:
        await self.reply(f"221 2.0.0 closing connection {self.suffix()}")
        return False
