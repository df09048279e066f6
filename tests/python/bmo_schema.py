#!/usr/bin/env python3
"""Judges a stream of BareMetalHost and Secret documents the way a Kubernetes API server with
strict field validation (`kubectl apply`, the default since 1.27) and BMO would.

    bmo_schema.py CRD.yaml < manifests.yaml

CRD.yaml is BMO's own `config/base/crds/bases/metal3.io_baremetalhosts.yaml`, read as it is.
Its openAPIV3Schema is a structural schema: the API server refuses (strict) or prunes every field
it does not name, at every level, except under `x-kubernetes-preserve-unknown-fields`. JSON
Schema allows unknown fields unless told otherwise, so the schema is turned into one that says
`additionalProperties: false` wherever a structural schema means it, then checked with
`jsonschema` (types, enums, required, patterns). `metadata` is checked as the API server checks
ObjectMeta (name a DNS subdomain, namespace a DNS label, label keys and values), and a Secret as
core/v1 defines it. Last, the references BMO follows: `credentialsName` to a Secret with
`username` and `password`, `userData`/`networkData` to a Secret with that key, in the host's
namespace (BMO's webhook refuses cross-namespace references).

Prints one problem per line and exits 1 when there are any; prints "ok N documents" otherwise.
"""

import base64
import copy
import sys

import jsonschema
import yaml

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# k8s.io/apimachinery/pkg/util/validation: IsQualifiedName and IsValidLabelValue.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$"
)
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"

OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL},
        "labels": {
            "type": "object",
            "propertyNames": {"pattern": LABEL_KEY, "maxLength": 317},
            "additionalProperties": {"type": "string", "pattern": LABEL_VALUE},
        },
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

# core/v1 Secret (k8s.io/api/core/v1 types.go); data values are base64 (`format: byte`), keys
# must be valid Secret keys (IsConfigMapKey).
SECRET = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata"],
    "properties": {
        "apiVersion": {"enum": ["v1"]},
        "kind": {"enum": ["Secret"]},
        "metadata": OBJECT_META,
        "type": {"type": "string"},
        "immutable": {"type": "boolean"},
        "data": {
            "type": "object",
            "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$", "maxLength": 253},
            "additionalProperties": {
                "type": "string",
                "pattern": r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
            },
        },
        "stringData": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def structural(schema):
    """The CRD schema as strict JSON Schema: no unknown fields anywhere, nullable honoured."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        for sub in node.get("properties", {}).values():
            walk(sub)
        if isinstance(node.get("items"), dict):
            walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(key, []):
                walk(sub)
        is_object = node.get("type") == "object" or "properties" in node
        if (
            is_object
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string"):
            node["type"] = ["integer", "string"]
        if node.get("nullable") and "type" in node:
            t = node["type"]
            node["type"] = (t if isinstance(t, list) else [t]) + ["null"]

    walk(s)
    s["properties"]["metadata"] = OBJECT_META
    s["required"] = sorted(set(s.get("required", [])) | {"apiVersion", "kind", "metadata"})
    return s


def crd_schema(path):
    with open(path) as f:
        crd = yaml.safe_load(f)
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    schemas = {}
    for v in crd["spec"]["versions"]:
        if v.get("served"):
            s = structural(v["schema"]["openAPIV3Schema"])
            s["properties"]["apiVersion"] = {"enum": [f"{group}/{v['name']}"]}
            s["properties"]["kind"] = {"enum": [kind]}
            schemas[f"{group}/{v['name']}"] = s
    return kind, schemas


def where(err):
    return "." + ".".join(str(p) for p in err.absolute_path) if err.absolute_path else "."


def main():
    kind, schemas = crd_schema(sys.argv[1])
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
    problems = []
    secrets = {}
    for d in docs:
        if d.get("kind") == "Secret":
            meta = d.get("metadata", {})
            secrets[(meta.get("namespace"), meta.get("name"))] = d
    for i, d in enumerate(docs):
        name = f"{d.get('kind')} {d.get('metadata', {}).get('name')}"
        if d.get("kind") == kind:
            schema = schemas.get(d.get("apiVersion"))
            if schema is None:
                problems.append(f"{name}: apiVersion {d.get('apiVersion')} is not served")
                continue
        elif d.get("kind") == "Secret":
            schema = SECRET
        else:
            problems.append(f"document {i}: kind {d.get('kind')!r} is not judged here")
            continue
        for err in jsonschema.Draft4Validator(schema).iter_errors(d):
            problems.append(f"{name}: {where(err)}: {err.message}")
        if d.get("kind") != kind:
            continue
        ns = d["metadata"].get("namespace")
        spec = d.get("spec", {})
        refs = []
        if "bmc" in spec:
            refs.append(("bmc.credentialsName", ns, spec["bmc"].get("credentialsName"),
                         ["username", "password"]))
        for field, key in (("userData", "userData"), ("networkData", "networkData"),
                           ("metaData", "metaData")):
            ref = spec.get(field)
            if isinstance(ref, dict):
                if ref.get("namespace", ns) != ns:
                    problems.append(f"{name}: {field} refers to another namespace")
                refs.append((field, ns, ref.get("name"), [key]))
        for field, rns, rname, keys in refs:
            secret = secrets.get((rns, rname))
            if secret is None:
                problems.append(f"{name}: {field} names Secret {rname}, not in the stream")
                continue
            for k in keys:
                value = secret.get("data", {}).get(k)
                if value is None:
                    problems.append(f"{name}: Secret {rname} has no {k!r} for {field}")
                else:
                    base64.b64decode(value, validate=True)
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print(f"ok {len(docs)} documents")


if __name__ == "__main__":
    main()
