"""inboxd's benchmarks (issue #8): B1, B2 and B5 here, B3/B4/B6 from bench/live.py when it exists; one table.

Run through bench/run, which starts the mail stack and PostgreSQL first. Rows and the JSON shape: report.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cases import Cases, flatness
from report import Row, read_json, table, write_json
from stack import Bench

HERE = Path(__file__).resolve().parent
OURS = ("B1", "B2", "B5")
LIVE = ("B3", "B4", "B6")
FULL_SIZES = (20_000, 100_000)
QUICK_SIZES = (2_000, 5_000)
B2_SMALL = 1_000


def _sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 20000,100000, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {value!r}")
    return sizes


def _only(value: str) -> frozenset[str]:
    names = frozenset(v.strip().upper() for v in value.split(",") if v.strip())
    unknown = names - set(OURS) - set(LIVE)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {', '.join(sorted(unknown))}: B1-B6")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"small sizes ({QUICK_SIZES}): a smoke run in minutes")
    parser.add_argument("--sizes", type=_sizes, help=f"B1 sizes, comma-separated (default {FULL_SIZES})")
    parser.add_argument("--only", type=_only, help="comma-separated subset of B1,B2,B3,B4,B5,B6")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--seed", type=int, default=8, help="the message generator's seed")
    parser.add_argument("--keep", action="store_true", help="keep the scratch databases, logs and Maildirs")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("INBOXD_BENCH_DIR", "/var/tmp/inboxd-bench")),  # noqa: S108 (root's, kept across runs)
        help="scratch and cache directory (the generated message pool is kept under it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = args.only or frozenset(OURS + LIVE)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    work = args.work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    cases = Cases(Bench(work, args.work / "cache"), seed_value=args.seed, keep=args.keep)
    print(f"bench: inboxd {revision()}", flush=True)
    print(f"bench: {machine()}; sizes {','.join(map(str, sizes))}; {', '.join(sorted(only))}", flush=True)
    rows: list[Row] = []
    started = time.monotonic()
    if "B2" in only and min(sizes) > B2_SMALL:
        rows += cases.b2_only(B2_SMALL)
    if only & {"B1", "B2"}:
        for size in sizes:
            rows += cases.b1_b2(size, b1="B1" in only, b2="B2" in only)
            print(table(rows), flush=True)
    if "B5" in only:
        rows += cases.b5(max(sizes))
    rows += flatness(rows)
    if only & set(LIVE):
        rows += live(only & set(LIVE), quick=args.quick, work=work)
    rows.sort(key=lambda r: (r.bench, _size_of(r.case)))
    print(f"\nbench: done in {time.monotonic() - started:.0f} s ({machine()})\n")
    print(table(rows))
    if args.json:
        write_json(rows, args.json)
    if not args.keep:
        shutil.rmtree(work)
    return 0


def _size_of(case: str) -> int:
    head = case.split(maxsplit=1)[0].split("->", maxsplit=1)[0]
    return int(head) if head.isdigit() else 0


def live(selected: frozenset[str], *, quick: bool, work: Path) -> list[Row]:
    """B3 push latency, B4 outbox latency, B6 idle accounts: bench/live.py, same flags and JSON rows."""
    script = HERE / "live.py"
    if not script.exists():
        print("bench: bench/live.py not there yet: B3, B4, B6 skipped", flush=True)
        return []
    out = work / "live.json"
    cmd = [sys.executable, str(script), "--json", str(out), "--only", ",".join(sorted(selected))]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, check=False)  # noqa: S603
    if proc.returncode != 0 or not out.exists():
        print(f"bench: bench/live.py failed ({proc.returncode}): its rows are missing", flush=True)
        return [Row(b, "live.py", "failed", proc.returncode, "exit", "0", False) for b in sorted(selected)]
    return read_json(out)


def revision() -> str:
    """The commit benchmarked, and whether daemon/ had uncommitted changes (the checkout is shared)."""
    repo = HERE.parent
    git = shutil.which("git") or "git"
    sha = subprocess.run([git, "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=False)  # noqa: S603
    dirty = subprocess.run(  # noqa: S603
        [git, "status", "--porcelain", "--", "daemon"], cwd=repo, capture_output=True, text=True, check=False
    )
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return sha.stdout.strip() + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
