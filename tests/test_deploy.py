"""Deployment manifests: schema validation plus the invariants that keep serving correct.

Kubernetes manifests are validated offline against the 1.30 schemas shipped by ``kubernetes-validate``, YAML style
by ``yamllint``, and kustomizations are built with ``kubectl kustomize`` when kubectl is present. Each tool skips
on its own (with the reason) when it is not installed; the invariant checks always run. No docker engine is
needed: Dockerfiles are checked as text, and their HEALTHCHECK command is run against a real gRPC health server.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"
PORT = 50051
METRICS_PORT = 9090
# Custom resources with no schema in the standard set (file -> apiVersion): YAML/yamllint only, and no
# kustomization lists them (`kubectl apply -k` would fail on a cluster without the operator's CRD).
CRD_FILES = {
    K8S / "training" / "pytorchjob.yaml": "kubeflow.org/v1",
    K8S / "monitoring" / "prometheus-rules.yaml": "monitoring.coreos.com/v1",
    K8S / "monitoring" / "podmonitor.yaml": "monitoring.coreos.com/v1",
}


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [
        d
        for p in manifest_files()
        for d in load_docs(p)
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''} under {K8S}, found {len(hits)}"
    return hits[0]


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def mount_of(pod_spec: dict[str, Any], c: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volumeMount at ``path`` and the pod volume behind it."""
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"container {c['name']!r} has {len(mounts)} mounts at {path!r}"
    (vol,) = [v for v in pod_spec["volumes"] if v["name"] == mounts[0]["name"]]
    return mounts[0], vol


def serve_drain_s() -> float:
    """The server's drain after SIGTERM: ``[serve] grace_s`` of the deployment config (20 s as deployed)."""
    from recsys.core.config import read_toml

    drain = read_toml(DEPLOY / "config" / "recsys.toml").get("serve", {}).get("grace_s")
    if drain is None:  # the server's own default, if it is importable; the spec's 20 s otherwise
        try:
            from server.settings import ServeSettings

            drain = ServeSettings().grace_s
        except ImportError:
            drain = 20.0
    return float(drain)


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


# --------------------------------------------------------------------------------------------------- tools


def test_yamllint_passes_on_every_yaml_file():
    linter = pytest.importorskip("yamllint.linter", reason="yamllint is not installed (pip install yamllint)")
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 10
    problems = [
        f"{p.relative_to(ROOT)}:{e.line}:{e.column} {e.level} {e.message}"
        for p in files
        for e in linter.run(p.read_text(), conf, str(p))
    ]
    assert problems == []


def test_manifests_validate_against_kubernetes_schemas():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
    )
    kinds = set()
    for path in manifest_files():
        for doc in load_docs(path):
            if path in CRD_FILES:
                assert doc["apiVersion"] == CRD_FILES[path], path
                continue
            try:
                kv.validate(doc, K8S_VERSION, strict=True)
            except Exception as e:  # ValidationError / SchemaNotFoundError carry the path in the message
                pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}: "
                            f"{getattr(e, 'message', e)}")
            kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "CronJob", "Job",
            "ConfigMap"} <= kinds


def test_schema_validator_rejects_a_misspelled_field():
    # Guards the test above against a validator that silently accepts anything (e.g. non-strict schemas).
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    dep = find("Deployment", "recsys-server")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = PORT
    with pytest.raises(Exception, match="prot"):
        kv.validate(bad, K8S_VERSION, strict=True)


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def test_every_manifest_belongs_to_a_kustomization_and_every_resource_exists():
    listed = set()
    for k in kustomizations():
        spec = yaml.safe_load(k.read_text())
        assert spec["namespace"] == "recsys", k
        for r in spec["resources"]:
            assert (k.parent / r).is_file(), f"{k.relative_to(ROOT)} lists missing resource {r!r}"
            listed.add((k.parent / r).resolve())
    orphans = [p for p in manifest_files() if p.resolve() not in listed and p not in CRD_FILES]
    assert orphans == []


@pytest.mark.parametrize("kdir", [K8S, K8S / "training"], ids=["base", "training"])
def test_kustomize_build_sets_namespace_and_registry_image(kdir):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; `kubectl kustomize` not run")
    out = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "recsys", d["metadata"]["name"]
    images = re.findall(r"image: (\S+)", out.stdout)
    assert images and all(i.startswith("registry.example.com/recsys:0.1.0-") for i in images), images


# ---------------------------------------------------------------------------------------------- serving


def server_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    dep = find("Deployment", "recsys-server")
    pod = dep["spec"]["template"]["spec"]
    return pod, container(pod, "server")


def test_server_probes_are_grpc_on_the_serving_port():
    pod, c = server_pod()
    assert c["args"][0] == "serve"
    port = int(flag(c["args"], "--port"))
    assert port == PORT
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == port, probe
    # Startup must allow a model load of minutes; liveness must not kill a slow-but-alive pod at once.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_termination_grace_outlasts_prestop_and_drain():
    pod, c = server_pod()
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    drain = serve_drain_s()
    assert drain >= 20
    assert pod["terminationGracePeriodSeconds"] > int(pre[1]) + drain
    assert pod["terminationGracePeriodSeconds"] == 45


@pytest.mark.parametrize(
    "kind,name,cname",
    [("Deployment", "recsys-server", "server"), ("CronJob", "recsys-retrain", "retrain"),
     ("Job", "recsys-train", "train")],
)
def test_pods_run_as_non_root_with_read_only_root(kind, name, cname):
    obj = find(kind, name)
    spec = obj["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else obj["spec"]
    pod = spec["template"]["spec"]
    c = container(pod, cname)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    # HOME=/tmp in the images: a writable emptyDir must back it when the root is read-only.
    _, tmp = mount_of(pod, c, "/tmp")
    assert "emptyDir" in tmp


def rwx_claims() -> set[str]:
    return {
        d["metadata"]["name"]
        for d in load_docs(K8S / "pvc.yaml")
        if d["kind"] == "PersistentVolumeClaim" and d["spec"]["accessModes"] == ["ReadWriteMany"]
    }


def test_models_pvc_is_mounted_where_the_server_reads_models():
    pod, c = server_pod()
    models_dir = flag(c["args"], "--models")
    mount, vol = mount_of(pod, c, models_dir)
    assert mount.get("readOnly") is True
    assert vol["persistentVolumeClaim"]["claimName"] == "recsys-models"
    assert "recsys-models" in rwx_claims()  # every replica, on any node, reads the same bundles


def test_server_config_secret_and_metrics_wiring():
    pod, c = server_pod()
    config = flag(c["args"], "--config")
    _, vol = mount_of(pod, c, str(Path(config).parent))
    cm = find("ConfigMap", vol["configMap"]["name"])
    assert Path(config).name in cm["data"]
    (tok,) = [e for e in c["env"] if e["name"] == "RECSYS_ADMIN_TOKEN"]
    assert "value" not in tok
    assert tok["valueFrom"]["secretKeyRef"] == {"name": "recsys-admin", "key": "token"}
    metrics = int(flag(c["args"], "--metrics-port"))
    assert metrics == METRICS_PORT
    ann = find("Deployment", "recsys-server")["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == metrics
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == metrics


def test_service_is_headless_and_selects_the_server_pods():
    svc = find("Service", "recsys-headless")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"].get("publishNotReadyAddresses", False) is False  # DNS lists only pods with a model
    labels = find("Deployment", "recsys-server")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    grpc_port = {p["name"]: p for p in svc["spec"]["ports"]}["grpc"]
    assert grpc_port["port"] == PORT and grpc_port["targetPort"] == "grpc"


def test_hpa_scales_the_server_deployment():
    hpa = find("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "recsys-server")
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    _, c = server_pod()
    assert "cpu" in c["resources"]["requests"]  # Utilization targets are relative to the request


# ---------------------------------------------------------------------------------------------- retraining


def test_retrain_cronjob_forbids_overlap_and_writes_the_served_models_pvc():
    cj = find("CronJob", "recsys-retrain")
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    c = container(pod, "retrain")
    assert c["args"][0] == "retrain"
    mount, vol = mount_of(pod, c, flag(c["args"], "--models"))
    assert not mount.get("readOnly", False)
    assert vol["persistentVolumeClaim"]["claimName"] == "recsys-models"
    logs_glob = flag(c["args"], "--logs")
    assert logs_glob.endswith("*.parquet")
    logs_mount, logs_vol = mount_of(pod, c, str(Path(logs_glob).parent))
    assert logs_vol["persistentVolumeClaim"]["claimName"] == "recsys-logs"


def test_training_job_runs_torchrun_with_one_process_per_gpu():
    job = find("Job", "recsys-train")
    pod = job["spec"]["template"]["spec"]
    c = container(pod, "train")
    cmd = c["command"] + c["args"]
    assert cmd[0] == "torchrun"
    nproc = int(flag(cmd, "--nproc_per_node"))
    assert nproc == 8
    assert cmd[cmd.index("-m") + 1: cmd.index("-m") + 3] == ["recsys", "train"]
    assert flag(cmd, "--device") == "cuda"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == nproc
    _, shm = mount_of(pod, c, "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    _, work = mount_of(pod, c, "/work")
    assert work["persistentVolumeClaim"]["claimName"] in rwx_claims()
    assert flag(cmd, "--data").startswith("/work/") and flag(cmd, "--out").startswith("/work/")


def test_pytorchjob_matches_the_training_job():
    (pj,) = load_docs(K8S / "training" / "pytorchjob.yaml")
    assert pj["kind"] == "PyTorchJob"
    for role in ("Master", "Worker"):
        pod = pj["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]
        c = container(pod, "pytorch")  # the operator finds the training container by this name
        cmd = c["command"] + c["args"]
        assert int(flag(cmd, "--nproc_per_node")) == int(pj["spec"]["nprocPerNode"])
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == int(pj["spec"]["nprocPerNode"])
        assert pod["securityContext"]["runAsNonRoot"] is True


# ---------------------------------------------------------------------------------------------- config


def test_configmap_toml_equals_the_compose_config():
    cm = find("ConfigMap", "recsys-config")
    assert cm["data"]["recsys.toml"] == (DEPLOY / "config" / "recsys.toml").read_text()


# section -> (module, class): every table in the deployment config is loaded by its owner's dataclass, which
# rejects unknown fields, so a renamed field fails here instead of in the pod.
CONFIG_CLASSES = {
    "model": ("recsys.train.config", "ModelConfig"),
    "train": ("recsys.train.config", "TrainConfig"),
    "loss": ("recsys.train.config", "LossConfig"),
    "retrain": ("recsys.retrain", "RetrainConfig"),
    "index": ("recsys.retrieval", "IndexConfig"),
    "serve": ("server.settings", "ServeSettings"),
}


def config_sections() -> list[str]:
    from recsys.core.config import read_toml

    return sorted(read_toml(DEPLOY / "config" / "recsys.toml"))


@pytest.mark.parametrize("section", config_sections())
def test_deployment_config_section_loads(section):
    import importlib

    from recsys.core.config import load_section

    assert section in CONFIG_CLASSES, f"[{section}] in deploy/config/recsys.toml has no known config class"
    module, cls_name = CONFIG_CLASSES[section]
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ModuleNotFoundError, AttributeError) as e:
        pytest.skip(f"{module}.{cls_name} is not available yet ({e})")
    cfg = load_section(cls, section, path=DEPLOY / "config" / "recsys.toml")
    from recsys.core.config import read_toml

    for field, value in read_toml(DEPLOY / "config" / "recsys.toml")[section].items():
        assert getattr(cfg, field) == value, (section, field)


# ---------------------------------------------------------------------------------------------- CLI


def cli_invocations() -> list[tuple[str, list[str]]]:
    """Every `recsys` command line the manifests and compose file run, as argv after `recsys`."""
    _, server = server_pod()
    retrain = container(find("CronJob", "recsys-retrain")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                        "retrain")
    train = container(find("Job", "recsys-train")["spec"]["template"]["spec"], "train")
    train_cmd = train["command"] + train["args"]
    compose = compose_file()
    retrain_loop = compose["services"]["retrain"]["command"][0]
    (line,) = [ln for ln in retrain_loop.splitlines() if "recsys retrain" in ln]
    compose_retrain = shlex.split(line.split("recsys", 1)[1].split("\\")[0])
    return [
        ("k8s-server", server["args"]),
        ("k8s-retrain", retrain["args"]),
        ("k8s-train", train_cmd[train_cmd.index("-m") + 2:]),
        ("compose-server", compose["services"]["server"]["command"]),
        ("compose-retrain", compose_retrain),
    ]


@pytest.mark.parametrize("label,argv", cli_invocations(), ids=[x[0] for x in cli_invocations()])
def test_command_lines_parse_with_the_real_cli(label, argv):
    import importlib

    from recsys.cli import COMMANDS, build_parser

    try:
        importlib.import_module(COMMANDS[argv[0]])
    except ModuleNotFoundError as e:
        pytest.skip(f"`recsys {argv[0]}` is not implemented yet ({e.name})")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{label}: `recsys {shlex.join(argv)}` is rejected by the CLI (exit {e.code})")
    assert args.command == argv[0]


# ---------------------------------------------------------------------------------------------- compose


def volume_targets(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target path -> (source, read_only) for short-syntax volumes."""
    out = {}
    for v in service["volumes"]:
        src, target, *mode = v.split(":")
        out[target] = (src, mode == ["ro"])
    return out


def test_compose_server_and_retrain_share_the_models_volume():
    compose = compose_file()
    server, retrain = compose["services"]["server"], compose["services"]["retrain"]
    models_dir = flag(server["command"], "--models")
    assert volume_targets(server)[models_dir] == ("models", True)
    assert "--models /models" in retrain["command"][0] and volume_targets(retrain)["/models"] == ("models", False)
    assert "--logs '/logs/*.parquet'" in retrain["command"][0]
    assert volume_targets(retrain)["/logs"] == ("logs", True)
    assert {"models", "logs"} <= set(compose["volumes"])
    for name in ("server", "retrain"):
        assert compose["services"][name]["restart"] in ("unless-stopped", "always")


def test_compose_server_health_and_shutdown():
    server = compose_file()["services"]["server"]
    assert server["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert flag(server["command"], "--port") == str(PORT)
    assert f"{PORT}:{PORT}" in server["ports"]
    grace = int(server["stop_grace_period"].rstrip("s"))
    assert grace > serve_drain_s()
    assert "RECSYS_ADMIN_TOKEN" in server["environment"]
    assert compose_file()["services"]["retrain"]["healthcheck"] == {"disable": True}


def test_compose_retrain_loop_is_valid_shell():
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh to syntax-check the retrain loop")
    script = compose_file()["services"]["retrain"]["command"][0].replace("$$", "$")  # compose's escaping
    out = subprocess.run([sh, "-n", "-c", script], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------- Dockerfiles

DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


def stages(text: str) -> list[list[str]]:
    """Instructions grouped by build stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out: list[list[str]] = []
    for ln in joined.splitlines():
        ln = ln.strip()
        if not ln:
            continue
        if ln.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(ln)
    return out


def test_there_is_a_cpu_and_a_cuda_dockerfile():
    assert {p.name for p in DOCKERFILES} == {"cpu.Dockerfile", "cuda.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_and_runs_as_non_root(path):
    text = path.read_text()
    st = stages(text)
    assert len(st) >= 2, f"{path.name}: expected a multi-stage build"
    final = st[-1]
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users, f"{path.name}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{path.name}: final USER must be a numeric non-root uid, got {uid!r}"
    assert any(ln.startswith("COPY --from=build") for ln in final)
    assert 'ENTRYPOINT ["recsys"]' in final
    # Pinned bases: every ARG-provided image has an explicit, non-latest tag.
    images = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, flags=re.M)
    assert images and all(":" in i and not i.endswith(":latest") for i in images), images
    for ln in (ln for s in st for ln in s if ln.startswith("RUN ") and "pip install" in ln):
        assert "--no-cache-dir" in ln, ln
    assert re.search(r"pip install --no-cache-dir \.", text), "the project itself must be installed"
    # No secrets baked into layers.
    assert not re.search(r"^(ENV|ARG)\s+\S*(TOKEN|PASSWORD|SECRET)", text, flags=re.M | re.I)


def test_cpu_image_uses_the_cpu_torch_index_and_a_grpc_healthcheck():
    text = (DEPLOY / "docker" / "cpu.Dockerfile").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    final = stages(text)[-1]
    (hc,) = [ln for ln in final if ln.startswith("HEALTHCHECK")]
    assert "grpc_health.v1" in hc
    assert "EXPOSE 50051 9090" in final


def test_cuda_image_starts_from_an_official_cuda_pytorch_base():
    text = (DEPLOY / "docker" / "cuda.Dockerfile").read_text()
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, flags=re.M)
    assert bases and all(b.startswith(("pytorch/pytorch:", "nvidia/cuda:")) and "cuda" in b for b in bases)
    assert any("runtime" in b for b in bases)


# ------------------------------------------------------------------------------- healthcheck, end to end


def healthcheck_codes() -> list[tuple[str, str]]:
    cpu = (DEPLOY / "docker" / "cpu.Dockerfile").read_text()
    (hc,) = [ln for ln in stages(cpu)[-1] if ln.startswith("HEALTHCHECK")]
    import json

    docker_cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
    compose_cmd = compose_file()["services"]["server"]["healthcheck"]["test"]
    assert docker_cmd[:2] == ["python", "-c"] and compose_cmd[:3] == ["CMD", "python", "-c"]
    return [("dockerfile", docker_cmd[2]), ("compose", compose_cmd[3])]


@pytest.fixture(scope="module")
def health_server():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer, health_pb2
    server.stop(None)


def run_check(code: str, port: int) -> int:
    assert "127.0.0.1:50051" in code
    code = code.replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("source", ["dockerfile", "compose"])
def test_healthcheck_command_follows_the_serving_status(source, health_server):
    port, servicer, health_pb2 = health_server
    code = dict(healthcheck_codes())[source]
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # no model loaded yet
    assert run_check(code, port) == 1
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_check(code, port) == 0


def test_healthcheck_fails_when_nothing_listens(health_server):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert run_check(dict(healthcheck_codes())["dockerfile"], free) != 0


# ---------------------------------------------------------------------------------------------- README


def test_readme_documents_client_side_round_robin_for_the_headless_service():
    text = (DEPLOY / "README.md").read_text()
    svc = find("Service", "recsys-headless")["metadata"]["name"]
    assert f"dns:///{svc}.recsys.svc.cluster.local:{PORT}" in text
    assert '{"loadBalancingConfig": [{"round_robin": {}}]}' in text
    assert "torchrun --nproc_per_node 8 -m recsys train" in text


# ---------------------------------------------------------------------------------------------- monitoring
#
# The Grafana dashboard and the PrometheusRule may only query metrics the server exports. The names come from a
# live prometheus_client registry (server.metrics.Metrics), with the suffixes the exposition format adds. PromQL
# is parsed with `promql-parser` (pip install promql-parser: the Prometheus grammar, via the Rust crate) when it
# is installed; otherwise a fallback checks balanced brackets and pulls the metric names out with a tokenizer.

DASHBOARD = DEPLOY / "grafana" / "recsys-dashboard.json"
RULES = K8S / "monitoring" / "prometheus-rules.yaml"
# Metrics the deploy files use that the server does not export yet: (type, labels, what it is). Remove an entry
# when server/metrics.py exports it (the test below then checks its type and labels).
PENDING_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {}
# labels Prometheus itself attaches to every scraped series (target labels), besides the metric's own
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                   "offset", "atan2", "inf", "nan"}


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the server's registry exposes -> its label names (a live ``Metrics()``)."""
    from server.metrics import Metrics

    m = Metrics()
    m.observe("Recommend", "OK", 0.001)  # create one child of each labelled metric, for the label names
    m.set_version("v1")
    m.reloads.labels("ok").inc()
    out: dict[str, set[str]] = {}
    for fam in m.registry.collect():
        labels = {k for s in fam.samples for k in s.labels} - {"le", "quantile"}
        for suffix in SUFFIXES[fam.type]:
            out[fam.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def grafana_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query, Grafana's variables replaced by values Prometheus accepts."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    out += [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    return [(w, re.sub(r"\$\w+", ".*", re.sub(r"\$__(rate_interval|interval|range)", "5m", e))) for w, e in out]


def rule_exprs() -> list[tuple[str, str]]:
    (doc,) = load_docs(RULES)
    return [(f"alert {r['alert']}", r["expr"]) for g in doc["spec"]["groups"] for r in g["rules"]]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every series selector in ``expr``; raises if it is not PromQL."""
    try:
        import promql_parser as pp
    except ImportError:
        return _selectors_fallback(expr)
    found: list[tuple[str, set[str]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, pp.MatrixSelector):
            node = node.vector_selector
        if isinstance(node, pp.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            name = node.name or next(m.value for m in node.matchers.matchers if m.name == "__name__")
            found.append((name, labels - {"__name__"}))
            return
        for attr in ("expr", "lhs", "rhs", "param"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or ():
            walk(arg)

    walk(pp.parse(expr))
    return found


def _selectors_fallback(expr: str) -> list[tuple[str, set[str]]]:
    """Without a PromQL parser: brackets balance, and every identifier that is not a function, keyword, grouping
    label or label matcher is a metric name."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stack = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            assert stack and stack.pop() + ch in ("()", "[]", "{}"), f"unbalanced {ch!r} in {expr!r}"
    assert not stack, f"unclosed {stack} in {expr!r}"
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = []
    for m in re.finditer(r"([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = m.groups()
        if call or name in PROMQL_KEYWORDS or re.fullmatch(r"\d\w*", name):
            continue
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""))))
    return found


def all_exprs() -> list[tuple[str, str]]:
    return [(f"{DASHBOARD.name}: {w}", e) for w, e in grafana_exprs()] + [(f"{RULES.name}: {w}", e)
                                                                           for w, e in rule_exprs()]


def test_dashboard_and_rules_query_only_metrics_the_server_exports():
    exported = exported_metrics()
    known = {**exported, **{name: set(labels) for name, (_, labels, _) in PENDING_METRICS.items()}}
    problems, used = [], set()
    for where, expr in all_exprs():
        try:
            sels = selectors(expr)
        except (ValueError, AssertionError) as e:
            problems.append(f"{where}: not PromQL ({e}): {expr}")
            continue
        assert sels, f"{where}: no metric in {expr}"
        for name, labels in sels:
            used.add(name)
            if name not in known:
                problems.append(f"{where}: {name} is not exported by the server")
            elif labels - known[name] - TARGET_LABELS:
                problems.append(f"{where}: {name} has no label(s) {sorted(labels - known[name] - TARGET_LABELS)}")
    assert problems == []
    # the families the issue asks for are on the dashboard or in the rules
    assert {"recsys_requests_total", "recsys_request_latency_seconds_bucket", "recsys_model_version_info",
            "recsys_model_reloads_total", "recsys_bundles_refused_total"} <= used


def test_pending_metrics_are_not_exported_yet():
    # When the server starts exporting one, drop it from PENDING_METRICS: the check above then uses its real labels.
    exported = exported_metrics()
    assert sorted(set(PENDING_METRICS) & set(exported)) == []


def test_every_server_metric_is_on_the_dashboard():
    exported = exported_metrics()
    families = {n.removesuffix(s) for n in exported for s in ("_total", "_bucket") if n.endswith(s)} | {
        n for n in exported if not n.endswith(("_total", "_bucket", "_count", "_sum", "_created"))}
    text = DASHBOARD.read_text()
    assert sorted(f for f in families if f not in text) == []


def test_dashboard_is_a_grafana_dashboard_model():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
GROUP_KEYS = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset"}
DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")


def test_prometheus_rule_follows_the_rule_schema():
    (doc,) = load_docs(RULES)
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "recsys"
    assert set(doc["spec"]) == {"groups"}
    groups = doc["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    alerts = []
    for g in groups:
        assert set(g) <= GROUP_KEYS and g["rules"], g["name"]
        for r in g["rules"]:
            assert set(r) <= RULE_KEYS and "alert" in r and "record" not in r, r
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", r["alert"]) and isinstance(r["expr"], str), r
            assert DURATION.match(r.get("for", "0s")), r
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert {"summary", "description"} <= set(r["annotations"]), r["alert"]
            for text in r["annotations"].values():  # Go templates: {{ ... }} pairs
                assert text.count("{{") == text.count("}}"), r["alert"]
            alerts.append(r["alert"])
    assert len(alerts) == len(set(alerts))
    assert {"RecsysHighErrorRatio", "RecsysHighLatencyP99", "RecsysNoModelLoaded", "RecsysBundleRefused",
            "RecsysRetrainStale"} <= set(alerts)


def test_promql_checker_rejects_what_prometheus_would():
    # guards the checks above against a parser (or fallback) that accepts anything
    with pytest.raises((ValueError, AssertionError)):
        selectors("sum(rate(recsys_requests_total[5m])")
    assert [n for n, _ in selectors('sum by (code) (rate(recsys_requests_total{method="Recommend"}[5m]))')] == [
        "recsys_requests_total"]
    assert _selectors_fallback("histogram_quantile(0.99, sum by (le) (rate(x_bucket{a=\"b\"}[5m]))) > 1") == [
        ("x_bucket", {"a"})]
    # the fallback finds what the parser finds in every shipped expression
    if importlib.util.find_spec("promql_parser") is not None:
        for where, expr in all_exprs():
            def canon(sels: list[tuple[str, set[str]]]) -> list[tuple[str, list[str]]]:
                return sorted((name, sorted(labels)) for name, labels in sels)

            assert canon(_selectors_fallback(expr)) == canon(selectors(expr)), where
