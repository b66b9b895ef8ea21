"""The end-of-run secret scan (tests/secret_scan.py) finds a secret in captured output and in log files."""

from __future__ import annotations

from pathlib import Path

from secret_scan import find_leaks


def test_finds_secrets_in_output_and_files_and_names_no_secret(tmp_path: Path) -> None:
    secret = "1//abcdefghijklmnopqrstuvwxyz"
    (tmp_path / "inboxd.log").write_text(f"token={secret}\n")
    (tmp_path / "clean.log").write_text("nothing here\n")
    hits = find_leaks(
        {secret, "short"},
        [("test_x (stderr)", f"oops {secret}"), ("test_y", "fine")],
        [
            tmp_path / "inboxd.log",
            tmp_path / "clean.log",
        ],
    )
    assert len(hits) == 2
    assert hits[0].startswith("test_x (stderr)")
    assert str(tmp_path / "inboxd.log") in hits[1]
    assert all(secret not in hit for hit in hits)


def test_nothing_found_in_clean_logs(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text("all good")
    assert find_leaks({"ya29.verysecrettoken"}, [("t", "fine")], [tmp_path / "a.log"]) == []
