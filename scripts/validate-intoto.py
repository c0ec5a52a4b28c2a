#!/usr/bin/env python3
"""Validates in-toto statements (JSON files) with the in-toto attestation
framework's own Python bindings (PyPI: in-toto-attestation): the statement
layer, and for SLSA v1 provenance the predicate too. Fields outside the
SLSA schema (BuildKit's extensions, kept by kiln) are ignored, as the
schema allows. Exits non-zero on the first invalid file."""
import json
import sys

from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement

SLSA_V1 = "https://slsa.dev/provenance/v1"

for path in sys.argv[1:]:
    with open(path) as f:
        doc = json.load(f)
    pb = json_format.ParseDict(doc, statement_pb2.Statement())
    Statement.copy_from_pb(pb).validate()
    if doc.get("predicateType") == SLSA_V1:
        # The SLSA v1 schema, as the framework's protobuf types it (times,
        # descriptors, maps), plus what SLSA v1 requires to be there.
        pred = json_format.ParseDict(
            doc["predicate"], provenance_pb2.Provenance(), ignore_unknown_fields=True
        )
        if not pred.build_definition.build_type:
            raise ValueError(f"{path}: buildDefinition.buildType is required")
        if "externalParameters" not in doc["predicate"]["buildDefinition"]:
            raise ValueError(f"{path}: buildDefinition.externalParameters is required")
        if not pred.run_details.builder.id:
            raise ValueError(f"{path}: runDetails.builder.id is required")
        for rd in pred.build_definition.resolved_dependencies:
            ResourceDescriptor.copy_from_pb(rd).validate()
    print(f"{path}: valid in-toto statement ({doc.get('predicateType')})")
