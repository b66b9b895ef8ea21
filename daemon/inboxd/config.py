"""The daemon's configuration: one TOML file read once into frozen, validated dataclasses.

Nothing here runs at import time; ``load_config`` is called by the CLI and the result is passed down.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from inboxd.errors import ConfigError
from inboxd.mime import MAX_NAME_CHARS, InvalidDraft, check_from_name

Scope = Literal["all", "contacts"]
ProviderKind = Literal["gmail", "microsoft", "imap"]
TlsMode = Literal["tls", "starttls", "plain"]
AuthMethod = Literal["oauth2", "password"]

SCOPES: tuple[Scope, ...] = ("all", "contacts")
PROVIDER_KINDS: tuple[ProviderKind, ...] = ("gmail", "microsoft", "imap")
TLS_MODES: tuple[TlsMode, ...] = ("tls", "starttls", "plain")
AUTH_METHODS: tuple[AuthMethod, ...] = ("oauth2", "password")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

MIB = 1024 * 1024
DEFAULT_INTERVAL = timedelta(minutes=60)
DEFAULT_PARSE_TIME_LIMIT = timedelta(seconds=60)
DEFAULT_KEEP_SESSION = timedelta(minutes=5)
DEFAULT_STALL_AFTER = timedelta(minutes=30)
DEFAULT_PARALLEL_SYNCS = 4
DEFAULT_PARALLEL_FIRST_SYNCS = 2
MAX_PARALLEL_SYNCS = 32  # the daemon's pool holds threads for both lanes at their maximum
MAX_KEEP_SESSION = timedelta(minutes=25)  # below RFC 3501's 30-minute minimum for a server's autologout
DEFAULT_BATCH_SIZE = 200
MAX_BATCH_SIZE = 5000
MAX_PARSE_WORKERS = 64
DEFAULT_MAX_ATTACHMENT_BYTES = 25 * MIB
DEFAULT_TIMEOUT = 30.0
# A network timeout goes to socket.settimeout and poll(): above ~9.2e9 s (and inf) they raise OverflowError at every
# connection. An hour is far beyond any useful wait for one answer.
MAX_TIMEOUT = 3600.0
DEFAULT_STATE_DIR = "./var"

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL, not a secret)
GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_REVOKE_URI = "https://oauth2.googleapis.com/revoke"
MICROSOFT_TOKEN_URI = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"  # noqa: S105
MICROSOFT_AUTH_URI = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize"
# What a recruiter consents to: mail over IMAP/SMTP, and who they are (the id_token's email) to check the address.
GMAIL_SCOPES = ("https://mail.google.com/", "openid", "email")
MICROSOFT_SCOPES = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
    "openid",
    "email",
)


@dataclass(frozen=True, repr=False)
class DatabaseConfig:
    url: str

    def __repr__(self) -> str:
        # The URL may carry the database password; never let it reach a log line.
        return f"DatabaseConfig(url={redact_url(self.url)!r})"


@dataclass(frozen=True)
class SecretsConfig:
    key_file: Path


@dataclass(frozen=True)
class SyncConfig:
    attachments_dir: Path
    scope: Scope = "contacts"
    interval: timedelta = DEFAULT_INTERVAL
    batch_size: int = DEFAULT_BATCH_SIZE
    max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT_BYTES
    # servers without CONDSTORE: how often every flag is re-read (flag changes are invisible to STATUS there)
    flag_scan_interval: timedelta = timedelta(minutes=15)
    # Gmail [OVERQUOTA] (bandwidth/command limits): how long that account's IMAP is left alone
    quota_pause: timedelta = timedelta(hours=1)
    # several nodes on one database: an account's lease lasts this long and is renewed every third of it
    lease: timedelta = timedelta(seconds=30)
    # never stored / never a contact match: addresses ("hr@corp.example") and domains ("@corp.example")
    exclude_addresses: frozenset[str] = frozenset()
    # messages carrying any of these labels (Gmail labels, or folder names elsewhere) are never stored
    exclude_labels: frozenset[str] = frozenset()
    # processes parsing message bodies (inboxd.parsing); 0: parse in the sync threads
    parse_workers: int = 0
    # a worker's time for a message, plus 10 s per MiB of it; one that overruns is killed, the message quarantined
    parse_time_limit: timedelta = DEFAULT_PARSE_TIME_LIMIT
    # `inboxd run`: how long a sync's IMAP session stays open for the account's next sync (inboxd.kept_sessions)
    keep_session: timedelta = DEFAULT_KEEP_SESSION
    # `inboxd run`: a sync with no batch stored for this long is reported stalled (daemon.sync_stalled)
    stall_after: timedelta = DEFAULT_STALL_AFTER
    # `inboxd run`: syncs at once of accounts that finished a sync before, and first syncs beside them (schedule.py)
    parallel_syncs: int = DEFAULT_PARALLEL_SYNCS
    parallel_first_syncs: int = DEFAULT_PARALLEL_FIRST_SYNCS


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: ProviderKind
    imap_host: str
    imap_port: int
    imap_tls: TlsMode
    smtp_host: str | None
    smtp_port: int | None
    smtp_tls: TlsMode | None
    auth: AuthMethod
    token_uri: str | None
    client_id: str | None
    client_secret: str | None = field(repr=False)
    ca_file: Path | None
    timeout: float = DEFAULT_TIMEOUT
    # the consent flow (`inboxd connect`, /connect/start): authorization endpoint and scopes asked for
    auth_uri: str | None = None
    scopes: tuple[str, ...] = ()
    # where `inboxd disconnect` revokes a refresh token (RFC 7009); None: the provider has no such endpoint
    revoke_uri: str | None = None
    # accounts added with --delegated: Google Workspace domain-wide delegation (a service-account key file) ...
    service_account_file: Path | None = None
    # ... or Microsoft 365 app-only access (client credentials of this provider's client_id/client_secret)
    app_only: bool = False

    @property
    def delegation(self) -> str | None:
        """How accounts of this provider connect without consent: "service_account", "app_only" or None."""
        if self.service_account_file is not None:
            return "service_account"
        return "app_only" if self.app_only else None


@dataclass(frozen=True)
class AccountPolicy:
    email: str
    paused: bool = False
    reason: str | None = None
    display_name: str | None = None  # the From name of mail sent from the HR app ("Rita Recruiter")


DEFAULT_HTTP_LISTEN = "127.0.0.1:9810"


@dataclass(frozen=True)
class HttpConfig:
    """Where /metrics and /healthz are served; ``listen`` None means off."""

    listen: tuple[str, int] | None = ("127.0.0.1", 9810)
    allow_remote: bool = False
    # the address browsers reach this listener at (behind a proxy: "https://inboxd.example.com"); the OAuth
    # redirect URI is public_url + "/oauth/callback". None: http://<listen>.
    public_url: str | None = None
    # where /connect/start may send the browser back to: origins like "https://hr.example.com"
    return_to_origins: frozenset[str] = frozenset()
    # the HR app's shared secret: signs /connect/start links and authenticates POST /accounts/disconnect
    api_token: str | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str | None:
        if self.public_url is not None:
            return self.public_url
        if self.listen is None:
            return None
        host, port = self.listen
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def redirect_uri(self) -> str | None:
        return None if self.base_url is None else self.base_url + "/oauth/callback"


@dataclass(frozen=True)
class Config:
    path: Path | None
    state_dir: Path
    database: DatabaseConfig
    secrets: SecretsConfig
    sync: SyncConfig
    providers: Mapping[str, ProviderConfig]
    accounts: Mapping[str, AccountPolicy]
    log_level: str = "info"
    http: HttpConfig = field(default_factory=HttpConfig)

    def policy_for(self, email: str) -> AccountPolicy:
        """The admin's policy for this mailbox; accounts not named in the config are synced normally."""
        key = email.strip().lower()
        return self.accounts.get(key) or AccountPolicy(email=key)


# --- public entry points ------------------------------------------------------------------------


def load_config(path: Path | None = None, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file named by ``path``, else by ``$INBOXD_CONFIG``."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None:
        named = environ.get("INBOXD_CONFIG", "").strip()
        if not named:
            raise ConfigError(
                "no config file given: pass --config /etc/inboxd/inboxd.toml or set INBOXD_CONFIG "
                "(config/inboxd.toml in the repository is a commented example)"
            )
        path = Path(named)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file is not UTF-8 text ({exc.reason})", path=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=str(path)) from None
    return parse_config(text, path=path, env=environ)


def parse_config(text: str, *, path: Path | None, env: Mapping[str, str]) -> Config:
    """Validate TOML text into a Config; ``path`` names the file in errors and anchors relative paths."""
    where = str(path) if path is not None else None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", path=where) from None
    base_dir = path.absolute().parent if path is not None else Path.cwd()
    ctx = _Context(where=where, base_dir=base_dir, env=env)
    try:
        return _build_config(_Table(data, "", ctx), path)
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError, RecursionError, OSError) as exc:
        # a value no check foresaw: still a config error naming the file, never a traceback (the value itself is
        # not repeated: it may be a secret)
        raise ConfigError(f"a value cannot be used ({type(exc).__name__})", path=where) from None


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"([0-9]+)\s*([smhd])")  # ASCII digits only (\d takes Arabic-Indic ones too)
MAX_DURATION_DAYS = 3650  # ten years: beyond, datetime arithmetic (now + lease) overflows


def parse_duration(s: str) -> timedelta:
    """``"30s"``, ``"60m"``, ``"2h"``, ``"1d"`` or a combination like ``"1h30m"`` -> timedelta."""
    text = s.strip().lower()
    if not text:
        raise ValueError('expected a duration like "30s", "60m", "2h" or "1d", got an empty string')
    pos, seconds = 0, 0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos and text[pos : match.start()].strip():
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError(f'expected a duration like "30s", "60m", "2h" or "1d", got {s!r}')
    if seconds > MAX_DURATION_DAYS * 86400:
        raise ValueError(f"expected a duration of at most {MAX_DURATION_DAYS}d, got {s!r}")
    return timedelta(seconds=seconds)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)")
MAX_SIZE = 2**53  # bytes; far above any limit that makes sense, and exact as a float


def parse_size(s: str | int) -> int:
    """Bytes from an int or ``"500KB"``, ``"25MB"`` (powers of 1000), ``"10MiB"`` (powers of 1024)."""
    if isinstance(s, bool):
        raise ValueError(f'expected a size in bytes or like "25MB", got {s!r}')
    if isinstance(s, int):
        if s < 0:
            raise ValueError(f"expected a size of 0 bytes or more, got {s}")
        if s > MAX_SIZE:
            raise ValueError(f"expected a size of at most {MAX_SIZE} bytes, got {s}")
        return s
    match = _SIZE_RE.fullmatch(s.strip().lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f'expected a size like 1048576, "500KB", "25MB" or "10MiB", got {s!r}')
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not size <= MAX_SIZE:  # also inf
        raise ValueError(f"expected a size of at most {MAX_SIZE} bytes, got {s!r}")
    return round(size)


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: the only hosts we talk to without TLS."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[1]}").geturl()


_HOST_EXPECTED = 'a host name or IP address like "imap.example.com" (the port is a key of its own)'
_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_name(value: Any) -> str | None:
    """``value`` as a host to connect to, or None when it is none: a DNS name (labels of letters, digits, '-' and
    '_', an optional final dot), an IPv4 address, or an IPv6 address, bracketed or not (returned without)."""
    if not isinstance(value, str):
        return None
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        return host if _is_ipv6(host) else None
    if ":" in host:
        return host if _is_ipv6(host) else None
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return None
    return host


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# --- validation machinery -----------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class _Context:
    where: str | None
    base_dir: Path
    env: Mapping[str, str]

    def resolve(self, value: str) -> Path:
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # ~name of a user this system does not have
            raise ConfigError(f"cannot expand {_show(value)}: no such user's home directory", path=self.where) from None
        return p if p.is_absolute() else self.base_dir / p

    def credential(self, value: str) -> Path:
        """A relative secret file name is first looked up in systemd's $CREDENTIALS_DIRECTORY."""
        creds = self.env.get("CREDENTIALS_DIRECTORY", "").strip()
        if creds and not Path(value).is_absolute():
            candidate = Path(creds) / value
            if candidate.is_file():
                return candidate
        return self.resolve(value)


def _show(value: object) -> str:
    """A value as the admin wrote it in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


_MISSING: Any = object()


class _Table:
    """One TOML table plus its dotted key, so every error names file and key."""

    def __init__(self, data: Mapping[str, Any], key: str, ctx: _Context) -> None:
        self.data = data
        self.key = key
        self.ctx = ctx

    def dotted(self, name: str) -> str:
        quoted = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
        return f"{self.key}.{quoted}" if self.key else quoted

    def error(self, name: str | None, message: str) -> ConfigError:
        key = self.dotted(name) if name is not None else (self.key or None)
        return ConfigError(message, path=self.ctx.where, key=key)

    def only(self, allowed: Collection[str]) -> None:
        """Reject keys we do not know, suggesting the closest known one (typo protection)."""
        for name in self.data:
            if name in allowed:
                continue
            close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else f"; known keys: {', '.join(sorted(allowed))}"
            raise self.error(name, f"unknown key{hint}")

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, default: Any, check: Callable[[Any], bool], expected: str) -> Any:
        if name not in self.data:
            if default is _MISSING:
                raise self.error(name, f"is required: {expected}")
            return default
        value = self.data[name]
        if not check(value):
            raise self.error(name, f"must be {expected}, got {_show(value)}")
        return value

    def table(self, name: str) -> _Table:
        value = self._get(name, {}, lambda v: isinstance(v, dict), f"a table ([{self.dotted(name)}])")
        return _Table(value, self.dotted(name), self.ctx)

    def string(self, name: str, default: Any = _MISSING, *, expected: str = "a non-empty string") -> Any:
        return self._get(name, default, lambda v: isinstance(v, str) and v.strip() != "" and "\x00" not in v, expected)

    def choice(self, name: str, choices: tuple[T, ...], default: Any = _MISSING) -> T:
        options = " or ".join(_show(c) for c in choices)
        return cast(T, self._get(name, default, lambda v: v in choices, f"one of {options}"))

    def integer(self, name: str, default: Any, low: int, high: int) -> Any:
        def ok(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

        return self._get(name, default, ok, f"an integer {low}-{high}")

    def boolean(self, name: str, default: Any) -> Any:
        return self._get(name, default, lambda v: isinstance(v, bool), "true or false")

    def number(self, name: str, default: Any, *, high: float, expected: str) -> Any:
        """A number above 0 and at most ``high``: TOML's inf and nan are refused too."""

        def ok(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= high

        value = self._get(name, default, ok, expected)
        return None if value is None else float(value)

    def host(self, name: str, default: Any = _MISSING) -> Any:
        """A DNS name, an IPv4 address or an IPv6 address (brackets optional, dropped): what a socket connects to.
        No port: "imap.example.com:993" or "[::1" is an error, not a name that fails at the first connection."""
        value = self._get(name, default, lambda v: _host_name(v) is not None, _HOST_EXPECTED)
        return _host_name(value) if isinstance(value, str) else value

    def converted(self, name: str, default: Any, convert: Callable[[Any], T], expected: str) -> T:
        if name not in self.data:
            return cast(T, default)
        value = self.data[name]
        try:
            return convert(value)
        except (ValueError, TypeError, AttributeError, OverflowError):
            raise self.error(name, f"must be {expected}, got {_show(value)}") from None


# --- sections -----------------------------------------------------------------------------------


def _build_config(root: _Table, path: Path | None) -> Config:
    root.only({"state_dir", "log_level", "database", "secrets", "sync", "providers", "accounts", "http"})
    ctx = root.ctx
    state_default = ctx.env.get("STATE_DIRECTORY", "").split(":")[0].strip() or DEFAULT_STATE_DIR
    state_dir = ctx.resolve(root.string("state_dir", state_default, expected="a directory path"))
    if state_dir.exists() and not state_dir.is_dir():
        raise root.error("state_dir", f"{state_dir} is not a directory")
    log_level = root.converted("log_level", "info", _log_level, f"one of {', '.join(LOG_LEVELS)}")

    return Config(
        path=path,
        state_dir=state_dir,
        database=_database(root.table("database"), state_dir),
        secrets=_secrets(root.table("secrets"), state_dir),
        sync=_sync(root.table("sync"), state_dir),
        providers=_providers(root.table("providers")),
        accounts=_accounts(root.table("accounts")),
        log_level=log_level,
        http=_http(root.table("http")),
    )


def _log_level(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in LOG_LEVELS:
        raise ValueError(value)
    return value.strip().lower()


def _http(table: _Table) -> HttpConfig:
    table.only({"listen", "allow_remote", "public_url", "return_to_origins", "api_token_file"})
    allow_remote: bool = table.boolean("allow_remote", False)
    expected = '"host:port" like "127.0.0.1:9810" or "[::1]:9810", or "off"'
    listen = table.converted("listen", _listen_address(DEFAULT_HTTP_LISTEN), _listen_address, expected)
    if listen is not None and not allow_remote and not is_loopback_host(listen[0]):
        raise table.error(
            "listen",
            f"{_show(table.data['listen'])} is not a loopback address; /metrics and /healthz are unauthenticated, "
            "so set allow_remote = true to serve them beyond this host (behind a firewall)",
        )
    public_url = table.converted(
        "public_url",
        None,
        _public_url,
        'an http(s) URL without path, query or fragment, like "https://inboxd.example.com"',
    )
    origins = table.converted(
        "return_to_origins", frozenset(), _origins, 'a list of origins like ["https://hr.example.com"]'
    )
    api_token = None
    if table.has("api_token_file"):
        api_token = _read_token_file(table, "api_token_file")
    return HttpConfig(
        listen=listen, allow_remote=allow_remote, public_url=public_url, return_to_origins=origins, api_token=api_token
    )


def _public_url(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return _origin(value.strip().rstrip("/"))


def _split_url(value: str) -> SplitResult:
    """urlsplit, with a ValueError for a port that is no number 0-65535 (urlsplit checks it only when asked)."""
    parts = urlsplit(value)
    parts.port  # noqa: B018
    return parts


def _https_or_loopback(parts: SplitResult) -> bool:
    """An https:// URL, or http:// to this host: a token, an OAuth code or a signed link must not cross the network
    in clear text."""
    if not parts.hostname:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname))


def _origin(value: str) -> str:
    """``scheme://host[:port]`` lowercased; anything else (a path, a query, another scheme) is a ValueError."""
    parts = _split_url(value)
    if not _https_or_loopback(parts) or parts.path not in ("", "/"):
        raise ValueError(value)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(value)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _origins(value: Any) -> frozenset[str]:
    return frozenset(url_origin(_split_url(_origin(v.rstrip("/")))) for v in _string_list(value))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(parts: SplitResult) -> str:
    """``scheme://host[:port]`` lowercased and without the scheme's default port, as a browser compares origins:
    https://hr.example.com:443 and https://hr.example.com are one origin."""
    netloc = parts.netloc.lower()
    port = parts.port
    if port is not None or netloc.endswith(":"):
        host = netloc.rsplit(":", 1)[0]
        netloc = host if port in (None, _DEFAULT_PORTS.get(parts.scheme)) else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}"


def _read_token_file(table: _Table, key: str) -> str:
    file = table.ctx.credential(table.string(key, expected="a file path"))
    try:
        text = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise table.error(key, f"file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise table.error(key, f"cannot read {file}: {reason}") from None
    if len(text) < 32 or any(c.isspace() for c in text):
        raise table.error(key, f"{file} must hold one secret of at least 32 characters (e.g. `openssl rand -hex 32`)")
    return text


def _listen_address(value: Any) -> tuple[str, int] | None:
    if not isinstance(value, str):
        raise TypeError(value)
    if value.strip().lower() == "off":
        return None
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})", value.strip())
    if match is None or int(match.group(3)) > 65535:
        raise ValueError(value)
    host = match.group(1) or match.group(2)
    if match.group(1) is not None:
        ipaddress.IPv6Address(host)  # ValueError when it is not one
    return host, int(match.group(3))


_SQLITE_RE = re.compile(r"^(sqlite(?:\+\w+)?):///(.*)$")


def _database(table: _Table, state_dir: Path) -> DatabaseConfig:
    table.only({"url"})
    default = f"sqlite:///{state_dir / 'inboxd.db'}"
    url: str = table.string(
        "url", default, expected='a database URL like "postgresql+psycopg://inboxd@db/inboxd"'
    ).strip()
    # the URL may hold a password, in forms no redaction foresees: an error shows its scheme at most
    expected = 'a database URL like "postgresql+psycopg://inboxd@db/inboxd" or "sqlite:///inboxd.db"'
    if "://" not in url:
        raise table.error("url", f'must be {expected}, got a value without "://"')
    scheme = _show(url.split("://", 1)[0][:40])
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise table.error("url", f"must be {expected}; SQLAlchemy cannot use this one (scheme {scheme})") from None
    if parsed.port is not None and not 0 < parsed.port <= 65535:
        raise table.error("url", f"must be {expected}; its port is not 1-65535 (scheme {scheme})")
    sqlite = _SQLITE_RE.match(url)
    if sqlite:
        file_part = sqlite.group(2)
        if file_part and not file_part.startswith(("/", ":memory:", "file:")):
            # A relative SQLite path is anchored at the config file, not at the daemon's cwd.
            url = f"{sqlite.group(1)}:///{table.ctx.resolve(file_part)}"
    return DatabaseConfig(url=url)


def _secrets(table: _Table, state_dir: Path) -> SecretsConfig:
    table.only({"key_file"})
    if not table.has("key_file"):
        return SecretsConfig(key_file=state_dir / "secret.key")
    value = table.string("key_file", expected="a file path")
    return SecretsConfig(key_file=table.ctx.credential(value))


def _sync(table: _Table, state_dir: Path) -> SyncConfig:
    table.only(
        {
            "scope",
            "interval",
            "batch_size",
            "max_attachment_bytes",
            "attachments_dir",
            "flag_scan_interval",
            "quota_pause",
            "exclude_addresses",
            "exclude_labels",
            "lease",
            "parse_workers",
            "parse_time_limit",
            "keep_session",
            "stall_after",
            "parallel_syncs",
            "parallel_first_syncs",
        }
    )
    duration = f'a duration like "30s", "60m", "2h" or "1d", at most {MAX_DURATION_DAYS}d'
    interval = table.converted("interval", DEFAULT_INTERVAL, _positive_duration, duration)
    flag_scan = table.converted("flag_scan_interval", timedelta(minutes=15), _positive_duration, duration)
    quota_pause = table.converted("quota_pause", timedelta(hours=1), _positive_duration, duration)
    max_bytes = table.converted(
        "max_attachment_bytes",
        DEFAULT_MAX_ATTACHMENT_BYTES,
        _positive_size,
        'a size above 0 like 26214400, "25MB" or "25MiB"',
    )
    attachments = table.string("attachments_dir", None, expected="a directory path")
    return SyncConfig(
        scope=table.choice("scope", SCOPES, "contacts"),
        interval=interval,
        batch_size=table.integer("batch_size", DEFAULT_BATCH_SIZE, 1, MAX_BATCH_SIZE),
        max_attachment_bytes=max_bytes,
        attachments_dir=table.ctx.resolve(attachments) if attachments else state_dir / "attachments",
        flag_scan_interval=flag_scan,
        quota_pause=quota_pause,
        lease=table.converted("lease", timedelta(seconds=30), _positive_duration, duration),
        exclude_addresses=table.converted(
            "exclude_addresses", frozenset(), _address_patterns, 'a list like ["hr@corp.example", "@corp.example"]'
        ),
        exclude_labels=table.converted("exclude_labels", frozenset(), _string_list, 'a list like ["Private"]'),
        parse_workers=table.integer("parse_workers", default_parse_workers(), 0, MAX_PARSE_WORKERS),
        parse_time_limit=table.converted(
            "parse_time_limit",
            DEFAULT_PARSE_TIME_LIMIT,
            _parse_time_limit,
            'a duration from "1s" to "1h", like "60s"',
        ),
        keep_session=table.converted(
            "keep_session",
            DEFAULT_KEEP_SESSION,
            _keep_duration,
            'a duration from "0s" (log out after every sync) to "25m", like "5m"',
        ),
        stall_after=table.converted("stall_after", DEFAULT_STALL_AFTER, _positive_duration, duration),
        parallel_syncs=table.integer("parallel_syncs", DEFAULT_PARALLEL_SYNCS, 1, MAX_PARALLEL_SYNCS),
        parallel_first_syncs=table.integer("parallel_first_syncs", DEFAULT_PARALLEL_FIRST_SYNCS, 1, MAX_PARALLEL_SYNCS),
    )


def default_parse_workers() -> int:
    """One parser process per core but one (the daemon process itself keeps about a core busy in a big sync), at
    most 4, and at least one: on a single core a worker adds copying, but it is also what keeps a hostile message
    from stalling or crashing the daemon (inboxd.parsing). On 2 cores 1 worker syncs as fast as 2 (20k messages:
    20.7 vs 19.9 s SQLite, 25.3 vs 26.5 s PostgreSQL) in 25 MB less."""
    cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 4))


def _string_list(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise TypeError(value)
    return frozenset(v.strip() for v in value)


def _address_patterns(value: Any) -> frozenset[str]:
    """Addresses and "@domain" patterns, lowercased; anything else is a typo worth an error."""
    items = {v.lower() for v in _string_list(value)}
    for item in items:
        _local, at, domain = item.rpartition("@")
        if not at or not domain or "." not in domain or " " in item:
            raise ValueError(item)
    return frozenset(items)


def _positive_duration(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise TypeError(value)
    duration = parse_duration(value)
    if duration <= timedelta(0):
        raise ValueError(value)
    return duration


def _parse_time_limit(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise TypeError(value)
    duration = parse_duration(value)
    if not timedelta(seconds=1) <= duration <= timedelta(hours=1):
        raise ValueError(value)
    return duration


def _keep_duration(value: Any) -> timedelta:
    if not isinstance(value, str):
        raise TypeError(value)
    duration = parse_duration(value)
    if not timedelta(0) <= duration <= MAX_KEEP_SESSION:
        raise ValueError(value)
    return duration


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(value)
    return size


def _providers(table: _Table) -> Mapping[str, ProviderConfig]:
    providers = {}
    for name in table.data:
        providers[name] = _provider(table.table(name), name)
    return MappingProxyType(providers)


_PROVIDER_KEYS = {
    "kind",
    "imap_host",
    "imap_port",
    "imap_tls",
    "smtp_host",
    "smtp_port",
    "smtp_tls",
    "auth",
    "token_uri",
    "tenant",
    "client_id",
    "client_secret",
    "client_secret_file",
    "ca_file",
    "timeout",
    "auth_uri",
    "scopes",
    "revoke_uri",
    "service_account_file",
    "app_only",
}

# Per kind: imap host/port/tls, smtp host/port/tls, auth, token_uri.
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "gmail": {
        "imap_host": "imap.gmail.com",
        "imap_port": 993,
        "imap_tls": "tls",
        "smtp_host": "smtp.gmail.com",
        "smtp_port": 465,
        "smtp_tls": "tls",
        "auth": "oauth2",
        "token_uri": GOOGLE_TOKEN_URI,
        "auth_uri": GOOGLE_AUTH_URI,
        "revoke_uri": GOOGLE_REVOKE_URI,
        "scopes": GMAIL_SCOPES,
    },
    "microsoft": {
        "imap_host": "outlook.office365.com",
        "imap_port": 993,
        "imap_tls": "tls",
        "smtp_host": "smtp.office365.com",
        "smtp_port": 587,
        "smtp_tls": "starttls",
        "auth": "oauth2",
        "token_uri": MICROSOFT_TOKEN_URI.format(tenant="common"),
        "auth_uri": MICROSOFT_AUTH_URI.format(tenant="common"),
        "scopes": MICROSOFT_SCOPES,
    },
    "imap": {"auth": "password"},
}

_PORT_FOR_TLS = {
    "imap": {"tls": 993, "starttls": 143, "plain": 143},
    "smtp": {"tls": 465, "starttls": 587, "plain": 25},
}


def _provider(table: _Table, name: str) -> ProviderConfig:
    table.only(_PROVIDER_KEYS)
    inferred = name if name in PROVIDER_KINDS else _MISSING
    kind: ProviderKind = table.choice("kind", PROVIDER_KINDS, inferred)
    defaults = _KIND_DEFAULTS[kind]

    imap_host = table.host("imap_host", defaults.get("imap_host", _MISSING))
    imap_tls: TlsMode = table.choice("imap_tls", TLS_MODES, defaults.get("imap_tls", "tls"))
    imap_port = table.integer("imap_port", _PORT_FOR_TLS["imap"][imap_tls], 1, 65535)
    _check_plain(table, "imap_tls", imap_tls, imap_host)

    smtp_host = table.host("smtp_host", defaults.get("smtp_host"))
    smtp_port: int | None = None
    smtp_tls: TlsMode | None = None
    if smtp_host is None:
        for key in ("smtp_port", "smtp_tls"):
            if table.has(key):
                raise table.error(key, "is set but smtp_host is not; add smtp_host or remove this key")
    else:
        smtp_mode: TlsMode = table.choice("smtp_tls", TLS_MODES, defaults.get("smtp_tls", "tls"))
        smtp_port = table.integer("smtp_port", _PORT_FOR_TLS["smtp"][smtp_mode], 1, 65535)
        _check_plain(table, "smtp_tls", smtp_mode, smtp_host)
        smtp_tls = smtp_mode

    auth: AuthMethod = table.choice("auth", AUTH_METHODS, defaults["auth"])
    ca_file = None
    if table.has("ca_file"):
        ca_file = table.ctx.resolve(table.string("ca_file", expected="a path to a PEM CA bundle"))
        if not ca_file.is_file():
            raise table.error("ca_file", f"file not found: {ca_file}")
    timeout = table.number(
        "timeout",
        DEFAULT_TIMEOUT,
        high=MAX_TIMEOUT,
        expected=f"a number of seconds above 0, at most {MAX_TIMEOUT:.0f}, like 30",
    )

    token_uri = client_id = client_secret = None
    consent = _Consent()
    if auth == "oauth2":
        token_uri, client_id, client_secret = _oauth_client(table, kind, defaults.get("token_uri"))
        consent = _consent(table, kind, defaults)
    else:
        oauth_only = ("token_uri", "tenant", "client_id", "client_secret", "client_secret_file", *_CONSENT_KEYS)
        for key in oauth_only:
            if table.has(key):
                raise table.error(key, f'is only used with auth = "oauth2" (this provider has "{auth}")')

    return ProviderConfig(
        name=name,
        kind=kind,
        imap_host=imap_host,
        imap_port=imap_port,
        imap_tls=imap_tls,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        smtp_tls=smtp_tls,
        auth=auth,
        token_uri=token_uri,
        client_id=client_id,
        client_secret=client_secret,
        ca_file=ca_file,
        timeout=timeout,
        auth_uri=consent.auth_uri,
        scopes=consent.scopes,
        revoke_uri=consent.revoke_uri,
        service_account_file=consent.service_account_file,
        app_only=consent.app_only,
    )


_CONSENT_KEYS = ("auth_uri", "scopes", "revoke_uri", "service_account_file", "app_only")


@dataclass(frozen=True)
class _Consent:
    auth_uri: str | None = None
    scopes: tuple[str, ...] = ()
    revoke_uri: str | None = None
    service_account_file: Path | None = None
    app_only: bool = False


def _consent(table: _Table, kind: str, defaults: Mapping[str, Any]) -> _Consent:
    """The consent-flow and delegation keys of an OAuth provider."""
    auth_uri = defaults.get("auth_uri")
    if table.has("tenant") and kind == "microsoft":
        auth_uri = MICROSOFT_AUTH_URI.format(tenant=table.data["tenant"])
    expected_url = 'an https:// URL (http:// only on loopback), like "https://accounts.example.com/authorize"'
    auth_uri = table.converted("auth_uri", auth_uri, _endpoint_url, expected_url)
    revoke_uri = table.converted("revoke_uri", defaults.get("revoke_uri"), _endpoint_url, expected_url)
    scopes = table.converted(
        "scopes", tuple(defaults.get("scopes", ())), _scope_list, 'a list of scopes like ["https://mail.google.com/"]'
    )
    service_account = None
    if table.has("service_account_file"):
        if kind != "gmail":
            raise table.error("service_account_file", f'is only used with kind = "gmail" (this provider is "{kind}")')
        service_account = table.ctx.credential(table.string("service_account_file", expected="a file path"))
        if not service_account.is_file():
            raise table.error("service_account_file", f"file not found: {service_account}")
    app_only: bool = table.boolean("app_only", False)
    if app_only and kind != "microsoft":
        raise table.error("app_only", f'is only used with kind = "microsoft" (this provider is "{kind}")')
    return _Consent(auth_uri, scopes, revoke_uri, service_account, app_only)


def _endpoint_url(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    if not _https_or_loopback(_split_url(value.strip())):
        raise ValueError(value)
    return value.strip()


def _scope_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise TypeError(value)
    if not all(isinstance(v, str) and v.strip() and not any(c.isspace() for c in v.strip()) for v in value):
        raise ValueError(value)
    return tuple(dict.fromkeys(v.strip() for v in value))


def _check_plain(table: _Table, key: str, mode: str, host: str) -> None:
    if mode == "plain" and not is_loopback_host(host):
        raise table.error(
            key,
            f'"plain" (no TLS) is only allowed for a loopback host (localhost, 127.0.0.0/8, ::1), '
            f'not {_show(host)}; use "tls" or "starttls"',
        )


def _oauth_client(table: _Table, kind: str, default_uri: str | None) -> tuple[str, str | None, str | None]:
    token_uri: str | None = table.string("token_uri", None, expected='a URL like "https://host/token"')
    if table.has("tenant"):
        if kind != "microsoft":
            raise table.error("tenant", f'is only used with kind = "microsoft" (this provider is "{kind}")')
        if token_uri is not None:
            raise table.error("tenant", "set either tenant or token_uri, not both")
        expected = (
            'a tenant id (GUID), a domain like "contoso.onmicrosoft.com", "common", "organizations" or "consumers"'
        )
        tenant = table.converted("tenant", "common", _tenant, expected)
        default_uri = MICROSOFT_TOKEN_URI.format(tenant=tenant)

    client_id: str | None = table.string("client_id", None)
    client_secret: str | None = table.string("client_secret", None)
    if table.has("client_secret_file"):
        if client_secret is not None:
            raise table.error("client_secret_file", "set client_secret or client_secret_file, not both")
        file_id, client_secret, file_uri = _read_client_secret_file(table)
        if file_id is not None:
            if client_id is not None and client_id != file_id:
                raise table.error("client_id", "differs from the client_id in client_secret_file; remove one of them")
            client_id = file_id
        if token_uri is None and file_uri is not None and not table.has("tenant"):
            token_uri = file_uri

    token_uri = token_uri or default_uri
    if token_uri is None:
        raise table.error("token_uri", 'is required with auth = "oauth2": the OAuth token endpoint URL')
    _check_token_uri(table, token_uri)
    if client_id is None and client_secret is None and table.has("service_account_file"):
        return token_uri, None, None  # domain-wide delegation only: the service account is the client
    if client_id is None:
        raise table.error("client_id", 'is required with auth = "oauth2": the OAuth client (application) id')
    if client_secret is None:
        raise table.error(
            "client_secret_file",
            'is required with auth = "oauth2" (or client_secret): a file holding the OAuth client secret',
        )
    return token_uri, client_id, client_secret


def _display_name(value: Any) -> str:
    """The From name of sent mail, as the outbox will accept it (inboxd.mime.check_from_name), and without any
    encoded word: checked here, so that a bad one is a config error, not every outbox row of the account failing."""
    if not isinstance(value, str) or not value.strip():
        raise TypeError(value)
    if "=?" in value:
        raise ValueError(value)
    try:
        check_from_name(value)
    except InvalidDraft:
        raise ValueError(value) from None
    return value


_TENANT_ALIASES = ("common", "organizations", "consumers")
_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_TENANT_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _tenant(value: Any) -> str:
    """An Entra ID tenant as it goes into the token URL's path: a GUID, a domain ("contoso.onmicrosoft.com") or one
    of Microsoft's aliases. Anything else ("..", "a/b") would change the URL's path, not name a tenant."""
    if not isinstance(value, str):
        raise TypeError(value)
    if value.lower() in _TENANT_ALIASES or _GUID.fullmatch(value):
        return value
    labels = value.split(".")
    if len(value) > 253 or len(labels) < 2 or not all(_TENANT_LABEL.fullmatch(label) for label in labels):
        raise ValueError(value)
    return value


def _check_token_uri(table: _Table, uri: str) -> None:
    key = "token_uri" if table.has("token_uri") else "client_secret_file"
    try:
        parts = _split_url(uri)
    except ValueError:
        raise table.error(key, f"must be an https:// URL, got {_show(uri)}, which cannot be parsed") from None
    if not _https_or_loopback(parts):
        raise table.error(key, f"must be an https:// URL (http:// only on loopback), got {_show(uri)}")


def _read_client_secret_file(table: _Table) -> tuple[str | None, str, str | None]:
    """(client_id or None, client_secret, token_uri or None) from a plain or Google-style JSON file."""
    name = table.string("client_secret_file", expected="a file path")
    file = table.ctx.credential(name)
    try:
        text = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise table.error("client_secret_file", f"file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise table.error("client_secret_file", f"cannot read {file}: {reason}") from None
    if not text:
        raise table.error("client_secret_file", f"{file} is empty")
    if not text.startswith("{"):
        return None, text, None
    expected = (
        f'{file} must be a Google client secret JSON ({{"installed": {{"client_id": ..., '
        f'"client_secret": ...}}}} or "web") or the bare secret'
    )
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise table.error("client_secret_file", f"{file} is not valid JSON; {expected}") from None
    inner = next((data[k] for k in ("installed", "web") if isinstance(data, dict) and k in data), None)
    if not isinstance(inner, dict):
        raise table.error("client_secret_file", expected)
    client_id, secret, uri = (inner.get(k) for k in ("client_id", "client_secret", "token_uri"))
    if not (isinstance(client_id, str) and client_id and isinstance(secret, str) and secret):
        raise table.error("client_secret_file", expected)
    return client_id, secret, uri if isinstance(uri, str) and uri else None


def _accounts(table: _Table) -> Mapping[str, AccountPolicy]:
    accounts: dict[str, AccountPolicy] = {}
    for name, value in table.data.items():
        email = name.strip().lower()
        if not isinstance(value, dict) or not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
            raise table.error(
                name,
                "account keys are email addresses, quoted, with a table of settings: "
                '[accounts."anna@example.com"] paused = true',
            )
        if email in accounts:
            raise table.error(name, f"duplicate account (emails are case-insensitive): {email}")
        account = table.table(name)
        account.only({"paused", "reason", "display_name"})
        accounts[email] = AccountPolicy(
            email=email,
            paused=account.boolean("paused", False),
            reason=account.string("reason", None, expected="a non-empty string (why the account is paused)"),
            display_name=account.converted(
                "display_name",
                None,
                _display_name,
                f"the sender's name: at most {MAX_NAME_CHARS} characters, no control characters or line breaks",
            ),
        )
    return MappingProxyType(accounts)
