"""Container health probe (Dockerfile HEALTHCHECK, compose healthcheck): exit 0 when the service answers 200.

    python /opt/caries-mim/healthcheck.py [PATH]      PATH: /healthz (default, alive) or /readyz (model loaded)

Only the Python standard library, so the image needs no curl. The port is the service's own setting
(CARIES_MIM_PORT, default 8000); probes go to the loopback address, which needs no API key (/healthz and /readyz
are open). Exit status 1 with one line on stderr when the service does not answer 200 within the timeout.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = float(os.environ.get("CARIES_MIM_HEALTHCHECK_TIMEOUT_S", "4"))


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    if not path.startswith("/"):
        print(f"healthcheck: the path must start with '/', got {path!r}", file=sys.stderr)
        return 2
    url = f"http://127.0.0.1:{os.environ.get('CARIES_MIM_PORT', '8000')}{path}"
    # No proxy: Docker passes the client's HTTP_PROXY settings into containers, and urllib would send even a
    # loopback probe through them.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as answer:
            status = answer.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:  # refused, timed out, a bad port value
        print(f"healthcheck: {url} did not answer: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
