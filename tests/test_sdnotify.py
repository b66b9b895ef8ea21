"""sd_notify: the exact datagrams on a real AF_UNIX socket the test owns (path and abstract), the no-op without
$NOTIFY_SOCKET, $WATCHDOG_USEC/$WATCHDOG_PID parsing, and `inboxd run` as a process speaking it to "systemd"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from inboxd.sdnotify import Notifier, watchdog_interval

INBOXD = str(Path(sys.executable).with_name("inboxd"))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_as_one_datagram_each_on_a_path_socket(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.ready("first sync cycle running")
    assert notifier.status("2 accounts ok, 0 failed; outbox depth 3")
    assert notifier.stopping()
    assert _receive(listener) == "READY=1\nSTATUS=first sync cycle running"
    assert _receive(listener) == "STATUS=2 accounts ok, 0 failed; outbox depth 3"
    assert _receive(listener) == "STOPPING=1\nSTATUS=stopping"


def test_abstract_socket_name_starting_with_at_is_reached() -> None:
    name = f"inboxd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier("@" + name).notify("READY=1")
        assert _receive(sock) == "READY=1"


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None, "no socket, no watchdog to feed"
    with capture_logs() as logs:
        assert not notifier.ready("x")
        assert not notifier.watchdog()
    assert logs == []


def test_a_vanished_socket_never_raises_and_warns_once(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    with capture_logs() as logs:
        assert not notifier.status("a")
        assert not notifier.status("b")
    assert [e["event"] for e in logs] == ["sdnotify.send_failed"]
    assert logs[0]["log_level"] == "warning"


def test_relative_socket_address_is_refused_with_a_warning() -> None:
    with capture_logs() as logs:
        notifier = Notifier("vsock:2:1234")
        assert not notifier.notify("READY=1")
    assert not notifier.enabled
    assert [e["event"] for e in logs] == ["sdnotify.unsupported_socket"]


def test_watchdog_pings_are_throttled_to_a_quarter_of_the_interval(listener: socket.socket) -> None:
    now = [100.0]
    notifier = Notifier(listener.getsockname(), 8.0, monotonic=lambda: now[0])
    assert notifier.watchdog()
    now[0] += 1.9
    assert not notifier.watchdog(), "within interval/4 of the last ping"
    now[0] += 0.1
    assert notifier.watchdog()
    assert _receive(listener) == "WATCHDOG=1"
    assert _receive(listener) == "WATCHDOG=1"
    listener.settimeout(0.2)
    with pytest.raises(TimeoutError):
        listener.recv(4096)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "x"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_from_environment(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_inboxd_run_reports_ready_status_watchdog_and_stopping_then_exits_0_on_sigterm(
    tmp_path: Path, listener: socket.socket
) -> None:
    """The service contract with systemd, end to end: no accounts, SQLite, a 2 s watchdog."""
    config = tmp_path / "inboxd.toml"
    config.write_text(
        f'state_dir = "{tmp_path}"\n[database]\nurl = "sqlite:///{tmp_path}/inboxd.db"\n'
        f'[secrets]\nkey_file = "{tmp_path}/secret.key"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "INBOXD_"))}
    env["INBOXD_CONFIG"] = str(config)
    for args in (["secrets", "init"], ["db", "upgrade"]):
        subprocess.run([INBOXD, *args], env=env, check=True, capture_output=True)
    env |= {"NOTIFY_SOCKET": listener.getsockname(), "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen([INBOXD, "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = [_receive(listener) for _ in range(3)]
        assert seen[0] == "READY=1\nSTATUS=first sync cycle running"
        # the first round's status and the loop's first ping, in either order
        assert sorted(seen[1:]) == ["STATUS=0 accounts ok, 0 failed; outbox depth 0", "WATCHDOG=1"]
        assert _receive(listener) == "WATCHDOG=1", "pinged again within the 2 s interval"
        proc.send_signal(signal.SIGHUP)  # ExecReload=: the config is read again, systemd is told so
        while (message := _receive(listener)) == "WATCHDOG=1":
            pass
        assert message.startswith("RELOADING=1\nMONOTONIC_USEC=")
        while (message := _receive(listener)) == "WATCHDOG=1":
            pass
        assert message == "READY=1\nSTATUS=config reloaded"
        assert proc.poll() is None, "SIGHUP did not kill the daemon"
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        while (message := _receive(listener)).startswith(("WATCHDOG=1", "STATUS=")):
            pass
        assert message == "STOPPING=1\nSTATUS=stopping"
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert '"event": "daemon.reloaded"' in stderr
