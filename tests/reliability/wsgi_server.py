"""Serve the site with a threaded WSGI server on a free loopback port; print the port.

A stand-in for a production WSGI server in the process-level reliability tests: every
request runs in its own thread with its own database connection, as under gunicorn's
threaded workers. Stops on SIGTERM.
"""

import os
import signal
import sys
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portfolio_site.settings")


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def main() -> None:
    from portfolio_site.wsgi import application

    server = make_server(
        "127.0.0.1", 0, application, server_class=ThreadingServer, handler_class=QuietHandler
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(server.server_port, flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
