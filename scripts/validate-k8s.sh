#!/usr/bin/env bash
# Validates deploy/kubernetes/*.yaml against the Kubernetes API schemas with
# kubernetes-validate (PyPI; it carries the schemas, so no cluster is needed).
# --strict: an unknown field is an error, as a typo would be.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/tools/kubernetes-validate
VERSION=1.37.0
if [ ! -x "$VENV/bin/kubernetes-validate" ] || ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "kubernetes-validate==$VERSION"
fi
"$VENV/bin/kubernetes-validate" --strict --kubernetes-version 1.30.0 deploy/kubernetes/*.yaml
