"""A real OneBot v11 application, built on aiocqhttp, as a webhook receiver.

The integration test tests/it/onebot.rs runs it to check that
example-plugins/onebot-formatter speaks OneBot to a OneBot app: aiocqhttp
checks each post's `X-Signature` against `--secret` (refusing a missing or
wrong one with 401 / 403), parses it as a OneBot event and dispatches it.

It prints one JSON object per line on stdout, flushed at once:

    {"listening": <port>}          once, when it accepts posts
    {"accepted": <event>}          every event aiocqhttp dispatched
    {"refused": <status>, ...}     every post answered with an error status

Usage: python receiver.py --secret SECRET
Install aiocqhttp with scripts/install-plugin-toolchains.
"""

import argparse
import asyncio
import json
import socket
import sys

from aiocqhttp import CQHttp
from hypercorn.asyncio import serve
from hypercorn.config import Config


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def build_bot(secret):
    bot = CQHttp(secret=secret)

    # aiocqhttp calls handlers only for posts that passed its signature check
    # and parse into an event.
    @bot.on_meta_event
    async def on_meta(event):
        emit({"accepted": dict(event)})

    @bot.on_notice
    async def on_notice(event):
        emit({"accepted": dict(event)})

    @bot.server_app.after_request
    async def report_refusals(response):
        if response.status_code >= 400:
            emit({"refused": response.status_code})
        return response

    return bot


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()

    # Bound here, on a port the system picks, then handed to hypercorn, so
    # the port is known before the first post can come.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)

    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = "-"
    config.graceful_timeout = 0.5

    bot = build_bot(args.secret)
    server = asyncio.ensure_future(serve(bot.asgi, config))
    emit({"listening": sock.getsockname()[1]})
    await server


if __name__ == "__main__":
    asyncio.run(main())
