#!/usr/bin/env bash
# Validates deploy/kubernetes/*.yaml against the Kubernetes API schemas with
# kubernetes-validate (PyPI; it carries the schemas, so no cluster is needed).
# --strict: an unknown field is an error, as a typo would be.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/tools.sh
target/tools/venv/bin/kubernetes-validate --strict --kubernetes-version 1.30.0 deploy/kubernetes/*.yaml
