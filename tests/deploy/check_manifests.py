"""Validate rendered manifests (run in .venv-deploy: kubernetes-validate and kserve live there).

Usage: check_manifests.py FILE... (each a YAML stream, `-` for stdin). Every built-in Kubernetes
object is validated strictly (unknown fields are errors) against the schemas kubernetes-validate
ships for the newest Kubernetes it knows; KServe objects are loaded into the kserve package's
typed models and must survive the round trip with no field dropped (a dropped field is one the
API does not know). Prints a JSON summary: kinds checked, and errors.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import kserve.models
import kubernetes.client.models as k8s_models
import kubernetes_validate
import yaml

KSERVE_MODELS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
}
# Custom resources with no schema in either package; their fields are checked by the tests.
OTHER_CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}
LIST = re.compile(r"^(?:list|List)\[(.*)\]$")
DICT = re.compile(r"^(?:dict\(str, (.*)\)|Dict\[str, (.*)\])$")


def load(value: Any, kind: str, path: str, errors: list[str]) -> Any:
    """Build the typed model `kind` from plain data, recording fields the model does not know.

    kserve's models nest the Kubernetes client's (V1ObjectMeta, V1Container, ...) and mix two
    spellings of container types, which neither package's own deserializer follows: walk them.
    """
    if value is None:
        return None
    if match := LIST.match(kind):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return None
        return [load(v, match.group(1), f"{path}/{i}", errors) for i, v in enumerate(value)]
    if match := DICT.match(kind):
        inner = match.group(1) or match.group(2)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return None
        return {k: load(v, inner, f"{path}/{k}", errors) for k, v in value.items()}
    if kind in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[kind]):
            errors.append(f"{path}: expected {kind}, got {type(value).__name__}")
        return value
    if kind in ("object", "Any", "datetime", "date"):
        return value
    model = getattr(kserve.models, kind, None) or getattr(k8s_models, kind, None)
    if model is None:
        errors.append(f"{path}: no model class {kind}")
        return None
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({kind})")
        return None
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    kwargs = {}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}/{key}: field unknown to {kind}")
            continue
        attr = by_json[key]
        kwargs[attr] = load(item, model.openapi_types[attr], f"{path}/{key}", errors)
    try:
        return model(**kwargs)  # the generated constructor checks required fields and enums
    except (TypeError, ValueError) as exc:
        errors.append(f"{path}: {kind}: {exc}")
        return None


def check_kserve(obj: dict[str, Any], model: str) -> list[str]:
    errors: list[str] = []
    load(obj, model, "", errors)
    return errors


def main(paths: list[str]) -> dict[str, Any]:
    version = kubernetes_validate.latest_version()
    summary: dict[str, Any] = {"kubernetes": version, "checked": [], "errors": []}
    for path in paths:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path) as handle:
                text = handle.read()
        for obj in yaml.safe_load_all(text):
            if not obj:
                continue
            key = (obj.get("apiVersion"), obj.get("kind"))
            name = f"{path}: {key[1]}/{obj.get('metadata', {}).get('name')}"
            try:
                if key in KSERVE_MODELS:
                    errors = check_kserve(obj, KSERVE_MODELS[key])
                elif key in OTHER_CRDS:
                    errors = []
                else:
                    kubernetes_validate.validate(obj, version, strict=True)
                    errors = []
            except Exception as exc:  # each validator raises its own kinds
                errors = [f"{type(exc).__name__}: {exc}"]
            summary["checked"].append(name)
            summary["errors"] += [f"{name}: {e}" for e in errors]
    return summary


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
