"""`python -m service.probe`: exit 0 when the server's gRPC health check says SERVING.

For container HEALTHCHECKs and readiness probes where no grpc_health_probe binary is at hand.
Against a TLS port pass `--tls-ca` (and `--tls-cert`/`--tls-key` for mutual TLS); health needs no
token. Or probe the plaintext `--health-port` the server can open for probes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.probe",
        description="Ask a server's grpc.health.v1 service whether it is SERVING.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default="127.0.0.1:8001", help="server address")
    parser.add_argument("--service", default="", help="service name ('' is the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's cert: use TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    parser.add_argument(
        "--server-name",
        help="name to check the server certificate against, if not the host of --url",
    )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        parser.error("--tls-cert needs --tls-ca")
    if args.tls_ca is None:
        channel = grpc.insecure_channel(args.url)
    else:
        credentials = grpc.ssl_channel_credentials(
            args.tls_ca.read_bytes(),
            args.tls_key.read_bytes() if args.tls_key else None,
            args.tls_cert.read_bytes() if args.tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(args.url, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.url}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.url}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
