"""`colm-status`: what a selector is doing, read through its Status RPC, or only whether it serves."""

from __future__ import annotations

import argparse
import os

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colm_client.channel import TLS_CA_ENV, TOKEN_FILE_ENV, open_channel, read_token
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Selector"].full_name


def status(target: str, job_id: str = "", timeout: float = 10.0, *, token: str | None = None,
           tls_ca: str | os.PathLike | bytes | None = None) -> dict:
    """The selector's status as a plain dict (steps, versions, ranks, per-source counters).

    ``token`` and ``tls_ca`` default to the environment, as in `colm_client.channel.open_channel`.
    """
    with open_channel(target, token=token, tls_ca=tls_ca) as channel:
        reply = pb_grpc.SelectorStub(channel).Status(pb.StatusRequest(job_id=job_id), timeout=timeout)
    return MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def serving(target: str, timeout: float = 5.0, *, token: str | None = None,
            tls_ca: str | os.PathLike | bytes | None = None) -> bool:
    """True when the selector's standard health service reports SERVING within ``timeout``.

    Health checks need no token; ``tls_ca`` is needed when the selector serves TLS.
    """
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    with open_channel(target, token=token, tls_ca=tls_ca) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _mib(n) -> str:
    return f"{int(n) / (1 << 20):.0f} MiB"


def _share(value) -> str:
    return "-" if value is None else f"{float(value):.1%}"


def format_status(s: dict) -> str:
    steps = int(s["selections"])
    per_step = f"{float(s['selection_seconds']) / steps * 1e3:.1f} ms" if steps else "-"
    lines = [
        f"job {s['job_id']}  world size {s['world_size']}  fingerprint {s['config_fingerprint']}",
        f"steps selected {s['selected_steps']}  param version {s['param_version']}  epoch {s['epoch']}"
        f"  oldest journaled step {s['journal_first_step']}",
        f"this process: {steps} selections, {per_step} each; peak memory {_mib(s['peak_rss_bytes'])} RSS,"
        f" {_mib(s['peak_device_bytes'])} on the device",
        "ranks:",
    ]
    for r in s["ranks"]:
        state = "connected" if r["connected"] else "away"
        lines.append(f"  {r['rank']}: {state}, next step {r['next_step']}, acked {r['acked_step']}")
    lines.append("sources (seen / selected; share of the loss weight: target / realised):")
    target, realised = s.get("source_target_share", {}), s.get("source_realised_share", {})
    for src in sorted(set(s["source_seen"]) | set(target)):  # a named source may not be seen yet
        lines.append(f"  {src}: {s['source_seen'].get(src, 0)} / {s['source_selected'].get(src, 0)};"
                     f" {_share(target.get(src))} / {_share(realised.get(src, 0.0 if realised else None))}")
    skipped = {k: v for k, v in s["skipped"].items() if int(v)}
    lines.append("skipped records: " + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"))
    lines.append(f"samples truncated to max length: {s['truncated']}")
    if s.get("error"):  # the selector cannot go on and is exiting
        lines.insert(0, f"FAILED: {s['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "colm-status") -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("target", nargs="?", default="127.0.0.1:50051", help="host:port of the selector")
    p.add_argument("--job-id", default="")
    p.add_argument("--health", action="store_true",
                   help="print nothing; exit 0 when the selector is SERVING, 1 otherwise (health checks)")
    p.add_argument("--token-file", metavar="PATH",
                   help=f"file holding the selector's shared token (default: ${TOKEN_FILE_ENV})")
    p.add_argument("--tls-ca", metavar="PATH",
                   help=f"CA certificate (PEM) to reach a TLS selector with (default: ${TLS_CA_ENV})")
    args = p.parse_args(argv)
    try:
        token = read_token(args.token_file) if args.token_file else None
        if args.health:
            raise SystemExit(0 if serving(args.target, token=token, tls_ca=args.tls_ca) else 1)
        reply = status(args.target, args.job_id, token=token, tls_ca=args.tls_ca)
    except ValueError as e:
        p.error(str(e))
    except grpc.RpcError as err:
        p.exit(1, f"colm-status: {args.target}: {err.code().name}: {err.details()}\n")
    print(format_status(reply))
