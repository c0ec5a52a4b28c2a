#!/usr/bin/env bash
# The validators the tests use that come from PyPI, in one venv under
# target/tools/venv (pinned): kubernetes-validate (the farm's manifests
# against the API schemas) and in-toto-attestation (the in-toto framework's
# own bindings, for provenance statements) and spdx-tools (the SPDX
# project's validator, for SBOMs), cryptography and PyNaCl (an independent
# check of cosign signatures: scripts/cosign-check.py), prometheus-client
# (the Prometheus project's parser, for kilnd's metrics), opentelemetry-proto (the
# OTLP messages, for scripts/otlp-receiver.py, which receives kilnd's traces).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/tools/venv
WANT="kubernetes-validate==1.37.0 in-toto-attestation==0.9.3 spdx-tools==0.8.5 cryptography==44.0.2 PyNaCl==1.5.0 prometheus-client==0.21.1 opentelemetry-proto==1.45.2"
STAMP=$VENV/.installed
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $WANT
  echo "$WANT" > "$STAMP"
fi
