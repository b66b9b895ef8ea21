"""Push: one IMAP IDLE connection per account on the folder where new mail appears first (INBOX; All Mail on
Gmail), telling the daemon "this account changed" within a second of the server's notice.

IDLE covers one folder. On Gmail that is All Mail, which holds sent mail too; elsewhere a reply the recruiter sends
from another client (Outlook, Thunderbird, a phone) lands in the Sent folder, and a server-side rule can file a
candidate's mail straight into a folder of its own, neither of which IDLE on INBOX reports. So between IDLE slices,
every POLL_OTHERS seconds, the watcher leaves IDLE for a STATUS of the other synced folders and signals when one
changed: the folder(s) marked \\Sent every time, the rest POLL_BUDGET at a time in turns (``polled_folders``), and
every LIST_EVERY polls a LIST, so that a folder created meanwhile is synced too. A candidate's thread shows such
mail within about half a minute, or ceil(N / POLL_BUDGET) polls for N other folders (200: 10 minutes), not at the
next full cycle (sync.interval). Each (re)connection takes one STATUS of every such folder as the baseline.

IDLE is re-issued at most every IDLE_RENEW (Gmail and RFC 2177 drop idle sessions after ~10-29 min); a lost
connection is reopened with capped exponential backoff. The watcher only signals; the sync engine does the work.

A server without IDLE (no IDLE capability) is polled on the same connection instead: a NOOP of the folder every
POLL_OTHERS seconds, whose untagged responses (EXISTS, EXPUNGE, VANISHED, FETCH) tell what changed, beside the
STATUS of the other folders as above. That is logged once per watcher (``idle.unsupported``); sending IDLE anyway
would fail, and the watcher would reconnect, STATUS every folder and catch up, every few seconds to minutes. A
server that offers IDLE but answers it NO or BAD (a mailbox or an account where it is turned off) is polled the same
way from then on, by this watcher.
"""

from __future__ import annotations

import bisect
import contextlib
import random
import select
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from inboxd.clock import Clock
from inboxd.dialect import GenericImap
from inboxd.errors import InboxdError, RetryLater, SessionExpired
from inboxd.gmail import Gmail
from inboxd.imap import ImapClientSession, ImapSession, is_refusal

log = structlog.get_logger(__name__)

IDLE_RENEW = 9 * 60.0  # seconds; under the ~10 min after which servers may end an idle session
# seconds per idle_check: long, so 200 idle accounts do not wake 200 times a second (a stop request shuts the
# socket down, which ends the wait at once; a dropped connection ends it too)
CHECK_SLICE = 30.0
CHANGE_RESPONSES = (b"EXISTS", b"EXPUNGE", b"FETCH", b"VANISHED")
# seconds between STATUS checks of the folders IDLE does not cover (outside Gmail)
POLL_OTHERS = CHECK_SLICE
# folders besides Sent checked per poll: a mailbox of 200 folders costs 11 STATUS commands every 30 s, not 200,
# and each folder is checked every 10 minutes
POLL_BUDGET = 10
# polls between LISTs of the folders (about 5 minutes): one created meanwhile (a new rule's target) is found
LIST_EVERY = 10
# the peer closed or reset the connection (POLLRDHUP: it shut down its side, Linux)
HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def backoff(failures: int, *, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter (pure): the wait before reconnect number `failures`."""
    ceiling = min(cap, base * 2 ** min(max(failures - 1, 0), 30))  # exponent capped: no overflow
    return (rng or random.Random()).uniform(ceiling / 2, ceiling)


def is_bye(responses: list[tuple[object, ...]]) -> bool:
    """The server ended the session while we idled (Gmail: `* BYE Session expired`)."""
    return any(len(r) > 0 and r[0] == b"BYE" for r in responses)


def peer_closed(sock: socket.socket) -> bool:
    """Whether the server closed or reset the connection. imapclient's idle_check() returns [] for a closed
    socket, as for a quiet one: without this check a dropped IDLE connection looks idle until the renewal."""
    poller = select.poll()
    poller.register(sock.fileno(), HANGUP)
    return bool(poller.poll(0))


def pending_change(pending: dict[str, list[Any]], exists: int | None) -> tuple[bool, int | None]:
    """Whether the server reported a change of the selected folder while the watcher was out of IDLE (between DONE
    and the next IDLE, in a STATUS's untagged responses), and the folder's message count as last reported. imaplib
    keeps those responses until some command asks for them, which none does here: they are taken out, so that they
    neither pile up for days nor count twice. An EXISTS that repeats the known count is no news (nor is RECENT)."""
    found = False
    for kind in ("EXPUNGE", "VANISHED"):  # the count went down by an unknown amount: any EXISTS is news after this
        if pending.pop(kind, None):
            found, exists = True, None
    found = bool(pending.pop("FETCH", None)) or found
    pending.pop("RECENT", None)
    for value in pending.pop("EXISTS", None) or []:  # imaplib keeps b"12" for "* 12 EXISTS"
        try:
            count = int(value)
        except (TypeError, ValueError):
            found = True  # unreadable: rather a sync too many
            continue
        found = found or count != exists
        exists = count
    return found, exists


def polled_folders(
    always: Sequence[str], rotating: Sequence[str], after: str | None, budget: int = POLL_BUDGET
) -> list[str]:
    """The folders to STATUS at the next poll (pure): ``always`` (Sent) every time, and at most ``budget`` of
    ``rotating`` (sorted) taking turns: those after ``after`` (the last one polled before), wrapping round. Going by
    name, not by position, a folder added or removed by a LIST does not make any other wait longer: each is checked
    at least every ceil(len(rotating) / budget) polls (one more across such a change)."""
    if len(rotating) <= budget:
        return [*always, *rotating]
    start = bisect.bisect_right(rotating, after) % len(rotating) if after is not None else 0
    window = [*rotating[start : start + budget], *rotating[: max(0, start + budget - len(rotating))]]
    return [*always, *window]


def read_ahead(client: IMAPClient) -> bool:
    """Whether bytes of the server's next response already sit in imaplib's buffered reader or the TLS layer. imaplib
    reads the socket in blocks: "+ idling" and an "* 12 EXISTS" sent right after it (mail that came while the
    watcher was out of IDLE) can arrive in one read, and idle_check, which waits on the socket itself, would then
    sleep through the EXISTS until the next renewal. Checked with the socket non-blocking: never waits."""
    imap = client._imap
    sock = imap.sock
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    own_buffer = getattr(imap, "_readbuf", None)  # imaplib of Python 3.14 buffers reads itself (IMAP4.file unused)
    if own_buffer is not None:
        return bool(own_buffer)
    saved = sock.gettimeout()
    sock.setblocking(False)
    try:
        return bool(imap.file.peek(1))  # what is buffered; else one read that finds nothing, or raises
    except (OSError, ValueError):
        return False
    finally:
        sock.settimeout(saved)


def response_name(response: tuple[object, ...]) -> object:
    """The name of an untagged response as imapclient parses it: `* 12 EXISTS` is (12, b"EXISTS"), the message
    number first, but `* VANISHED 5` (RFC 7162, QRESYNC: UIDs after the name) is (b"VANISHED", 5)."""
    if len(response) > 1 and isinstance(response[0], int):
        return response[1]
    return response[0] if response else None


def is_change(responses: list[tuple[object, ...]]) -> bool:
    """Whether untagged responses seen while idling mean the mailbox changed."""
    return any(response_name(r) in CHANGE_RESPONSES for r in responses)


_UNSEEN = object()  # no STATUS of the folder yet


@dataclass
class _Others:
    """The synced folders a watcher polls (outside Gmail), and what their last STATUS said."""

    always: list[str]  # Sent (marked \Sent): polled every time
    rotating: list[str]  # the rest, sorted, POLL_BUDGET per poll
    seen: dict[str, object] = field(default_factory=dict)  # the last STATUS each answered (not refusals)
    turn: int = 0  # polls so far
    after: str | None = None  # the last of ``rotating`` polled: the next poll goes on from there

    @property
    def names(self) -> list[str]:
        return [*self.always, *self.rotating]

    def same_folders(self, other: _Others) -> bool:
        return (self.always, self.rotating) == (other.always, other.rotating)


class IdleWatcher:
    """A daemon thread per account: IDLE (or a NOOP poll where the server has no IDLE), and call `on_change()` when
    the server says the folder changed."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], ImapSession],
        on_change: Callable[[], None],
        *,
        clock: Clock,
        poll_others: float = POLL_OTHERS,
        poll_budget: int = POLL_BUDGET,
        list_every: int = LIST_EVERY,
    ) -> None:
        self._name = name
        self._poll_others = poll_others
        self._poll_budget = poll_budget
        self._list_every = list_every
        self._connect = connect
        self._on_change = on_change
        self._clock = clock
        self._stop = threading.Event()
        self._socket: socket.socket | None = None  # of the IDLE connection, shut down by request_stop()
        self._thread = threading.Thread(target=self._run, name=f"inboxd-idle-{name}", daemon=True)
        self.idling = threading.Event()  # set while an IDLE command is active (tests wait on it)
        self._idled = False  # IDLE was reached since the last failure: the backoff starts again from its base
        self._refusals: set[str] = set()  # folders whose STATUS was refused on this connection (logged once)
        self._told_no_idle = False  # idle.unsupported was logged (once per watcher, not per connection)
        self._idle_refused = False  # the server answered IDLE with NO or BAD: this watcher polls from then on

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()
        sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes idle_check now rather than at the end of its slice

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                # always catch up once connected: mail may have arrived since the last sync, before IDLE began
                self._watch(catch_up=True)
                failures = 0
            except (InboxdError, IMAPClientError, OSError) as exc:
                if self._stop.is_set():
                    break  # the socket was shut down to stop: not a failure
                failures = 1 if self._idled else failures + 1  # the count is of failures in a row
                self._idled = False
                wait = backoff(failures)
                log.info("idle.reconnect", account=self._name, error=str(exc)[:200], wait_s=round(wait, 1))
                self._stop.wait(wait)
            except Exception:  # never let a watcher die silently: log, back off, try again
                failures += 1
                log.exception("idle.crashed", account=self._name)
                self._stop.wait(backoff(failures))

    def _watch(self, *, catch_up: bool) -> None:
        session = self._connect()
        try:
            if not isinstance(session, ImapClientSession):
                return
            client = session._client
            self._socket = client.socket()  # from now on a stop shuts it down, ending any command at once
            self._refusals = set()
            folder = self._folder(session)
            others = self._other_folders(session)
            if others is not None:  # before the catch-up: what it syncs is not news
                others.seen = self._statuses(session, others.names)
            if self._stop.is_set():
                return
            can_idle = self._can_idle(client)
            selected = session.select(folder)
            if catch_up:  # mail may have arrived while the connection was down
                self._on_change()
            # SELECT's own EXISTS and RECENT are no news (and SELECT gave imaplib a fresh dict for them)
            _, exists = pending_change(client._imap.untagged_responses, selected.exists)
            if self._stop.is_set():
                return
            slice_s = min(CHECK_SLICE, self._poll_others)
            # the first poll at a random point of the period: 200 watchers started together spread their STATUS
            # commands over it instead of sending them in one burst every 30 s
            polled = checked = self._clock.monotonic() - random.uniform(0, self._poll_others)
            while not self._stop.is_set():
                poll_at = self._next_poll(others, polled)
                if can_idle and not self._idle_refused:  # _idle polls once, and the loop from then on, if refused
                    changed, poll = self._idle(client, slice_s, poll_at=poll_at)
                else:  # the NOOP's news is in imaplib's untagged responses, read by pending_change below
                    changed, poll = self._noop(client, at=checked + self._poll_others, poll_at=poll_at)
                    checked = self._clock.monotonic()
                if changed:  # the count moved in ways _idle does not track: the next EXISTS is news whatever it says
                    exists = None
                if poll and others is not None:
                    others, news = self._poll(session, others)
                    changed, polled = changed or news, self._clock.monotonic()
                told, exists = pending_change(client._imap.untagged_responses, exists)  # kept while out of IDLE
                changed = changed or told
                if changed:
                    log.debug("idle.changed", account=self._name, folder=folder)
                    self._on_change()
        finally:
            self._socket = None
            session.close()

    def _can_idle(self, client: IMAPClient) -> bool:
        """Whether the server offers IDLE (and did not refuse it); if not, say so once (a reconnect does not repeat
        it)."""
        if client.has_capability("IDLE") and not self._idle_refused:
            return True
        if not self._told_no_idle:
            self._told_no_idle = True
            reason = "refused" if self._idle_refused else "not offered"
            log.info("idle.unsupported", account=self._name, poll_s=self._poll_others, reason=reason)
        return False

    def _noop(self, client: IMAPClient, *, at: float, poll_at: float | None) -> tuple[bool, bool]:
        """Without IDLE, _idle's stand-in: wait until ``at``, then a NOOP of the selected folder, which the server
        answers with what changed there since the last command (left in imaplib's untagged responses for
        pending_change). Returns (False, whether the other folders are due at ``poll_at``); (False, False) when
        the watcher stops meanwhile."""
        self._stop.wait(max(0.0, at - self._clock.monotonic()))
        if self._stop.is_set():
            return False, False
        client.noop()
        self._idled = True  # as after a slice of IDLE: the connection holds, the backoff starts over
        return False, poll_at is not None and self._clock.monotonic() >= poll_at

    def _idle(self, client: IMAPClient, slice_s: float, *, poll_at: float | None) -> tuple[bool, bool]:
        """One IDLE command, until the folder changes (True, _), the other folders are due for a STATUS at
        ``poll_at`` (_, True), IDLE_RENEW passes or the watcher stops (False, False). An IDLE the server refuses (NO,
        BAD) is a NOOP instead (_noop), and so is every wait of this watcher from then on."""
        started = self._clock.monotonic()
        try:
            client.idle()
        except IMAPClientError:
            # imapclient raises for any line before the continuation; only the command's own NO or BAD is a refusal
            # (an untagged EXISTS just before "+ idling" is not: that one goes to the reconnect, as it did)
            tag = getattr(client, "_idle_tag", None)
            answer = client._imap.tagged_commands.get(tag) if tag is not None else None
            if answer is None or answer[0] not in ("NO", "BAD"):
                raise
            self._idle_refused = True
            self._can_idle(client)  # says so, once
            return self._noop(client, at=started, poll_at=poll_at)
        self.idling.set()
        changed = poll = False
        try:
            while not self._stop.is_set() and self._clock.monotonic() - started < IDLE_RENEW:
                if read_ahead(client):  # idle_check polls the socket, which cannot see it: DONE reads it
                    break
                wait = slice_s if poll_at is None else max(0.0, min(slice_s, poll_at - self._clock.monotonic()))
                responses = client.idle_check(timeout=wait)
                self._idled = True  # a slice of IDLE went by: the connection holds, the backoff starts over
                if is_bye(responses):
                    raise SessionExpired("the server ended the idle session")
                if not responses and peer_closed(client.socket()):
                    raise RetryLater("the server closed the idle connection")
                if is_change(responses):
                    changed = True
                    break
                if poll_at is not None and self._clock.monotonic() >= poll_at:
                    poll = True
                    break
        finally:
            self.idling.clear()
            with contextlib.suppress(IMAPClientError, OSError):
                _, done = client.idle_done()
                changed = changed or is_change(done)  # news between the last check and DONE
        return changed, poll

    def _next_poll(self, others: _Others | None, polled: float) -> float | None:
        """When the next poll is due: POLL_OTHERS after the last; for a mailbox with no other folder, only its LIST
        is due, LIST_EVERY times less often. None on Gmail."""
        if others is None:
            return None
        return polled + self._poll_others * (1 if others.names else self._list_every)

    def _poll(self, session: ImapSession, others: _Others) -> tuple[_Others, bool]:
        """One poll out of IDLE: every ``list_every`` polls a LIST, where a folder that appeared, went or changed its
        role is news (the account's sync takes it up or lets it go; a new folder's STATUS now is its baseline); then
        the STATUS of this turn's folders (``polled_folders``), news when one differs from the last answer. A
        refused STATUS is no news (a folder that went is the LIST's to find)."""
        others.turn += 1
        news = False
        if not others.names or others.turn % self._list_every == 0:
            fresh = self._other_folders(session)
            if fresh is not None and not fresh.same_folders(others):
                added = [name for name in fresh.names if name not in others.seen]
                log.info(
                    "idle.folders_changed",
                    account=self._name,
                    added=len(set(fresh.names) - set(others.names)),
                    removed=len(set(others.names) - set(fresh.names)),
                )
                fresh.seen = {name: others.seen[name] for name in fresh.names if name in others.seen}
                fresh.seen.update(self._statuses(session, added))
                fresh.turn, fresh.after = others.turn, others.after
                others, news = fresh, True
        names = polled_folders(others.always, others.rotating, others.after, self._poll_budget)
        if len(others.rotating) > self._poll_budget:
            others.after = names[-1]
        now = self._statuses(session, names)
        news = news or any(others.seen.get(name, _UNSEEN) != status for name, status in now.items())
        others.seen.update(now)
        return others, news

    def _statuses(self, session: ImapSession, names: list[str]) -> dict[str, object]:
        """The STATUS of each folder that answers one. A folder the server refuses (deleted or renamed meanwhile,
        \\Noselect, no read right: NO) or answers without the counts is left out and logged once per connection
        (``idle.status_failed``), rather than ending the watcher, and INBOX's push with it; a lost connection
        raises (reconnect). Stops early when the watcher is asked to stop."""
        found: dict[str, object] = {}
        for name in names:
            if self._stop.is_set():
                break
            try:
                found[name] = session.status(name)
            except RetryLater as exc:
                if not is_refusal(exc):
                    raise  # the connection itself is gone: reconnect
                self._refused(name, str(exc))
            except (KeyError, ValueError, TypeError) as exc:  # a reply without UIDNEXT, or not a number
                self._refused(name, f"unreadable STATUS reply: {type(exc).__name__}")
        return found

    def _refused(self, name: str, error: str) -> None:
        if name not in self._refusals:
            self._refusals.add(name)
            log.info("idle.status_failed", account=self._name, folder=name, error=error[:200])

    @staticmethod
    def _other_folders(session: ImapSession) -> _Others | None:
        """The synced folders IDLE on INBOX does not cover, Sent apart; None on Gmail, whose All Mail has them all."""
        if session.capabilities.gmail:
            return None
        folders = [f for f in GenericImap().folders(session.list_folders()) if f.special_use != "\\Inbox"]
        return _Others(
            always=[f.name for f in folders if f.special_use == "\\Sent"],
            rotating=sorted(f.name for f in folders if f.special_use != "\\Sent"),
        )

    @staticmethod
    def _folder(session: ImapSession) -> str:
        if session.capabilities.gmail:
            return Gmail().folders(session.list_folders())[0].name
        return "INBOX"
