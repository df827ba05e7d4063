"""One request with the library named on the command line, written as a program that knows nothing of
pexi (no proxy, no CA settings): prints one JSON line, the status and body, or the error as Python shows it.

    python3 python.py urllib|requests URL
"""

import json
import sys
import urllib.error
import urllib.request

library, url = sys.argv[1:3]


def show(**fields):
    print(json.dumps(fields))


try:
    if library == "urllib":
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                show(status=response.status, body=response.read().decode())
        except urllib.error.HTTPError as error:
            # str(error) is what a traceback or a log line shows: "HTTP Error 403: <reason phrase>".
            show(error=str(error), body=error.read().decode())
            sys.exit(1)
    elif library == "requests":
        import requests

        response = requests.get(url, timeout=60)
        show(status=response.status_code, body=response.text)
        sys.exit(0 if response.ok else 1)
    else:
        raise SystemExit(f"no client {library}")
except Exception as error:  # what the program would print: the exception
    show(error=f"{type(error).__name__}: {error}")
    sys.exit(1)
