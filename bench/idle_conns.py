#!/usr/bin/env python3
"""Opens N keep-alive connections to a proxy, sends one request on each and reads its answer,
then holds them idle: prints `ready` once all are open and answered, and keeps them until its
standard input closes (bench/run.sh measures the proxy's memory meanwhile).

    idle_conns.py --port P --host H --n 10000 [--tls]
"""
import argparse
import asyncio
import resource
import ssl
import sys


async def one(port, host, tls_ctx, sem, held):
    async with sem:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls_ctx, server_hostname=host if tls_ctx else None
        )
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:40]!r}")
        held.append(writer)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--tls", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tls_ctx = None
    if args.tls:
        tls_ctx = ssl.create_default_context()
        tls_ctx.check_hostname = False
        tls_ctx.verify_mode = ssl.CERT_NONE
    held = []
    sem = asyncio.Semaphore(200)
    await asyncio.gather(*(one(args.port, args.host, tls_ctx, sem, held) for _ in range(args.n)))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in held:
        w.close()


asyncio.run(main())
