"""Container health check without curl: `healthcheck.py PORT_ENV DEFAULT_PORT PATH` exits 0
when http://127.0.0.1:<port><path> answers 200."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    port_variable, default_port, path = argv
    url = f"http://127.0.0.1:{os.environ.get(port_variable) or default_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
