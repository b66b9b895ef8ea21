"""Benchmark mailboxes: a deterministic, realistic message mix written straight into Dovecot's Maildir.

Message i depends only on (seed, i), so a mailbox of n messages is the first n of a cached pool: generated once
under the cache dir, then hard-linked into each bench user's Maildir and indexed by doveadm.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

# bump when the generator changes: cached pools of an older version are regenerated
GENERATOR_VERSION = 1
DEFAULT_SEED = 8
CANDIDATE_SHARE = 0.01
RECRUITER = "rita.recruiter@corp.example"
START = datetime(2022, 1, 3, 8, 0, tzinfo=UTC)

_WORDS = str.split(
    "the candidate interview role team offer schedule thanks regards please review attached resume "
    "position salary notice start date feedback manager hiring process onsite remote call tomorrow week "
    "meeting agenda project update deadline budget quarter report invoice contract signed draft final "
    "version notes question answer follow up reminder confirm available slot calendar travel office "
    "policy benefits reference check background engineer designer analyst product sales support customer "
    "partner vendor release deploy build"
)
_LATIN1_WORDS = str.split(
    "café élève garçon naïve façade crème brûlée déjà vu résumé à bientôt où Müller Größe señor año"
)
_UTF8_SUBJECTS = ("Entretien pour le poste — équipe données", "Bewerbung: Größe der Teams", "面试安排 確認", "Résumé ✓")
_FIRST = str.split(
    "anna ben carla dmitri elena farid greta hiro ines jonas kemal lena marco nadia oskar paula rui sofia"
)
_LAST = str.split("smith novak garcia muller rossi kowalski tanaka silva dubois jensen ahmed costa weber lindqvist")
_DOMAINS = ("corp.example", "partner.example", "vendor.example", "news.example", "agency.example")
CANDIDATES = tuple(
    f"{f}.{last}.{k}@candidates.example" for k, (f, last) in enumerate(zip(_FIRST * 3, _LAST * 4, strict=False))
)[:50]


@dataclass(frozen=True, slots=True)
class Pool:
    """Generated messages in a cache dir: file names in UID order, and what they hold."""

    path: Path
    files: list[str]
    kinds: dict[str, int]
    total_bytes: int


def _unit(seed: int, i: int, salt: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{salt}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_candidate(seed: int, i: int) -> bool:
    return _unit(seed, i, "cand") < CANDIDATE_SHARE


def _candidate_of(seed: int, i: int) -> str:
    return CANDIDATES[int(_unit(seed, i, "who") * len(CANDIDATES))]


def _message_id(seed: int, i: int) -> str:
    return f"<{i}.{seed}.bench@mail.corp.example>"


def _subject(seed: int, i: int) -> str:
    rng = random.Random(f"{seed}:subject:{i}")
    return " ".join(rng.choices(_WORDS, k=rng.randint(3, 8))).capitalize()


def _text(rng: random.Random, size: int) -> str:
    words = rng.choices(_WORDS, k=max(size // 7, 5))
    lines = [" ".join(words[k : k + 11]) for k in range(0, len(words), 11)]
    return "\n".join(lines) + "\n"


def _person(rng: random.Random) -> str:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return f"{first.capitalize()} {last.capitalize()} <{first}.{last}@{rng.choice(_DOMAINS)}>"


def _encoded_word(text: str) -> str:
    return f"=?UTF-8?B?{base64.b64encode(text.encode()).decode()}?="


def _parent(seed: int, i: int, rng: random.Random) -> int | None:
    """A recent message of the same kind (candidate or not) this one replies to, for ~25% of messages."""
    if i == 0 or rng.random() >= 0.25:
        return None
    candidate = is_candidate(seed, i)
    for j in range(i - 1 - rng.randint(0, 20), max(-1, i - 400), -1):
        if is_candidate(seed, j) == candidate:
            return j
    return None


def message(seed: int, i: int) -> tuple[str, bytes, datetime]:
    """Message i of the pool: (kind, raw bytes with LF line ends, date)."""
    rng = random.Random(f"{seed}:msg:{i}")
    date = datetime.fromtimestamp(START.timestamp() + i * 900 + rng.randint(0, 899), UTC)
    parent = _parent(seed, i, rng)
    candidate = is_candidate(seed, i)
    if candidate:
        who = _candidate_of(seed, i if parent is None else parent)
        outbound = rng.random() < 0.3
        sender, to = (RECRUITER, who) if outbound else (who, RECRUITER)
    else:
        sender, to = _person(rng), RECRUITER
    roll = rng.random()
    kind = "plain" if roll < 0.50 else "alternative" if roll < 0.80 else "attachment" if roll < 0.95 else "non_ascii"
    subject = _subject(seed, i if parent is None else parent)
    if parent is not None:
        subject = "Re: " + subject
    headers = [
        "Return-Path: <bounces@corp.example>",
        f"Received: from mx.corp.example by mail.corp.example with ESMTPS id {i:08x}; {format_datetime(date)}",
        f"Date: {format_datetime(date)}",
        f"From: {sender}",
        f"To: {to}",
        f"Message-ID: {_message_id(seed, i)}",
        "MIME-Version: 1.0",
    ]
    if rng.random() < 0.2:
        headers.append(f"Cc: {_person(rng)}, {_person(rng)}")
    if parent is not None:
        headers += [f"In-Reply-To: {_message_id(seed, parent)}", f"References: {_message_id(seed, parent)}"]
    text = _text(rng, rng.randint(800, 6000))
    boundary = f"=_bench_{i}_{rng.getrandbits(32):08x}"
    if kind == "non_ascii":
        headers.insert(3, f"Subject: {_encoded_word(rng.choice(_UTF8_SUBJECTS) + ' ' + subject)}")
        body = (" ".join(rng.choices(_LATIN1_WORDS + list(_WORDS), k=400)) + "\n").encode("latin-1")
        headers += ["Content-Type: text/plain; charset=ISO-8859-1", "Content-Transfer-Encoding: 8bit"]
        return kind, ("\n".join(headers) + "\n\n").encode() + body, date
    headers.insert(3, f"Subject: {subject}")
    if kind == "plain":
        headers += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 7bit"]
        return kind, ("\n".join(headers) + "\n\n" + text).encode(), date
    html = "<html><body>" + "".join(f"<p>{line}</p>\n" for line in text.splitlines()) + "</body></html>\n"
    alternative = (
        f"--{boundary}a\nContent-Type: text/plain; charset=utf-8\n\n{text}\n"
        f"--{boundary}a\nContent-Type: text/html; charset=utf-8\n\n{html}\n--{boundary}a--\n"
    )
    if kind == "alternative":
        headers.append(f'Content-Type: multipart/alternative; boundary="{boundary}a"')
        return kind, ("\n".join(headers) + "\n\n" + alternative).encode(), date
    payload = base64.encodebytes(rng.randbytes(rng.randint(20_000, 200_000))).decode()
    headers.append(f'Content-Type: multipart/mixed; boundary="{boundary}"')
    body = (
        f'--{boundary}\nContent-Type: multipart/alternative; boundary="{boundary}a"\n\n{alternative}\n'
        f'--{boundary}\nContent-Type: application/pdf; name="doc-{i}.pdf"\n'
        f'Content-Disposition: attachment; filename="doc-{i}.pdf"\nContent-Transfer-Encoding: base64\n\n'
        f"{payload}--{boundary}--\n"
    )
    return kind, ("\n".join(headers) + "\n\n" + body).encode(), date


def _file_name(i: int, raw: bytes) -> str:
    # Dovecot reads the sizes from S= (physical) and W= (virtual, CRLF) instead of stat()ing or reading the file
    flags = "S" if i % 10 < 7 else ""
    vsize = len(raw) + raw.count(b"\n")
    return f"{1_600_000_000 + i}.M{i:06d}P0.bench,S={len(raw)},W={vsize}:2,{flags}"


def pool(cache_dir: Path, count: int, seed: int = DEFAULT_SEED) -> Pool:
    """At least `count` generated messages in the cache (generating only what is missing); the first `count`."""
    path = cache_dir / f"pool-s{seed}-v{GENERATOR_VERSION}"
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": [], "kinds": []}
    files: list[str] = manifest["files"]
    kinds: list[str] = manifest["kinds"]
    if len(files) < count:
        (path / "cur").mkdir(parents=True, exist_ok=True)
        mail = pwd.getpwnam("mail")
        started = time.monotonic()
        for i in range(len(files), count):
            kind, raw, date = message(seed, i)
            name = _file_name(i, raw)
            target = path / "cur" / name
            target.write_bytes(raw)
            os.utime(target, (date.timestamp(), date.timestamp()))  # Dovecot's INTERNALDATE on maildir
            os.chown(target, mail.pw_uid, mail.pw_gid)  # hard links share the inode: owned like Dovecot's own
            files.append(name)
            kinds.append(kind)
            if (i + 1) % 10_000 == 0:
                print(f"seed: generated {i + 1}/{count} ({time.monotonic() - started:.0f} s)", flush=True)
        manifest_path.write_text(json.dumps({"files": files, "kinds": kinds}))
    chosen = files[:count]
    total = sum(int(name.split(",S=")[1].split(",")[0]) for name in chosen)
    counts = {k: kinds[:count].count(k) for k in ("plain", "alternative", "attachment", "non_ascii")}
    return Pool(path, chosen, counts, total)


def install(pool_: Pool, home: Path, doveadm: list[str], user: str) -> bool:
    """Make `home`/Maildir hold exactly the pool's messages in INBOX, indexed; False when it already did."""
    marker = home / "bench-seed.json"
    key = {"pool": pool_.path.name, "count": len(pool_.files)}
    if marker.exists() and json.loads(marker.read_text()) == key and _inbox_count(doveadm, user) == len(pool_.files):
        return False
    if home.exists():
        shutil.rmtree(home)
    cur = home / "Maildir" / "cur"
    for sub in ("cur", "new", "tmp"):
        (home / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
    for name in pool_.files:
        source = pool_.path / "cur" / name
        try:
            os.link(source, cur / name)
        except OSError:  # another filesystem: copy
            shutil.copy2(source, cur / name)
    mail = pwd.getpwnam("mail")
    for directory in (home, home / "Maildir", cur, home / "Maildir" / "new", home / "Maildir" / "tmp"):
        os.chown(directory, mail.pw_uid, mail.pw_gid)
    # assign UIDs (Dovecot sorts new maildir files by name: our names follow the message order) and build indexes
    subprocess.run([*doveadm, "force-resync", "-u", user, "INBOX"], check=True, capture_output=True)  # noqa: S603
    subprocess.run([*doveadm, "index", "-u", user, "INBOX"], check=True, capture_output=True)  # noqa: S603
    count = _inbox_count(doveadm, user)
    if count != len(pool_.files):
        raise RuntimeError(f"{user}: Dovecot sees {count} messages in INBOX, expected {len(pool_.files)}")
    marker.write_text(json.dumps(key))
    os.chown(marker, mail.pw_uid, mail.pw_gid)
    return True


def _inbox_count(doveadm: list[str], user: str) -> int:
    proc = subprocess.run(  # noqa: S603
        [*doveadm, "mailbox", "status", "-u", user, "messages", "INBOX"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return -1
    return int(proc.stdout.strip().split("=", 1)[1])
