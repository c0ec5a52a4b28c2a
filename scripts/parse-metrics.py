#!/usr/bin/env python3
"""Parses OpenMetrics text (stdin) with the Prometheus project's own parser
(PyPI prometheus-client) and prints its samples as JSON lines:
{"name", "labels", "value"}. Exits non-zero when the text does not parse."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(json.dumps({"name": s.name, "labels": s.labels, "value": s.value}))
