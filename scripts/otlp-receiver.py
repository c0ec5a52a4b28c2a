#!/usr/bin/env python3
"""A minimal OTLP trace receiver for kiln's tests (kilnd's OpenTelemetry spans).

usage: otel-receiver.py PORT OUT_FILE [--host 127.0.0.1] [--grpc]

Accepts POST /v1/traces (Content-Type application/x-protobuf, optionally
Content-Encoding gzip) carrying an ExportTraceServiceRequest and appends one
JSON line per span to OUT_FILE:
  {"name", "trace_id", "span_id", "parent_span_id", "kind", "scope",
   "attributes": {...}, "service_name"}
ids are lowercase hex ("" when absent). PORT 0 picks a free port; the bound
port is printed to stdout as "listening on PORT" (flushed) once ready.

With --grpc it instead serves OTLP/gRPC (TraceService/Export) on PORT.

needs: pip install opentelemetry-proto   (pulls protobuf)
       pip install grpcio                (only for --grpc)
"""
import argparse
import gzip
import json
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_lock = threading.Lock()


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attrs(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def record(out_path, req):
    lines = []
    for rs in req.resource_spans:
        res = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "name": s.name,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "kind": s.kind,
                    "scope": ss.scope.name,
                    "attributes": attrs(s.attributes),
                    "service_name": res.get("service.name"),
                }, sort_keys=True))
    with _lock, open(out_path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def make_handler(out_path):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # keep test output quiet
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            enc = (self.headers.get("Content-Encoding") or "").lower()
            if enc == "gzip":
                body = gzip.decompress(body)
            elif enc == "deflate":
                body = zlib.decompress(body)
            if self.path.rstrip("/") != "/v1/traces":
                # logs/metrics or a wrong path: accept but ignore
                self._reply(404 if not self.path.startswith("/v1/") else 200)
                return
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype != "application/x-protobuf":
                self._reply(415)
                return
            req = ExportTraceServiceRequest()
            try:
                req.ParseFromString(body)
            except Exception:
                self._reply(400)
                return
            record(out_path, req)
            self._reply(200, ExportTraceServiceResponse().SerializeToString())

        def _reply(self, code, payload=b""):
            self.send_response(code)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def serve_grpc(a):
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class Svc(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            record(a.out, request)
            return ExportTraceServiceResponse()

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Svc(), srv)
    port = srv.add_insecure_port(f"{a.host}:{a.port}")
    srv.start()
    print(f"listening on {port}", flush=True)
    try:
        srv.wait_for_termination()
    except KeyboardInterrupt:
        srv.stop(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("out")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc", action="store_true")
    a = ap.parse_args()
    if a.grpc:
        return serve_grpc(a)
    srv = ThreadingHTTPServer((a.host, a.port), make_handler(a.out))
    print(f"listening on {srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    sys.exit(main())
