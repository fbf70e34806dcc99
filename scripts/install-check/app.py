"""The WSGI app the install check serves with Debian's gunicorn: one line per request naming the
worker pid that served it, appended to $IC_APP_LOG (the ground truth accept-watch is compared with)."""

import os

LOG = os.environ.get("IC_APP_LOG", "/tmp/ic-app.log")


def app(environ, start_response):
    # O_APPEND: each short write lands whole, whichever worker writes it.
    fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    body = f"served by {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
