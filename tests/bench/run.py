"""``bin/bench``: run benchmark scenarios and print mailroom against its anchor, side by side."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from tests.bench import cold_start, imap, memory, outbound, pop3, smtp_inbound

SCENARIOS: dict[str, Callable[..., list[smtp_inbound.Row]]] = {
    "smtp-inbound": smtp_inbound.run,
    "imap": imap.run,
    "pop3": pop3.run,
    "outbound": outbound.run,
    "cold-start": cold_start.run,
    "memory": memory.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench", description=__doc__)
    parser.add_argument("scenario", nargs="*", choices=[[], *SCENARIOS], help="default: all")
    parser.add_argument(
        "--count", type=int, help="messages per scenario (default: each scenario's own)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    options = {} if args.count is None else {"count": args.count}
    rows = [row for name in args.scenario or SCENARIOS for row in SCENARIOS[name](**options)]
    if args.json:
        out = [{**row.__dict__, "ratio": row.ratio if row.anchor else None} for row in rows]
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'figure':<62} {'unit':>6} {'mailroom':>10} {'anchor':>10} {'ratio':>6}")
    for row in rows:
        # An anchor of 0 is a figure without one (outbound's DKIM signing): no ratio either.
        theirs, ratio = (f"{row.anchor:.1f}", f"{row.ratio:.2f}") if row.anchor else ("-", "-")
        print(f"{row.figure:<62} {row.unit:>6} {row.mailroom:>10.1f} {theirs:>10} {ratio:>6}")
    for anchor in sorted({row.anchor_name for row in rows}):
        print(f"anchor: {anchor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
