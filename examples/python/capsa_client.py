#!/usr/bin/env python3
"""A capsa client in Python, written against capnp/schema/capsa.capnp alone.

It connects to a serving host (`capsa serve`), runs a WebAssembly program in
data mode, streams its stdout, waits for it, and, when given one, runs an
x86-64 ELF executable the same way (the host runs it in a microVM). With
`--files`, a WASM child writes a file into the directory the server offers
as `out`, and this client reads it back through the same capability.

    capsa serve --listen unix:/tmp/capsa.sock --dir out=/tmp/out &
    python3 capsa_client.py --connect unix:/tmp/capsa.sock \
        --wasm hello.wasm [--elf /bin/busybox] [--files files.wasm] \
        [--bench-echo 2000] [--bench-stream 256]

Over TLS: `--connect tls:HOST:PORT --token-file FILE` with `--tls-fingerprint
SHA256` (as `capsa serve` prints it) or `--tls-ca CA.pem`.

Needs pycapnp (`pip install pycapnp`).
"""

import argparse
import asyncio
import hashlib
import io
import os
import socket
import ssl
import statistics
import sys
import time

import capnp

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMA = os.path.join(HERE, "..", "..", "capnp", "schema", "capsa.capnp")


async def connect(address, token, tls_ca=None, tls_fingerprint=None):
    """Opens the stream (TLS first for tls:HOST:PORT), sends the token line
    if the server wants one, and returns the server's root Executor (and
    the client, to keep it alive)."""
    if address.startswith("tls:"):
        return await connect_tls(address, token, tls_ca, tls_fingerprint)
    if tls_ca or tls_fingerprint:
        raise SystemExit(f"{address!r}: --tls-ca and --tls-fingerprint are for tls: addresses")
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address[len("unix:"):])
    elif address.startswith("tcp:"):
        host, port = address[len("tcp:"):].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        raise SystemExit(f"{address!r}: use unix:PATH, tcp:HOST:PORT or tls:HOST:PORT")
    if token is not None:
        # Before any Cap'n Proto message: one line with the shared secret.
        sock.sendall(b"CAPSA-TOKEN " + token.encode() + b"\n")
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        stream = await capnp.AsyncIoStream.create_unix_connection(sock=sock)
    else:
        stream = await capnp.AsyncIoStream.create_connection(sock=sock)
    client = capnp.TwoPartyClient(stream)
    return client, client.bootstrap().cast_as(schema.Executor)


# The tasks relaying TLS connections, kept alive while they run.
RELAYS = set()


def normalized_fingerprint(text):
    """64 hex digits, as `capsa serve` prints them or without colons."""
    digits = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise SystemExit(f"{text!r} is not a SHA-256 fingerprint")
    return digits


async def connect_tls(address, token, tls_ca, tls_fingerprint):
    """TLS with Python's ssl, trusting the server by its CA or by the
    pinned fingerprint of its certificate (checked after the handshake,
    before the token is sent: the handshake has proven the server holds
    that certificate's key). pycapnp cannot send a line of its own before
    Cap'n Proto, so its stream is a socket pair relayed to the TLS stream."""
    host, port = address[len("tls:"):].rsplit(":", 1)
    host = host.strip("[]")
    if tls_ca:
        ctx = ssl.create_default_context(cafile=tls_ca)
    elif tls_fingerprint:
        pin = normalized_fingerprint(tls_fingerprint)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        raise SystemExit(f"{address!r}: pass --tls-ca FILE or --tls-fingerprint SHA256")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
    if tls_fingerprint:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen = hashlib.sha256(der).hexdigest()
        if seen != pin:
            writer.close()
            raise SystemExit(f"{address}: the server's certificate has fingerprint {seen}, not {pin}")
    if token is not None:
        writer.write(b"CAPSA-TOKEN " + token.encode() + b"\n")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    local_reader, local_writer = await asyncio.open_connection(sock=theirs)

    async def pump(src, dst):
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    relay = [asyncio.create_task(pump(reader, local_writer)), asyncio.create_task(pump(local_reader, writer))]
    stream = await capnp.AsyncIoStream.create_unix_connection(sock=ours)
    RELAYS.update(relay)
    for task in relay:
        task.add_done_callback(RELAYS.discard)
    client = capnp.TwoPartyClient(stream)
    return client, client.bootstrap().cast_as(schema.Executor)


async def read_to_end(source, out):
    """Copies a ByteSource to `out` until EOF; returns everything read."""
    data = b""
    while True:
        chunk = await source.read(maxBytes=65536)
        out.write(chunk.data)
        out.flush()
        data += chunk.data
        if chunk.eof:
            return data


def describe(status):
    which = str(status.which())
    if which == "exited":
        return f"exited {status.exited}"
    if which in ("trapped", "failed"):
        return f"{which}: {getattr(status, which)}"
    return which


def data_mode_request(executor, path, args):
    """A runBytes request for the program at `path` with `args`, in data
    mode and named after the file, to fill in further and send."""
    with open(path, "rb") as f:
        program = f.read()
    request = executor.runBytes_request()
    request.bytes = program
    request.init("args", len(args))
    for i, a in enumerate(args):
        request.args[i] = a
    request.options.stdio = "data"
    request.options.name = os.path.basename(path)
    return request


async def run(executor, path, args):
    """Runs the program at `path` in data mode; streams its stdout to ours
    and returns (stdout bytes, exit status text)."""
    request = data_mode_request(executor, path, args)
    process = (await request.send()).process
    # Pipelined: no round trip of its own before the first read.
    output = await read_to_end(process.stdout().source, sys.stdout.buffer)
    status = (await process.wait()).status
    return output, describe(status)


async def files_demo(executor, path):
    """A WASM child writes into the directory named `out`; we read it back."""
    grants = (await executor.directories()).grants
    out = next((g.directory for g in grants if g.path == "out"), None)
    if out is None:
        raise SystemExit("the server offers no directory named out (capsa serve --dir out=PATH)")
    request = data_mode_request(executor, path, ["put", "/out/from-wasm.txt"])
    grant = request.options.init("directories", 1)[0]
    grant.path = "/out"
    grant.directory = out
    process = (await request.send()).process
    # Waited for, not pipelined on (see ByteSink in the schema).
    sink = (await process.stdin()).sink
    await sink.write(data=b"written by a WASM child\n")
    await sink.close()
    status = describe((await process.wait()).status)
    data = await read_to_end(out.read(path="from-wasm.txt").source, io.BytesIO())
    return status, data


async def bench_echo(executor, rounds):
    samples = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        await executor.echo(message="x")
        samples.append(time.perf_counter_ns() - t)
    return statistics.median(samples)


class Collect:
    """A ByteSink of ours the host pushes a child's stdout into
    (`options.stdoutTo`): it counts the bytes and notes the close."""

    def __init__(self):
        self.count = 0
        self.closed = asyncio.get_running_loop().create_future()

    def server(self):
        collect = self

        class Sink(schema.ByteSink.Server):
            async def write(self, data, **kwargs):
                collect.count += len(data)

            async def close(self, **kwargs):
                if not collect.closed.done():
                    collect.closed.set_result(collect.count)

        return Sink()


async def count_to_end(source):
    """Reads a ByteSource to its end, counting: the pulled way."""
    count = 0
    while True:
        chunk = await source.read(maxBytes=1 << 20)
        count += len(chunk.data)
        if chunk.eof:
            return count


async def bench_stream(executor, path, mib, pushed):
    """Streams `mib` MiB through `hello cat` and back: bytes per second.
    With `pushed`, the host writes the output into our sink; else we read
    it. Up to eight 1 MiB writes are in flight."""
    request = data_mode_request(executor, path, ["cat"])
    collect = Collect()
    if pushed:
        request.options.stdoutTo = collect.server()
    process = (await request.send()).process
    # Waited for, not pipelined on (see ByteSink in the schema).
    sink = (await process.stdin()).sink
    chunk = b"\7" * (1 << 20)

    async def write():
        await sink.write(data=chunk)

    async def feed():
        pending = set()
        for _ in range(mib):
            pending.add(asyncio.ensure_future(write()))
            if len(pending) >= 8:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*pending)
        await sink.close()

    start = time.perf_counter()
    if pushed:
        _, got = await asyncio.gather(feed(), collect.closed)
    else:
        _, got = await asyncio.gather(feed(), count_to_end(process.stdout().source))
    took = time.perf_counter() - start
    if got != mib << 20:
        raise SystemExit(f"streamed {mib << 20} bytes and got {got} back")
    await process.wait()
    return (mib << 20) / took


async def main(opts):
    token = None
    if opts.token_file:
        with open(opts.token_file) as f:
            token = f.read().strip()
    client, executor = await connect(opts.connect, token, opts.tls_ca, opts.tls_fingerprint)

    answer = await executor.echo(message="hello from python")
    print(f"echo: {answer.response}", file=sys.stderr)

    if opts.wasm:
        _, status = await run(executor, opts.wasm, ["from", "python"])
        print(f"wasm: {status}", file=sys.stderr)
    if opts.elf:
        _, status = await run(executor, opts.elf, ["echo", "hello from an ELF, via python"])
        print(f"elf: {status}", file=sys.stderr)
    if opts.files:
        status, data = await files_demo(executor, opts.files)
        print(f"files: {status}, read back {data!r}", file=sys.stderr)
    if opts.bench_echo:
        median = await bench_echo(executor, opts.bench_echo)
        print(f"python echo round trip: median {median / 1000:.1f} µs over {opts.bench_echo}")
    if opts.bench_stream:
        if not opts.wasm:
            raise SystemExit("--bench-stream needs --wasm hello.wasm")
        for pushed in (True, False):
            rates = [await bench_stream(executor, opts.wasm, opts.bench_stream, pushed) for _ in range(3)]
            how = "pushed" if pushed else "pulled"
            print(f"python stream {how}: median {statistics.median(rates) / 1e6:.0f} MB/s")
    del executor, client


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--connect", default="unix:capsa.sock", help="unix:PATH, tcp:HOST:PORT or tls:HOST:PORT"
    )
    parser.add_argument("--token-file", help="the server's shared secret, if it has one")
    parser.add_argument("--tls-ca", help="tls: trust a server whose chain leads to this CA (PEM)")
    parser.add_argument(
        "--tls-fingerprint", metavar="SHA256", help="tls: trust exactly the certificate with this fingerprint"
    )
    parser.add_argument("--schema", default=DEFAULT_SCHEMA, help="capsa.capnp")
    parser.add_argument("--wasm", help="a WASM component or module to run in data mode")
    parser.add_argument("--elf", help="an x86-64 ELF to run too (needs a host with microVMs)")
    parser.add_argument("--files", help="files.wasm: write a file into the directory `out`")
    parser.add_argument("--bench-echo", type=int, metavar="N", help="time N echo round trips")
    parser.add_argument(
        "--bench-stream", type=int, metavar="MIB", help="stream MIB MiB through the --wasm program's cat"
    )
    opts = parser.parse_args()
    # pycapnp ships capnp/stream.capnp (the schema's `-> stream` methods
    # import it) next to its own package.
    site = os.path.dirname(os.path.dirname(os.path.abspath(capnp.__file__)))
    schema = capnp.load(opts.schema, imports=[site, *sys.path])
    asyncio.run(capnp.run(main(opts)))
