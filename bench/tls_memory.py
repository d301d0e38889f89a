"""TLS memory floor: what one idle server-side TLS connection costs before armsproxy adds a byte.

    python bench/tls_memory.py [-n 2000] [--versions 1.0,1.2,1.3]

Why: issue #4 asks for at most 20 KiB per idle tunnel. A tunnel is one TLS connection on the
SA gate, and the SA gate's TLS is Twisted's, which is pyOpenSSL over the OpenSSL that
cryptography bundles. This measures that layer alone: no Twisted, no sockets, no armsproxy
objects. For each TLS version, in a fresh child process, ``-n`` server connections are built
from the SA gate's own context (``armsproxy.tls.certificate_options``, the dev PKI, client
certificates asked for as in production), each handshaken over memory BIOs with a client that
is then dropped, and one 100-byte record is read, as a tunnel's first message would be. The
figure is (RSS after - RSS before) / n after ``gc.collect()`` and ``malloc_trim(0)``, so it is
memory the connections hold, not heap glibc keeps. A connection that never saw a byte
(``SSL_new`` and its memory BIOs) is reported too.

For comparison, the same handshakes through the standard library's ``ssl`` module
(``SSLObject`` over ``MemoryBIO``), which links the system's OpenSSL: Twisted cannot use it,
but it shows how much of the figure is the OpenSSL release rather than armsproxy or Python.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from OpenSSL import SSL

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from armsproxy import pki  # noqa: E402
from armsproxy.tls import TLSPolicy, certificate_options  # noqa: E402

KIB = 1024.0
_PYOPENSSL_VERSIONS = {"1.0": SSL.TLS1_VERSION, "1.2": SSL.TLS1_2_VERSION,
                       "1.3": SSL.TLS1_3_VERSION}
_STDLIB_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.2": ssl.TLSVersion.TLSv1_2,
                    "1.3": ssl.TLSVersion.TLSv1_3}
_LEGACY = "DEFAULT:@SECLEVEL=0"  # TLS 1.0 needs SHA-1 handshakes, as libarms devices speak


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _settle() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _rss_kib()


def _per_connection(make: Callable[[], object], n: int) -> float:
    """KiB of RSS per live object made by ``make`` (a warm-up first, so one-time costs drop)."""
    warm = [make() for _ in range(20)]
    before = _settle()
    held = [make() for _ in range(n)]
    after = _settle()
    del warm, held
    return (after - before) / n


def _pyopenssl(version: str, n: int) -> dict[str, Any]:
    ca = pki.make_ca("bench CA")
    server = pki.issue_server_cert(ca, ["127.0.0.1"], "bench proxy")
    policy = TLSPolicy(minimum_version=version, client_ca_pem=ca.cert_pem.encode())
    options = certificate_options(server.cert_pem.encode(), server.key_pem.encode(), None,
                                  policy)
    server_ctx = options.getContext()
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_min_proto_version(_PYOPENSSL_VERSIONS[version])
    client_ctx.set_max_proto_version(_PYOPENSSL_VERSIONS[version])
    if version == "1.0":
        client_ctx.set_cipher_list(_LEGACY.encode())

    def connection() -> SSL.Connection:
        s = SSL.Connection(server_ctx, None)
        s.set_accept_state()
        c = SSL.Connection(client_ctx, None)
        c.set_connect_state()
        _pump(c, s)
        c.send(b"x" * 100)
        _pump(c, s)
        if s.recv(1000) != b"x" * 100:
            raise RuntimeError("record lost")
        return s

    negotiated = connection().get_protocol_version_name()
    return {"impl": "pyOpenSSL", "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
            "version": negotiated, "kib": _per_connection(connection, n),
            "ssl_new_kib": _per_connection(lambda: SSL.Connection(server_ctx, None), n)}


def _pump(client: SSL.Connection, server: SSL.Connection) -> None:
    for _ in range(50):
        for end in (client, server):
            try:
                end.do_handshake()
            except SSL.WantReadError:
                pass
        moved = False
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(65536))
                moved = True
            except SSL.WantReadError:
                pass
        if not moved:
            return
    raise RuntimeError("handshake did not settle")


def _stdlib(version: str, n: int) -> dict[str, Any]:
    ca = pki.make_ca("bench CA")
    server = pki.issue_server_cert(ca, ["127.0.0.1"], "bench proxy")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    for ctx in (server_ctx, client_ctx):
        ctx.minimum_version = ctx.maximum_version = _STDLIB_VERSIONS[version]
        if version == "1.0":
            ctx.set_ciphers(_LEGACY)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL  # client certificates asked for, as above
    server_ctx.load_verify_locations(cadata=ca.cert_pem)
    with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads files only
        pem = Path(tmp) / "server.pem"
        pem.write_text(server.cert_pem + server.key_pem)
        server_ctx.load_cert_chain(pem)

    def connection() -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
        s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        c = client_ctx.wrap_bio(c_in, c_out)
        for _ in range(50):
            for end in (c, s):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            if not (c_out.pending or s_out.pending):
                break
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        c.write(b"x" * 100)
        s_in.write(c_out.read())
        if s.read(1000) != b"x" * 100:
            raise RuntimeError("record lost")
        return s, s_in, s_out

    negotiated = connection()[0].version()
    def bare() -> ssl.SSLObject:
        return server_ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)

    return {"impl": "stdlib ssl", "openssl": ssl.OPENSSL_VERSION, "version": negotiated,
            "kib": _per_connection(connection, n), "ssl_new_kib": _per_connection(bare, n)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="connections per measurement")
    parser.add_argument("--versions", default="1.0,1.2,1.3",
                        help="TLS versions (1.0 is what libarms devices speak)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "VERSION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, version = args.child
        print(json.dumps((_pyopenssl if impl == "pyopenssl" else _stdlib)(version, args.n)))
        return 0
    print(f"server-side memory per idle TLS connection, {args.n} connections, "
          "each measurement in a fresh process")
    for version in args.versions.split(","):
        for impl in ("pyopenssl", "stdlib"):
            out = subprocess.run([sys.executable, __file__, "-n", str(args.n), "--child", impl,
                                  version], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            print(f"  TLS {version:<3} {r['impl']:<10} ({r['openssl']}): negotiated "
                  f"{r['version']}, {r['kib']:.1f} KiB per connection; before any byte "
                  f"{r['ssl_new_kib']:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
