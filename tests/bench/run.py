"""``bin/bench``: run benchmark scenarios and print mailroom against its anchor, side by side."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from tests.bench import smtp_inbound

SCENARIOS: dict[str, Callable[..., list[smtp_inbound.Row]]] = {"smtp-inbound": smtp_inbound.run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench", description=__doc__)
    parser.add_argument("scenario", nargs="*", choices=[[], *SCENARIOS], help="default: all")
    parser.add_argument("--count", type=int, default=2000, help="messages per scenario")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = [row for name in args.scenario or SCENARIOS for row in SCENARIOS[name](count=args.count)]
    if args.json:
        out = [{**row.__dict__, "ratio": row.ratio} for row in rows]
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'figure':<70} {'mailroom':>10} {'anchor':>10} {'ratio':>6}")
    for row in rows:
        print(f"{row.figure:<70} {row.mailroom:>10.1f} {row.anchor:>10.1f} {row.ratio:>6.2f}")
        print(f"  ({row.unit}; anchor: {row.anchor_name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
