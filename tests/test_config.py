"""Config parsing: defaults, provider presets and overrides; every mistake named by file and key."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from inboxd.config import (
    AccountPolicy,
    Config,
    default_parse_workers,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from inboxd.daemon import keep_start_values
from inboxd.errors import ConfigError

GMAIL = """
[providers.gmail]
client_id = "123.apps.googleusercontent.com"
client_secret = "gmail-client-secret"
"""


def parse(tmp_path: Path, text: str, **env: str) -> Config:
    return parse_config(text, path=tmp_path / "inboxd.toml", env=env)


def error(tmp_path: Path, text: str, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, text, **env)
    return info.value


# --- defaults -----------------------------------------------------------------------------------


def test_empty_file_gives_defaults_under_state_dir(tmp_path: Path) -> None:
    config = parse(tmp_path, "")
    state = tmp_path / "var"
    assert config.state_dir == state
    assert config.database.url == f"sqlite:///{state}/inboxd.db"
    assert config.secrets.key_file == state / "secret.key"
    assert config.sync.scope == "contacts"
    assert config.sync.interval == timedelta(minutes=60)
    assert config.sync.batch_size == 200
    assert config.sync.max_attachment_bytes == 25 * 1024 * 1024
    assert config.sync.attachments_dir == state / "attachments"
    assert config.log_level == "info"
    assert dict(config.providers) == {}
    assert config.path == tmp_path / "inboxd.toml"


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    config = parse(tmp_path, "", STATE_DIRECTORY="/var/lib/inboxd:/var/lib/other")
    assert config.state_dir == Path("/var/lib/inboxd")
    assert config.secrets.key_file == Path("/var/lib/inboxd/secret.key")


def test_explicit_state_dir_wins_over_systemd_and_is_relative_to_the_config(tmp_path: Path) -> None:
    config = parse(tmp_path, 'state_dir = "data"', STATE_DIRECTORY="/var/lib/inboxd")
    assert config.state_dir == tmp_path / "data"


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        """
        [database]
        url = "sqlite:///db/inboxd.db"
        [secrets]
        key_file = "keys/secret.key"
        [sync]
        attachments_dir = "files"
        """,
    )
    assert config.database.url == f"sqlite:///{tmp_path}/db/inboxd.db"
    assert config.secrets.key_file == tmp_path / "keys" / "secret.key"
    assert config.sync.attachments_dir == tmp_path / "files"


def test_postgres_url_is_kept_and_its_password_hidden_from_repr(tmp_path: Path) -> None:
    config = parse(tmp_path, '[database]\nurl = "postgresql+psycopg://inboxd:pw123@db:5432/inboxd"')
    assert config.database.url == "postgresql+psycopg://inboxd:pw123@db:5432/inboxd"
    assert "pw123" not in repr(config.database)
    assert "pw123" not in repr(config)


def test_key_file_from_systemd_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secret.key").write_text("k")
    config = parse(tmp_path, '[secrets]\nkey_file = "secret.key"', CREDENTIALS_DIRECTORY=str(creds))
    assert config.secrets.key_file == creds / "secret.key"


def test_key_file_not_in_credentials_directory_falls_back_to_config_dir(tmp_path: Path) -> None:
    config = parse(tmp_path, '[secrets]\nkey_file = "secret.key"', CREDENTIALS_DIRECTORY=str(tmp_path / "x"))
    assert config.secrets.key_file == tmp_path / "secret.key"


def test_sync_settings(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        """
        log_level = "DEBUG"
        [sync]
        scope = "all"
        interval = "1h30m"
        batch_size = 5000
        max_attachment_bytes = "10MiB"
        """,
    )
    assert config.log_level == "debug"
    assert config.sync.scope == "all"
    assert config.sync.interval == timedelta(minutes=90)
    assert config.sync.batch_size == 5000
    assert config.sync.max_attachment_bytes == 10 * 1024 * 1024
    assert config.sync.keep_session == timedelta(minutes=5)
    assert parse(tmp_path, '[sync]\nkeep_session = "0s"').sync.keep_session == timedelta(0)
    assert (config.sync.parallel_syncs, config.sync.parallel_first_syncs) == (4, 2)
    assert config.sync.stall_after == timedelta(minutes=30)
    more = parse(tmp_path, "[sync]\nparallel_syncs = 16\nparallel_first_syncs = 6")
    assert (more.sync.parallel_syncs, more.sync.parallel_first_syncs) == (16, 6)


# --- providers ----------------------------------------------------------------------------------


def test_gmail_preset(tmp_path: Path) -> None:
    gmail = parse(tmp_path, GMAIL).providers["gmail"]
    assert (gmail.kind, gmail.imap_host, gmail.imap_port, gmail.imap_tls) == (
        "gmail",
        "imap.gmail.com",
        993,
        "tls",
    )
    assert (gmail.smtp_host, gmail.smtp_port, gmail.smtp_tls) == ("smtp.gmail.com", 465, "tls")
    assert gmail.auth == "oauth2"
    assert gmail.token_uri == "https://oauth2.googleapis.com/token"
    assert gmail.client_id == "123.apps.googleusercontent.com"
    assert gmail.client_secret == "gmail-client-secret"
    assert gmail.timeout == 30.0
    assert gmail.ca_file is None


def test_gmail_every_default_overridable(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    gmail = parse(
        tmp_path,
        GMAIL
        + """
        imap_host = "127.0.0.1"
        imap_port = 10993
        imap_tls = "plain"
        smtp_host = "localhost"
        smtp_port = 10587
        smtp_tls = "starttls"
        token_uri = "http://127.0.0.1:8080/token"
        ca_file = "ca.pem"
        timeout = 5
        """,
    ).providers["gmail"]
    assert (gmail.imap_host, gmail.imap_port, gmail.imap_tls) == ("127.0.0.1", 10993, "plain")
    assert (gmail.smtp_host, gmail.smtp_port, gmail.smtp_tls) == ("localhost", 10587, "starttls")
    assert gmail.token_uri == "http://127.0.0.1:8080/token"
    assert gmail.ca_file == tmp_path / "ca.pem"
    assert gmail.timeout == 5.0


def test_microsoft_preset_and_tenant(tmp_path: Path) -> None:
    text = """
    [providers.m365]
    kind = "microsoft"
    client_id = "app-id"
    client_secret = "x"
    """
    m365 = parse(tmp_path, text).providers["m365"]
    assert (m365.imap_host, m365.imap_port, m365.imap_tls) == ("outlook.office365.com", 993, "tls")
    assert (m365.smtp_host, m365.smtp_port, m365.smtp_tls) == ("smtp.office365.com", 587, "starttls")
    assert m365.token_uri == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    tenant = parse(tmp_path, text + 'tenant = "contoso.onmicrosoft.com"').providers["m365"]
    assert tenant.token_uri == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"


M365 = """
[providers.m365]
kind = "microsoft"
client_id = "app-id"
client_secret = "x"
"""


@pytest.mark.parametrize(
    "tenant", ["common", "organizations", "consumers", "72f988bf-86f1-41af-91ab-2d7cd011db47", "corp-1.example.com"]
)
def test_tenant_takes_ids_domains_and_aliases(tmp_path: Path, tenant: str) -> None:
    m365 = parse(tmp_path, M365 + f'tenant = "{tenant}"').providers["m365"]
    assert m365.token_uri == f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
    assert m365.auth_uri == f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize"


@pytest.mark.parametrize("tenant", ["..", ".", "a..b.com", ".example.com", "example.com.", "-x.example.com", "corp"])
def test_tenant_that_would_change_the_token_urls_path_is_an_error(tmp_path: Path, tenant: str) -> None:
    """ ".." made the token URL https://login.microsoftonline.com/../oauth2/v2.0/token: not a tenant at all."""
    exc = error(tmp_path, M365 + f'tenant = "{tenant}"')
    assert exc.key == "providers.m365.tenant"
    assert f'a domain like "contoso.onmicrosoft.com", "common", "organizations" or "consumers", got "{tenant}"' in str(
        exc
    )


def test_return_to_origins_drop_the_default_port(tmp_path: Path) -> None:
    """https://hr.example.com:443 is the origin https://hr.example.com, which browsers and HR apps send; kept as
    written it never matched."""
    text = (
        '[http]\nreturn_to_origins = ["https://HR.example.com:443", "http://127.0.0.1:80/", '
        '"https://hr2.example.com:8443", "http://[::1]:80"]'
    )
    assert parse(tmp_path, text).http.return_to_origins == frozenset(
        {"https://hr.example.com", "http://127.0.0.1", "https://hr2.example.com:8443", "http://[::1]"}
    )


def test_generic_imap_provider_defaults(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        """
        [providers.office]
        kind = "imap"
        imap_host = "mail.example.com"
        [providers.dev]
        kind = "imap"
        imap_host = "::1"
        imap_tls = "plain"
        smtp_host = "127.0.0.1"
        smtp_tls = "plain"
        """,
    )
    office, dev = config.providers["office"], config.providers["dev"]
    assert (office.imap_port, office.imap_tls, office.auth) == (993, "tls", "password")
    assert (office.smtp_host, office.smtp_port, office.smtp_tls) == (None, None, None)
    assert (office.token_uri, office.client_id, office.client_secret) == (None, None, None)
    assert (dev.imap_port, dev.smtp_port) == (143, 25)


@pytest.mark.parametrize(
    ("given", "host"),
    [
        ("mail.example.com", "mail.example.com"),
        ("mail.example.com.", "mail.example.com."),
        ("[::1]", "::1"),
        (" ::1 ", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("imap_1.corp", "imap_1.corp"),
        ("[fe80::1%eth0]", "fe80::1%eth0"),
    ],
)
def test_a_host_is_what_a_socket_connects_to(tmp_path: Path, given: str, host: str) -> None:
    text = f'[providers.dev]\nkind = "imap"\nimap_host = "{given}"\nimap_tls = "tls"\nsmtp_host = "{given}"'
    provider = parse(tmp_path, text).providers["dev"]
    assert (provider.imap_host, provider.smtp_host) == (host, host)


@pytest.mark.parametrize(
    "given",
    [
        "[::1",
        "::1]",
        "imap.example.com:993",
        "127.0.0.1:143",
        "a..b",
        "-a.example",
        "a-.example",
        "[127.0.0.1]",
        "x" * 64 + ".example",
        "[]",
        "",
        ".",
        "mail.example.com/imap",
        "1:2:3",
    ],
)
def test_a_host_that_no_socket_could_connect_to_is_a_config_error(tmp_path: Path, given: str) -> None:
    with pytest.raises(ConfigError, match=r"providers\.dev\.imap_host: must be a host name or IP address"):
        parse(tmp_path, f'[providers.dev]\nkind = "imap"\nimap_host = "{given}"')


@pytest.mark.parametrize("value", ['"0s"', '"2h"', "60", '"soon"'])
def test_parse_time_limit_is_a_duration_from_a_second_to_an_hour(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"sync\.parse_time_limit: must be a duration from \"1s\" to \"1h\""):
        parse(tmp_path, f"[sync]\nparse_time_limit = {value}")
    assert parse(tmp_path, '[sync]\nparse_time_limit = "2m"').sync.parse_time_limit == timedelta(minutes=2)


@pytest.mark.parametrize(("cores", "workers"), [(None, 1), (1, 1), (2, 1), (3, 2), (16, 4)])
def test_there_is_a_parser_worker_even_on_one_core(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, workers: int
) -> None:
    """On one core a worker adds copying, but it is what keeps a hostile message from stalling or crashing the
    daemon (the time limit, the crash isolation): one at least."""
    monkeypatch.setattr("inboxd.config.os.cpu_count", lambda: cores)
    assert default_parse_workers() == workers


def test_client_secret_never_in_repr(tmp_path: Path) -> None:
    config = parse(tmp_path, GMAIL)
    assert "gmail-client-secret" not in repr(config.providers["gmail"])
    assert "gmail-client-secret" not in repr(config)


def test_client_secret_file_plain_text(tmp_path: Path) -> None:
    (tmp_path / "gmail.secret").write_text("  file-secret\n")
    config = parse(tmp_path, '[providers.gmail]\nclient_id = "cid"\nclient_secret_file = "gmail.secret"')
    assert config.providers["gmail"].client_secret == "file-secret"


@pytest.mark.parametrize("flavour", ["installed", "web"])
def test_client_secret_file_google_json(tmp_path: Path, flavour: str) -> None:
    secret = {
        flavour: {
            "client_id": "json-cid",
            "client_secret": "json-secret",
            "token_uri": "https://t.example/tok",
        }
    }
    (tmp_path / "client_secret.json").write_text(json.dumps(secret))
    gmail = parse(tmp_path, '[providers.gmail]\nclient_secret_file = "client_secret.json"').providers["gmail"]
    assert (gmail.client_id, gmail.client_secret) == ("json-cid", "json-secret")
    assert gmail.token_uri == "https://t.example/tok"


def test_client_secret_file_from_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gmail.secret").write_text("from-systemd")
    config = parse(
        tmp_path,
        '[providers.gmail]\nclient_id = "cid"\nclient_secret_file = "gmail.secret"',
        CREDENTIALS_DIRECTORY=str(creds),
    )
    assert config.providers["gmail"].client_secret == "from-systemd"


# --- accounts -----------------------------------------------------------------------------------


def test_account_policy_lowercased_and_defaulting_to_unpaused(tmp_path: Path) -> None:
    config = parse(
        tmp_path,
        """
        [accounts."Anna.Smith@Example.com"]
        paused = true
        reason = "parental leave until March"
        """,
    )
    assert list(config.accounts) == ["anna.smith@example.com"]
    assert config.policy_for("ANNA.SMITH@example.COM") == AccountPolicy(
        email="anna.smith@example.com", paused=True, reason="parental leave until March"
    )
    assert config.policy_for("Bob@Example.com") == AccountPolicy(email="bob@example.com", paused=False)


# --- errors: every one names file and key -------------------------------------------------------


def test_bad_port_message_names_file_key_expectation_and_value(tmp_path: Path) -> None:
    exc = error(tmp_path, GMAIL + 'imap_port = "abc"')
    assert exc.path == str(tmp_path / "inboxd.toml")
    assert exc.key == "providers.gmail.imap_port"
    assert str(exc) == f'{tmp_path}/inboxd.toml: providers.gmail.imap_port: must be an integer 1-65535, got "abc"'


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("state_dir = 3", "state_dir", "must be a directory path, got 3"),
        ('log_level = "loud"', "log_level", "one of debug, info"),
        ('[database]\nurl = "inboxd.db"', "database.url", "database URL"),
        ("database = 5", "database", "must be a table"),
        ('[sync]\nscope = "everything"', "sync.scope", 'one of "all" or "contacts", got "everything"'),
        ('[sync]\ninterval = "soon"', "sync.interval", 'a duration like "30s"'),
        ("[sync]\ninterval = 60", "sync.interval", "got 60"),
        ('[sync]\ninterval = "0s"', "sync.interval", 'got "0s"'),
        ('[sync]\nkeep_session = "30m"', "sync.keep_session", 'to "25m"'),
        ("[sync]\nkeep_session = 300", "sync.keep_session", "got 300"),
        ("[sync]\nbatch_size = 0", "sync.batch_size", "an integer 1-5000, got 0"),
        ("[sync]\nparallel_syncs = 0", "sync.parallel_syncs", "an integer 1-32, got 0"),
        ("[sync]\nparallel_first_syncs = 33", "sync.parallel_first_syncs", "an integer 1-32, got 33"),
        ('[sync]\nstall_after = "soon"', "sync.stall_after", 'a duration like "30s"'),
        ("[sync]\nbatch_size = 5001", "sync.batch_size", "an integer 1-5000, got 5001"),
        ("[sync]\nbatch_size = true", "sync.batch_size", "got true"),
        ('[sync]\nmax_attachment_bytes = "lots"', "sync.max_attachment_bytes", 'got "lots"'),
        ("[sync]\nmax_attachment_bytes = 0", "sync.max_attachment_bytes", "got 0"),
        ('[providers.corp]\nimap_host = "x"', "providers.corp.kind", "is required"),
        ('[providers.corp]\nkind = "exchange"', "providers.corp.kind", '"gmail" or "microsoft" or "imap"'),
        ('[providers.corp]\nkind = "imap"', "providers.corp.imap_host", "is required"),
        ('[providers.corp]\nkind = "imap"\nimap_host = "a b"', "providers.corp.imap_host", "host name"),
        (
            '[providers.corp]\nkind = "imap"\nimap_host = "h"\nsmtp_port = 25',
            "providers.corp.smtp_port",
            "smtp_host is not",
        ),
        (GMAIL + "imap_port = 70000", "providers.gmail.imap_port", "got 70000"),
        (GMAIL + 'imap_tls = "ssl"', "providers.gmail.imap_tls", 'got "ssl"'),
        (GMAIL + 'imap_tls = "plain"', "providers.gmail.imap_tls", 'not "imap.gmail.com"'),
        (GMAIL + 'smtp_tls = "plain"', "providers.gmail.smtp_tls", 'not "smtp.gmail.com"'),
        (
            GMAIL + 'imap_host = "127.0.0.1.evil.com"\nimap_tls = "plain"',
            "providers.gmail.imap_tls",
            "loopback",
        ),
        (GMAIL + "timeout = 0", "providers.gmail.timeout", "above 0"),
        # what socket.settimeout cannot take crashed every connection with OverflowError
        (GMAIL + "timeout = inf", "providers.gmail.timeout", "at most 3600, like 30, got inf"),
        (GMAIL + "timeout = 1e10", "providers.gmail.timeout", "at most 3600, like 30, got 10000000000.0"),
        (GMAIL + "timeout = 3601", "providers.gmail.timeout", "at most 3600, like 30, got 3601"),
        (GMAIL + "timeout = nan", "providers.gmail.timeout", "at most 3600, like 30, got nan"),
        (GMAIL + 'ca_file = "missing.pem"', "providers.gmail.ca_file", "file not found"),
        (GMAIL + 'token_uri = "http://oauth.example.com/token"', "providers.gmail.token_uri", "https://"),
        (GMAIL + 'tenant = "x"', "providers.gmail.tenant", 'only used with kind = "microsoft"'),
        (GMAIL + 'client_secret_file = "f"', "providers.gmail.client_secret_file", "not both"),
        (GMAIL + 'auth = "password"', "providers.gmail.client_id", 'only used with auth = "oauth2"'),
        ('[providers.gmail]\nclient_secret = "s"', "providers.gmail.client_id", "is required"),
        ('[providers.gmail]\nclient_id = "c"', "providers.gmail.client_secret_file", "is required"),
        (
            '[providers.gmail]\nclient_id = "c"\nclient_secret_file = "nope"',
            "providers.gmail.client_secret_file",
            "file not found",
        ),
        (
            '[providers.m365]\nkind = "microsoft"\nclient_id = "c"\nclient_secret = "s"\ntenant = "a/b"',
            "providers.m365.tenant",
            "tenant id",
        ),
        (
            '[providers.corp]\nkind = "imap"\nimap_host = "h"\nauth = "oauth2"\nclient_id = "c"\nclient_secret = "s"',
            "providers.corp.token_uri",
            "is required",
        ),
        ('[accounts."anna"]\npaused = true', "accounts.anna", "email addresses"),
        ('[accounts."a@b.c"]\npaused = "yes"', 'accounts."a@b.c".paused', 'true or false, got "yes"'),
        ('[accounts."a@b.c"]\nreason = ""', 'accounts."a@b.c".reason', "non-empty"),
        ('accounts."a@b.c" = true', 'accounts."a@b.c"', "email addresses"),
        ('[accounts."A@b.c"]\n[accounts."a@b.c"]', 'accounts."a@b.c"', "duplicate account"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    exc = error(tmp_path, text)
    assert exc.path == str(tmp_path / "inboxd.toml")
    assert exc.key == key
    assert str(exc).startswith(f"{tmp_path}/inboxd.toml: {key}: ")
    assert fragment in str(exc)
    assert "gmail-client-secret" not in str(exc)


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [
        ("log_levl = 'info'", "log_levl", '"log_level"'),
        ("[sync]\nbatchsize = 10", "sync.batchsize", '"batch_size"'),
        (GMAIL + "imap_prot = 993", "providers.gmail.imap_prot", '"imap_port"'),
        ('[accounts."a@b.c"]\npause = true', 'accounts."a@b.c".pause', '"paused"'),
    ],
)
def test_unknown_key_suggests_the_close_one(tmp_path: Path, text: str, key: str, suggestion: str) -> None:
    exc = error(tmp_path, text)
    assert exc.key == key
    assert f"unknown key; did you mean {suggestion}?" in str(exc)


def test_unknown_key_far_from_any_lists_the_known_ones(tmp_path: Path) -> None:
    exc = error(tmp_path, "[secrets]\nzzz = 1")
    assert "unknown key; known keys: key_file" in str(exc)


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    exc = error(tmp_path, 'state_dir = "x"\nlog_level = \n')
    assert exc.path == str(tmp_path / "inboxd.toml")
    assert "TOML syntax error" in str(exc)
    assert "line 2, column 13" in str(exc)


def test_bad_client_secret_json_is_explained(tmp_path: Path) -> None:
    (tmp_path / "cs.json").write_text(json.dumps({"other": {}}))
    exc = error(tmp_path, '[providers.gmail]\nclient_secret_file = "cs.json"')
    assert exc.key == "providers.gmail.client_secret_file"
    assert '"installed"' in str(exc)


def test_client_id_conflicting_with_json_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cs.json").write_text(json.dumps({"installed": {"client_id": "a", "client_secret": "s"}}))
    exc = error(tmp_path, '[providers.gmail]\nclient_id = "b"\nclient_secret_file = "cs.json"')
    assert exc.key == "providers.gmail.client_id"


# --- load_config --------------------------------------------------------------------------------


def test_load_config_from_argument_and_from_env(tmp_path: Path) -> None:
    path = tmp_path / "inboxd.toml"
    path.write_text('[sync]\nscope = "all"\n')
    assert load_config(path, env={}).sync.scope == "all"
    assert load_config(env={"INBOXD_CONFIG": str(path)}).path == path


def test_load_config_without_a_path_says_how_to_pass_one() -> None:
    with pytest.raises(ConfigError, match=r"pass --config .* or set INBOXD_CONFIG"):
        load_config(env={})


def test_load_config_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config(tmp_path / "nope.toml", env={})


def test_example_config_in_repository_is_valid(tmp_path: Path) -> None:
    """config/inboxd.toml documents every key; it must parse as shipped (secret files stubbed)."""
    example = Path(__file__).parent.parent / "config" / "inboxd.toml"
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("gmail-client-secret", "microsoft-client-secret"):
        (creds / name).write_text("stub-secret")
    config = parse_config(example.read_text(), path=example, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert set(config.providers) >= {"gmail", "microsoft"}
    assert config.policy_for("anna.smith@example.com").paused


# --- parsers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("60m", timedelta(minutes=60)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(minutes=90)),
        (" 2H 5M ", timedelta(hours=2, minutes=5)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "60", "m", "5x", "1.5h", "-5m", "5m x", "x5m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1234, 1234),
        ("1234", 1234),
        ("512B", 512),
        ("500KB", 500_000),
        ("25MB", 25_000_000),
        ("1GB", 1_000_000_000),
        ("4KiB", 4096),
        ("10MiB", 10 * 1024 * 1024),
        ("1 GiB", 1024**3),
        ("1.5mib", 1572864),
    ],
)
def test_parse_size(value: str | int, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "MB", "25 MBs", "-1", "ten", -1, True])
def test_parse_size_rejects(value: str | int) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)


def test_sync_exclusions_are_parsed_and_validated(tmp_path: Path) -> None:
    """[sync] exclude_addresses / exclude_labels: lowercased address and @domain patterns; typos named."""
    cfg = parse_config(
        '[sync]\nexclude_addresses = ["HR@Corp.example", "@corp.example"]\nexclude_labels = ["Private"]\n',
        path=tmp_path / "inboxd.toml",
        env={},
    )
    assert cfg.sync.exclude_addresses == frozenset({"hr@corp.example", "@corp.example"})
    assert cfg.sync.exclude_labels == frozenset({"Private"})
    with pytest.raises(ConfigError, match=r"sync\.exclude_addresses"):
        parse_config('[sync]\nexclude_addresses = ["corp.example"]\n', path=tmp_path / "inboxd.toml", env={})
    with pytest.raises(ConfigError, match=r"sync\.exclude_labels"):
        parse_config("[sync]\nexclude_labels = 3\n", path=tmp_path / "inboxd.toml", env={})


# --- [http] ---------------------------------------------------------------------------------------


def test_http_listens_on_loopback_9810_by_default(tmp_path: Path) -> None:
    assert parse(tmp_path, "").http.listen == ("127.0.0.1", 9810)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ('"127.0.0.1:9100"', ("127.0.0.1", 9100)),
        ('"localhost:0"', ("localhost", 0)),
        ('"[::1]:9810"', ("::1", 9810)),
        ('"off"', None),
    ],
)
def test_http_listen_values(tmp_path: Path, listen: str, expected: tuple[str, int] | None) -> None:
    assert parse(tmp_path, f"[http]\nlisten = {listen}").http.listen == expected


@pytest.mark.parametrize("listen", ['"9810"', '"127.0.0.1"', '"127.0.0.1:70000"', '"[nope]:9810"', "9810", '""'])
def test_bad_http_listen_names_the_key(tmp_path: Path, listen: str) -> None:
    err = error(tmp_path, f"[http]\nlisten = {listen}")
    assert err.key == "http.listen"
    assert '"host:port"' in str(err)


def test_http_beyond_loopback_needs_allow_remote(tmp_path: Path) -> None:
    err = error(tmp_path, '[http]\nlisten = "0.0.0.0:9810"')
    assert err.key == "http.listen"
    assert "allow_remote = true" in str(err)
    config = parse(tmp_path, '[http]\nlisten = "0.0.0.0:9810"\nallow_remote = true')
    assert config.http.listen == ("0.0.0.0", 9810)
    assert config.http.allow_remote is True


# --- reload --------------------------------------------------------------------------------------


def test_a_reload_keeps_what_only_a_restart_applies_and_names_it(tmp_path: Path) -> None:
    """The daemon built its database engine, secrets key, HTTP listener, blob store, parser processes and lease
    holder at start: a reloaded config that changes those keeps their running values (the log names the keys),
    and everything else in it applies."""
    running = parse(tmp_path, '[sync]\nscope = "contacts"\n')
    token = tmp_path / "api.token"
    token.write_text("a" * 40)
    token.chmod(0o600)
    changed = parse(
        tmp_path,
        '[sync]\nscope = "all"\nattachments_dir = "/srv/files"\nparse_workers = 3\nlease = "90s"\n'
        'parse_time_limit = "5m"\n'
        '[database]\nurl = "sqlite:////srv/other.db"\n'
        f'[http]\nlisten = "127.0.0.1:9999"\napi_token_file = "{token}"\n'
        'return_to_origins = ["https://hr.example.com"]\n',
    )
    keys, applied = keep_start_values(running, changed)
    assert keys == [
        "database.url",
        "http.listen",
        "sync.attachments_dir",
        "sync.parse_workers",
        "sync.parse_time_limit",
        "sync.lease",
    ]
    assert applied.http.listen == running.http.listen
    # the rest of those sections applies: the HR app's token and origins are read per request
    assert applied.http.api_token == "a" * 40
    assert applied.http.return_to_origins == frozenset({"https://hr.example.com"})
    assert applied.database == running.database
    assert applied.sync.attachments_dir == running.sync.attachments_dir
    assert applied.sync.parse_workers == running.sync.parse_workers
    assert applied.sync.parse_time_limit == running.sync.parse_time_limit == timedelta(seconds=60)
    assert applied.sync.lease == running.sync.lease
    assert applied.sync.scope == "all", "the rest of the reloaded config applies"
    same, untouched = keep_start_values(running, parse(tmp_path, '[sync]\nscope = "all"\n'))
    assert same == []
    assert untouched.sync.scope == "all"


# --- values no simple type check catches (found by a review of bad input) ---------------------------


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('[sync]\ninterval = "9999999999d"', "sync.interval", "at most 3650d"),
        ('[sync]\nquota_pause = "99999999d"', "sync.quota_pause", "at most 3650d"),
        ('[sync]\nlease = "99999999d"', "sync.lease", "at most 3650d"),
        ('[sync]\ninterval = "\u0661\u0662s"', "sync.interval", "got"),
        ('[sync]\nmax_attachment_bytes = "' + "9" * 400 + '"', "sync.max_attachment_bytes", "must be"),
        ("[sync]\nmax_attachment_bytes = 9007199254740993", "sync.max_attachment_bytes", "must be"),
        ('[sync]\nattachments_dir = "a\\u0000b"', "sync.attachments_dir", "must be a directory path"),
        ('state_dir = "x\\u0000y"', "state_dir", "must be a directory path"),
        ('[database]\nurl = "postgresql ://u@h/db"', "database.url", "SQLAlchemy cannot use this one"),
        ('[database]\nurl = "postgresql+psycopg://u@h:5432x/hr"', "database.url", "SQLAlchemy cannot use this one"),
        ('[database]\nurl = "postgresql+psycopg3://u@h/db"', "database.url", "SQLAlchemy cannot use this one"),
        ('[database]\nurl = "sqlitex://foo"', "database.url", "SQLAlchemy cannot use this one"),
        ('[database]\nurl = "postgresql+psycopg://u@h:99999/hr"', "database.url", "its port is not 1-65535"),
        ('[http]\npublic_url = "https://inboxd.example.com:abc"', "http.public_url", "must be"),
        ('[http]\npublic_url = "https://inboxd.example.com:99999"', "http.public_url", "must be"),
        ('[http]\nreturn_to_origins = ["https://hr.example.com:abc"]', "http.return_to_origins", "must be"),
        (GMAIL + 'token_uri = "https://[oops/token"', "providers.gmail.token_uri", "must be"),
        (GMAIL + 'token_uri = "https://oauth2.example.com:70000/token"', "providers.gmail.token_uri", "must be"),
    ],
)
def test_values_that_used_to_raise_deep_inside_are_config_errors_naming_the_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    err = error(tmp_path, text)
    assert err.key == key, str(err)
    assert message in str(err)


def test_a_path_with_an_unknown_users_home_is_a_config_error(tmp_path: Path) -> None:
    err = error(tmp_path, '[sync]\nattachments_dir = "~nosuchuser-inboxd/att"')
    assert "no such user's home directory" in str(err)


def test_a_state_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    err = error(tmp_path, 'state_dir = "afile"')
    assert err.key == "state_dir"
    assert "is not a directory" in str(err)


def test_a_deeply_nested_client_secret_file_is_not_valid_json(tmp_path: Path) -> None:
    secret = tmp_path / "client.json"
    secret.write_text('{"installed":' + "[" * 200_000)
    text = f'[providers.gmail]\nclient_id = "1.apps.googleusercontent.com"\nclient_secret_file = "{secret}"'
    err = error(tmp_path, text)
    assert err.key == "providers.gmail.client_secret_file"
    assert "not valid JSON" in str(err)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg//inboxd:s3cretPW@db.internal/hr",
        "postgresql+psycopg3://inboxd:s3cretPW@db/hr",
        "postgresql+nosuch://inboxd:s3cret/PW@db/hr",
        "postgresql+psycopg3://db/hr?password=s3cretPW",
        "postgresql+psycopg://inboxd:s3cretPW@db:99999/hr",
    ],
)
def test_a_bad_database_url_is_refused_without_showing_it(tmp_path: Path, url: str) -> None:
    """The URL may hold a password in forms no redaction foresees (a '/' in it, a query parameter): an error
    names its scheme at most."""
    err = error(tmp_path, f'[database]\nurl = "{url}"')
    assert err.key == "database.url"
    assert "s3cret" not in str(err)


@pytest.mark.parametrize("name", ["x" * 201, "Rita\\u0000R", "Rita\\nR", "=?utf-8?q?Rita=0D=0AX:_1?="])
def test_a_display_name_the_outbox_would_refuse_is_a_config_error(tmp_path: Path, name: str) -> None:
    """Else every outbox row of the account would fail on it."""
    err = error(tmp_path, f'[accounts."rita@corp.example"]\ndisplay_name = "{name}"')
    assert err.key == 'accounts."rita@corp.example".display_name'
