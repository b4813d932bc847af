"""deploy/: every manifest rendered, linted and validated by the real tools.

kustomize (or `kubectl kustomize`) renders the overlays; kubernetes-validate checks each built-in
object against the Kubernetes schemas; the kserve package's typed models load the KServe objects;
yamllint lints every YAML file; promtool checks and unit-tests the rules; hadolint the Dockerfile.
The rest are the links between files that no schema sees: ports, names, metrics, grace periods.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, DEPLOY_VENV, ROOT, binary, deploy_python, missing

KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("cpu", "gpu")
HTTP_PROBES = KUBERNETES / "components" / "http-probes"
# Each overlay as shipped, and with the http-probes component added (httpGet instead of grpc).
VARIANTS = (*OVERLAYS, *(f"{o}+http-probes" for o in OVERLAYS))
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = (PROMETHEUS / "rules" / "recording.yml", PROMETHEUS / "rules" / "alerts.yml")


def kustomize_command() -> list[str]:
    """A real kustomize: the standalone binary, else the one built into kubectl."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    missing("neither kustomize nor kubectl is installed: install one to render the overlays")


def render(variant: str) -> str:
    """kustomize build of an overlay, or of `overlay+http-probes`: the overlay with the component."""
    overlay, _, component = variant.partition("+")
    target = KUBERNETES / "overlays" / overlay
    with tempfile.TemporaryDirectory() as tmp:
        if component:
            # kustomize takes only relative paths to other kustomizations.
            here = Path(tmp)
            (here / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        "resources": [os.path.relpath(target, here)],
                        "components": [
                            os.path.relpath(KUBERNETES / "components" / component, here)
                        ],
                    }
                )
            )
            target = here
        done = subprocess.run(
            [*kustomize_command(), str(target)], capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict[str, Any]]]:
    """Each variant's objects by kind."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for overlay in VARIANTS:
        objects = [o for o in yaml.safe_load_all(render(overlay)) if o]
        kinds = [o["kind"] for o in objects]
        assert len(kinds) == len(set(kinds)), kinds
        out[overlay] = {o["kind"]: o for o in objects}
    return out


def validate(*sources: Path | str) -> dict[str, Any]:
    """Run check_manifests.py in the deploy venv on files (Path) or rendered YAML (str)."""
    python = deploy_python()
    stdin = "\n---\n".join(s for s in sources if isinstance(s, str))
    args = [str(s) for s in sources if isinstance(s, Path)] + (["-"] if stdin else [])
    done = subprocess.run(
        [str(python), str(Path(__file__).parent / "check_manifests.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def validation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """One run of check_manifests.py (loading the schemas is slow): errors by source file."""
    python = deploy_python()
    workdir = tmp_path_factory.mktemp("manifests")
    sources = {f"overlay-{o}.yaml": render(o) for o in VARIANTS}
    # Mistakes each validator must catch, so the checks are not vacuous.
    deployment = (KUBERNETES / "base" / "deployment.yaml").read_text()
    isvc = (DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
    sources["bad-deployment.yaml"] = deployment.replace("readinessProbe", "readynessProbe")
    sources["bad-isvc.yaml"] = isvc.replace("storageUri", "storageURI")
    paths = []
    for name, text in sources.items():
        (workdir / name).write_text(text)
        paths.append(str(workdir / name))
    paths += [
        str(DEPLOY / "kserve" / "servingruntime.yaml"),
        str(DEPLOY / "kserve" / "inferenceservice.yaml"),
        str(DEPLOY / "kserve" / "inferenceservice-http.yaml"),
        str(KUBERNETES / "prometheus-adapter" / "configmap.yaml"),
    ]
    done = subprocess.run(
        [str(python), str(Path(__file__).parent / "check_manifests.py"), *paths],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    by_file: dict[str, list[str]] = {Path(p).name: [] for p in paths}
    kinds: dict[str, set[str]] = {Path(p).name: set() for p in paths}
    for checked in summary["checked"]:
        path, obj = checked.split(": ", 1)
        kinds[Path(path).name].add(obj.split("/")[0])
    for error in summary["errors"]:
        by_file[Path(error.split(": ", 1)[0]).name].append(error)
    return {"errors": by_file, "kinds": kinds}  # type: ignore[dict-item]


@pytest.mark.parametrize("overlay", VARIANTS)
def test_overlay_objects_pass_the_kubernetes_schemas(validation: Any, overlay: str) -> None:
    assert validation["errors"][f"overlay-{overlay}.yaml"] == []
    assert validation["kinds"][f"overlay-{overlay}.yaml"] == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }


def test_kserve_objects_load_into_the_kserve_models(validation: Any) -> None:
    for name in (
        "servingruntime.yaml",
        "inferenceservice.yaml",
        "inferenceservice-http.yaml",
        "configmap.yaml",
    ):
        assert validation["errors"][name] == [], name
        assert validation["kinds"][name], name


def test_validation_catches_mistakes(validation: Any) -> None:
    assert any("readynessProbe" in e for e in validation["errors"]["bad-deployment.yaml"])
    assert any("storageURI" in e for e in validation["errors"]["bad-isvc.yaml"])


def test_yaml_is_linted() -> None:
    yamllint = DEPLOY_VENV / "bin" / "yamllint"
    if not yamllint.exists():
        deploy_python()  # skips (fails in CI) with the reason
    done = subprocess.run(
        [str(yamllint), "--strict", "-c", str(DEPLOY / "yamllint.yaml"), str(DEPLOY)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_deployment_is_locked_down(rendered: dict[str, dict[str, dict[str, Any]]]) -> None:
    for overlay, objects in rendered.items():
        pod = objects["Deployment"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
        base_overlay, _, component = overlay.partition("+")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if component:  # httpGet on the KServe v2 health endpoints, the overlay's timings
                assert "grpc" not in container[probe], (overlay, probe)
                path = "/v2/health/live" if probe == "livenessProbe" else "/v2/health/ready"
                assert container[probe]["httpGet"] == {"path": path, "port": "http"}
                shipped = rendered[base_overlay]["Deployment"]["spec"]["template"]["spec"]
                timings = {k: v for k, v in shipped["containers"][0][probe].items() if k != "grpc"}
                assert timings.items() <= container[probe].items(), (overlay, probe)
            else:
                assert container[probe]["grpc"]["port"] == 8001, (overlay, probe)
        assert {"requests", "limits"} <= set(container["resources"])
        env = {e["name"]: e["value"] for e in container["env"]}
        server_grace = float(env["CNNSERVE_GRACE_PERIOD_S"])
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > server_grace + pre_stop
        assert env["CNNSERVE_DEVICE"] == base_overlay.replace("gpu", "cuda")
    gpu = rendered["gpu"]["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["image"].endswith(":gpu")


def test_service_hpa_and_monitor_fit_together(
    rendered: dict[str, dict[str, dict[str, Any]]],
) -> None:
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "configmap.yaml").read_text())
    served = {r["name"]["as"] for r in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]}
    metrics_source = (ROOT / "service" / "observability" / "metrics.py").read_text()
    for name in served:  # each adapter rule reads a metric the server exports
        assert f'"{name.removeprefix("cnnserve_")}"' in metrics_source, name
    for objects in rendered.values():
        service, deployment = objects["Service"], objects["Deployment"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
        assert ports["http"]["port"] == 8000 and ports["http"]["appProtocol"] == "http"
        container_ports = {
            p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert {p["targetPort"] for p in ports.values()} <= container_ports
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        hpa = objects["HorizontalPodAutoscaler"]["spec"]
        assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        (metric,) = hpa["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
        pdb = objects["PodDisruptionBudget"]["spec"]
        assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
        monitor = objects["ServiceMonitor"]["spec"]
        assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]


def test_kserve_runtime_matches_the_image() -> None:
    runtime_doc = yaml.safe_load((DEPLOY / "kserve" / "servingruntime.yaml").read_text())
    runtime = runtime_doc["spec"]
    assert runtime["protocolVersions"] == ["v2", "grpc-v2"]
    assert [f["name"] for f in runtime["supportedModelFormats"]] == ["onnx"]
    (container,) = runtime["containers"]
    args = container["args"]
    assert args[args.index("--model-repository") + 1] == "/mnt/models"
    # KServe routes HTTP (v2) to its default container port 8080 when the runtime names none.
    assert args[args.index("--http-port") + 1] == "8080"
    assert "ports" not in container
    for name, protocol in (
        ("inferenceservice.yaml", "grpc-v2"),
        ("inferenceservice-http.yaml", "v2"),
    ):
        model = yaml.safe_load((DEPLOY / "kserve" / name).read_text())["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime_doc["metadata"]["name"], name
        assert model["protocolVersion"] == protocol and model["modelFormat"]["name"] == "onnx"
        if protocol == "grpc-v2":  # gRPC goes to the container port named h2c: --grpc-port
            (port,) = model["ports"]
            assert port["name"] == "h2c"
            assert args[args.index("--grpc-port") + 1] == str(port["containerPort"])
        else:
            assert "ports" not in model, name


def test_promtool_checks_config_and_rules() -> None:
    promtool = binary("promtool", "apt-get install prometheus (make sysdeps)")
    for args in (
        ["check", "config", str(PROMETHEUS / "prometheus.yml")],
        ["check", "rules", *map(str, RULE_FILES)],
        ["test", "rules", str(PROMETHEUS / "rules" / "tests.yml")],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr


def test_rules_read_only_metrics_the_server_exports() -> None:
    from prometheus_client import CollectorRegistry

    from service.observability.metrics import NAMESPACE, ServingMetrics

    registry = CollectorRegistry()
    ServingMetrics(registry)  # every family it registers, with or without samples yet
    exported = {family.name.removeprefix(f"{NAMESPACE}_") for family in registry.collect()}
    assert {"requests", "request_duration_seconds", "queue_depth"} <= exported
    texts = [p.read_text() for p in RULE_FILES]
    texts.append((DEPLOY / "grafana" / "cnnserve-dashboard.json").read_text())
    used = {
        m
        for text in texts
        for m in re.findall(r"\bcnnserve_(\w+?)(?:_total|_bucket|_sum|_count)?\b", text)
    }
    unknown = {m for m in used if m not in exported and not m.startswith("gpu_")}
    assert not unknown, f"rules or dashboard name metrics the server does not export: {unknown}"


def test_hadolint_passes() -> None:
    hadolint = ROOT / ".venv-tools" / "bin" / "hadolint"
    if not hadolint.exists():
        missing(f"{hadolint} is missing: `make tools` installs it")
    done = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_check_script_is_valid_shell() -> None:
    for script in ("gpu-check.sh", "build-image.sh", "local-base.sh", "check-cuda-libs.sh"):
        done = subprocess.run(["bash", "-n", str(DEPLOY / script)], capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)
