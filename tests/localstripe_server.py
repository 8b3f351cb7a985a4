"""localstripe for the tests and the demo: in memory only, on 127.0.0.1, free port printed on stdout.

The ``localstripe`` CLI binds ``::`` and pickles its whole store to a shared file
on every write; this script keeps the store in RAM (see shared/notes/localstripe.md).
Usage: ``python tests/localstripe_server.py [PORT]`` (0 or nothing: a free port).
"""

import socket, sys
from aiohttp import web
import localstripe.resources as res
res.Store.dump_to_disk = lambda self: None          # in-memory only
from localstripe.server import app                  # import after the patch
sock = socket.socket(); sock.bind(('127.0.0.1', int(sys.argv[1]) if len(sys.argv) > 1 else 0)); sock.listen(128)
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, access_log=None, print=None)
