"""`star usage`: what API keys used, from a running STAR server (GET /usage).

    star usage --days 7
    KEY   DAY         JOBS  IMAGES  MEGAPIXELS  MODEL_S
    ops   2026-12-02     4       9        0.15    2.314
    ops   total         12      30        0.49    7.802

One line per key and UTC day with usage, then the key's total since its first job. A key sees its
own usage; an admin key every key's (or one: --key NAME). --json prints the server's answer.
Exit codes as `star generate`'s: 0 ok, 2 the server rejected the request, 3 server error or
unavailable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "Show what API keys used on a running STAR server (GET /usage)."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = HELP + " A key sees its own usage; an admin key every key's."
    parser.add_argument("--days", type=int, default=30, help="UTC days to list, today included (1-366; default 30)")
    parser.add_argument("--key", help="admin keys only: this key's usage (default: every key)")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")
    parser.add_argument("--server", help="base URL of the API (default: $STAR_SERVER or http://localhost:8000)")
    parser.add_argument("--api-key", help="API key (default: $STAR_API_KEY)")


def table(report) -> list[str]:
    rows = [("KEY", "DAY", "JOBS", "IMAGES", "MEGAPIXELS", "MODEL_S")]
    for key in report.keys:
        for day, used in [*key.days.items(), ("total", key.totals)]:
            rows.append((key.key, day, str(used.jobs), str(used.images), f"{used.pixels / 1e6:.2f}",
                         f"{used.model_s:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]


def run(args: argparse.Namespace, *, transport=None) -> int:
    from client.cli import EXIT_BAD_REQUEST, EXIT_OK, EXIT_SERVER
    from client.http import StarClient, StarConnectionError, StarError, StarRequestError

    server = args.server or os.environ.get("STAR_SERVER")
    try:
        with StarClient(server, args.api_key, transport=transport) as client:
            report = client.usage(days=args.days, key=args.key)
    except StarRequestError as exc:
        print(f"star usage: the server rejected the request ({exc.status} {exc.code}): {exc.message}",
              file=sys.stderr)
        return EXIT_BAD_REQUEST
    except (StarConnectionError, StarError) as exc:
        print(f"star usage: {exc}", file=sys.stderr)
        return EXIT_SERVER
    if args.json:
        print(json.dumps({"days": report.days, "keys": [{"key": k.key, "totals": vars(k.totals), "days": {
            d: vars(u) for d, u in k.days.items()}} for k in report.keys]}, indent=2))
    else:
        print("\n".join(table(report)))
    return EXIT_OK
