"""The Helm chart (deploy/helm/tgi-mp) and the manifests rendered from it (deploy/k8s/),
checked without a cluster: `helm lint` and `helm template`, every object against the
Kubernetes 1.34 OpenAPI schemas (kubernetes-validate, strict: no unknown fields),
yamllint, and the invariants that tie the chart to the server (probes on a route it
serves, a grace period longer than its drain, one port everywhere, the autoscaler's
metric, GPUs and shards, the cache volume, secrets).

kubernetes-validate knows only Kubernetes' own kinds: the ServiceMonitor (a Prometheus
Operator CRD) is checked by `test_service_monitor` instead.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import inspect
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from tgi_mp import options
from tgi_mp.frontend import metrics as frontend_metrics
from tgi_mp.frontend.openapi import openapi_document

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "tgi-mp"
KUBERNETES_VERSION = "1.34"
RELEASE = "tgi-mp"

# Renders, by name: the `helm template` arguments after the release and chart.
DEFAULT: tuple[str, ...] = ()
GPU = ("--values", str(CHART / "ci" / "gpu-values.yaml"))
FULL = ("--values", str(CHART / "ci" / "full-values.yaml"))
RENDERS = {
    "default": DEFAULT,
    "gpu": GPU,
    "full": FULL,
    # The other ways of giving the secrets and the cache, and 4 GPUs.
    "secrets-swapped": (
        "--set",
        "hfToken.value=hf_not_real,apiKey.existingSecret=api-keys,apiKey.existingSecretKey=key",
    ),
    "hostpath": ("--set", "cache.hostPath=/mnt/hf-cache"),
    "existing-claim": (
        "--set",
        "cache.persistentVolumeClaim.enabled=true,cache.persistentVolumeClaim.existingClaim=models",
    ),
    "gpu4": ("--set", "gpu.count=4,model.id=meta-llama/Llama-3.1-70B-Instruct"),
    "long-drain": ("--set", "server.gracefulTerminationTimeout=600.5,server.port=8080"),
}


def _load_render_script() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_script = _load_render_script()


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    helm = render_script.helm()  # on PATH, else next to this Python
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False)


@functools.cache
def rendered_text(name: str) -> str:
    proc = run_helm("template", RELEASE, str(CHART), *RENDERS[name])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@functools.cache
def _objects(name: str) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(rendered_text(name)) if d)


def objects(name: str) -> list[dict]:
    return json.loads(json.dumps(_objects(name)))  # a fresh copy for each test


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def kinds(objs: list[dict]) -> set[str]:
    return {o["kind"] for o in objs}


def container(objs: list[dict]) -> dict:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def pod_spec(objs: list[dict]) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def setting(c: dict, option: str) -> str | None:
    """What the container is given for a `tgi-mp serve` option: its flag in the args
    (`--flag=value`, `--flag value`; the last one wins, as in click) or else its
    environment variable; None when neither."""
    opt = options.BY_NAME[option]
    args, value = c.get("args", []), None
    for i, a in enumerate(args):
        if a.startswith(opt.flag + "="):
            value = a.split("=", 1)[1]
        elif a == opt.flag and i + 1 < len(args):
            value = args[i + 1]
    if value is None and opt.envvar and opt.name.upper() in env(c):
        value = env(c)[opt.name.upper()]["value"]
    return value


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def get_routes() -> set[str]:
    doc = json.loads(openapi_document("test"))
    return {path for path, ops in doc["paths"].items() if "get" in ops}


# ------------------------------------------------------------------ helm itself


@pytest.mark.parametrize("values_file", [None, "ci/gpu-values.yaml", "ci/full-values.yaml"])
def test_helm_lint(values_file: str | None) -> None:
    """`helm lint --strict` passes (warnings fail too) with each values file."""
    extra = ["--values", str(CHART / values_file)] if values_file else []
    proc = run_helm("lint", "--strict", str(CHART), *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_objects_valid_for_kubernetes(name: str) -> None:
    """Every object but the ServiceMonitor CRD validates against Kubernetes 1.34's
    schemas, strictly (unknown fields fail), and none names a namespace (the release's
    or `kubectl apply -n`'s applies)."""
    objs = objects(name)
    assert {"Deployment", "Service"} <= kinds(objs)
    for obj in objs:
        assert "namespace" not in obj["metadata"], obj["kind"]
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_optional_objects() -> None:
    """The defaults make a Deployment, a Service and a PDB; the full values add the
    ServiceMonitor, HPA, PVC, Secret and ServiceAccount."""
    assert kinds(objects("default")) == {"Deployment", "Service", "PodDisruptionBudget"}
    assert kinds(objects("full")) == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "Secret",
        "ServiceAccount",
    }


def _lint(text: str, what: str) -> None:
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = [f"{what}:{p.line}:{p.column} {p.level} {p.message}" for p in linter.run(text, conf)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_rendered_yamllint(name: str) -> None:
    """What the templates render passes yamllint (deploy/.yamllint), warnings included."""
    _lint(rendered_text(name), f"render {name}")


def test_chart_files_yamllint() -> None:
    """values.yaml, Chart.yaml, the ci/ values and deploy/k8s/ pass yamllint."""
    files = [CHART / "values.yaml", CHART / "Chart.yaml", *sorted((CHART / "ci").glob("*.yaml"))]
    files += sorted((DEPLOY / "k8s").glob("*.yaml"))
    for path in files:
        _lint(path.read_text(), str(path.relative_to(ROOT)))


@pytest.mark.parametrize("name", sorted(render_script.VARIANTS))
def test_checked_in_manifests_are_current(name: str) -> None:
    """deploy/k8s/NAME is exactly what `python deploy/render.py` writes from the chart."""
    path = DEPLOY / "k8s" / name
    assert path.exists(), f"{path} missing: run python deploy/render.py"
    assert path.read_text() == render_script.render(name), (
        f"deploy/k8s/{name} is stale: run python deploy/render.py"
    )


def test_checked_in_variants() -> None:
    """deploy/k8s/cpu.yaml runs without GPUs, gpu.yaml with one (and one shard)."""
    for name, gpus in (("cpu.yaml", 0), ("gpu.yaml", 1)):
        objs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
        c = container(objs)
        limits = c["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu", 0) == gpus, name
        assert int(setting(c, "num_shard") or 1) == max(gpus, 1), name


# ------------------------------------------------------------------ the server's side


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_probes_hit_served_routes(name: str) -> None:
    """Startup, readiness and liveness probes GET a route the server answers (its
    OpenAPI document's GET paths), on the container's `http` port; the startup probe
    allows at least 30 minutes for a download, load and warm-up."""
    c = container(objects(name))
    served = get_routes()
    assert "/health" in served
    port_names = {p["name"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in served, f"{probe} GETs {get['path']}, not a route"
        assert get["port"] in port_names, probe
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 30 * 60


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_grace_period_outlasts_drain(name: str) -> None:
    """terminationGracePeriodSeconds covers the preStop sleep, the drain the container
    is given (--graceful-termination-timeout), and the 10 s the server then takes to
    answer what it cut."""
    spec = pod_spec(objects(name))
    c = container(objects(name))
    given = setting(c, "graceful_termination_timeout")
    drain = float(
        given if given is not None else options.BY_NAME["graceful_termination_timeout"].default
    )
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    grace = spec["terminationGracePeriodSeconds"]
    assert grace > drain
    assert grace - pre_stop - drain >= 10, (grace, pre_stop, drain)
    assert 0 < pre_stop < grace - drain


def test_grace_values_are_the_servers() -> None:
    """The chart's drain default is the server's own, and its parts are checked: an
    empty drain or a margin under 10 s is refused."""
    default = options.BY_NAME["graceful_termination_timeout"].default
    assert values()["server"]["gracefulTerminationTimeout"] == default
    assert setting(container(objects("default")), "graceful_termination_timeout") == f"{default:g}"
    for bad in ("server.gracefulTerminationTimeout=0", "server.terminationGraceMarginSeconds=9"):
        proc = run_helm("template", RELEASE, str(CHART), "--set", bad)
        assert proc.returncode != 0 and "must be" in proc.stderr, bad


@pytest.mark.parametrize(
    "given",
    [
        "extraArgs={--port=8080}",
        "extraArgs={-p,8080}",
        "extraArgs={--hostname=127.0.0.1}",
        "extraArgs={--graceful-termination-timeout=600}",
        "extraArgs={--num-shard=2}",
        "extraEnv[0].name=PORT,extraEnv[0].value=8080",
        "extraEnv[0].name=HF_HOME,extraEnv[0].value=/tmp",
    ],
)
def test_drifting_overrides_refused(given: str) -> None:
    """extraArgs / extraEnv cannot override what the chart derives the ports, probes,
    grace period, GPU count or cache mount from (click takes the last flag; the
    kubelet the last variable)."""
    proc = run_helm("template", RELEASE, str(CHART), "--set", given)
    assert proc.returncode != 0, given
    assert re.search(r"execution error .*: extra(Args|Env): ", proc.stderr), proc.stderr


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_one_port(name: str) -> None:
    """The server listens on PORT, which is the container port named `http`, which the
    Service targets by name; it listens on every address, not $HOSTNAME's default."""
    objs = objects(name)
    c = container(objs)
    (port,) = c["ports"]
    assert port["name"] == "http"
    assert int(setting(c, "port")) == port["containerPort"]
    assert setting(c, "hostname") in ("0.0.0.0", "::")
    (svc_port,) = one(objs, "Service")["spec"]["ports"]
    assert svc_port["targetPort"] == "http"
    svc = one(objs, "Service")
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_args_are_serve_options(name: str) -> None:
    """Every flag the container gets is a `tgi-mp serve` option (the image's entrypoint),
    and every environment variable named after one is that option's variable."""
    c = container(objects(name))
    flags = {o.flag for o in options.OPTIONS}
    for arg in c.get("args", []):
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in flags, arg
    env_options = {o.name.upper(): o for o in options.OPTIONS}
    for var in env(c):
        if var in env_options:
            assert env_options[var].envvar, f"{var} is not read by tgi-mp serve"
    assert "API_KEY" in env_options and env_options["API_KEY"].envvar
    assert env(c)["HF_HOME"]["value"] == "/data"
    assert pod_spec(objects(name))["enableServiceLinks"] is False


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_cache_and_shm_volumes(name: str) -> None:
    """/data (HF_HOME) is the claim, hostPath or emptyDir the values choose, and
    /dev/shm a memory-backed emptyDir."""
    objs = objects(name)
    c, spec = container(objs), pod_spec(objs)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    cache = volumes[mounts["/data"]]
    if name in ("full", "existing-claim"):
        claim = cache["persistentVolumeClaim"]["claimName"]
        if name == "existing-claim":
            assert claim == "models"
            assert "PersistentVolumeClaim" not in kinds(objs)
        else:
            assert claim == one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    elif name == "hostpath":
        assert cache["hostPath"]["path"] == "/mnt/hf-cache"
    else:
        assert "emptyDir" in cache
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", ["full", "secrets-swapped"])
def test_secrets_come_from_secret_key_refs(name: str) -> None:
    """HF_TOKEN and API_KEY come from a secretKeyRef (never a literal, never a flag):
    an existing Secret and key as given, or the chart's Secret holding the value."""
    objs = objects(name)
    c = container(objs)
    assert not any(a.startswith("--api-key") for a in c.get("args", []))
    secrets = {s["metadata"]["name"]: s for s in objs if s["kind"] == "Secret"}
    expected = {
        "full": {
            "HF_TOKEN": ("hf-token", "token", None),
            "API_KEY": (RELEASE, "API_KEY", "not-a-real-key"),
        },
        "secrets-swapped": {
            "HF_TOKEN": (RELEASE, "HF_TOKEN", "hf_not_real"),
            "API_KEY": ("api-keys", "key", None),
        },
    }[name]
    for var, (secret, key, value) in expected.items():
        e = env(c)[var]
        assert "value" not in e
        assert e["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
        if value is None:
            assert secret not in secrets  # existing: not the chart's to create
        else:
            assert base64.b64decode(secrets[secret]["data"][key]).decode() == value
            assert value not in json.dumps(one(objs, "Deployment"))
    # The chart's Secret holds only what it was given a value for.
    assert sum(len(s["data"]) for s in secrets.values()) == 1


def test_no_secrets_by_default() -> None:
    c = container(objects("default"))
    assert "HF_TOKEN" not in env(c) and "API_KEY" not in env(c)
    assert "Secret" not in kinds(objects("default"))


# ------------------------------------------------------------------ GPUs and scaling


@pytest.mark.parametrize(("name", "gpus"), [("default", 0), ("gpu", 1), ("gpu4", 4)])
def test_gpus_and_shards(name: str, gpus: int) -> None:
    """With gpu.count GPUs the pod requests that many nvidia.com/gpu, runs that many
    shards (--num-shard), uses the CUDA image and tolerates the GPU taint; without,
    none of these."""
    objs = objects(name)
    c, spec = container(objs), pod_spec(objs)
    limits = c["resources"].get("limits", {})
    tolerated = {t["key"] for t in spec.get("tolerations", [])}
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus
        assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
        assert int(setting(c, "num_shard")) == gpus
        assert c["image"].endswith(":" + values()["gpu"]["imageTag"])
        assert "nvidia.com/gpu" in tolerated
    else:
        assert not any("gpu" in k for k in limits)
        assert int(setting(c, "num_shard") or 1) == 1
        assert c["image"].endswith(":" + values()["image"]["tag"])
        assert "nvidia.com/gpu" not in tolerated


def test_autoscaler() -> None:
    """The HPA scales the Deployment on the per-pod gauge tgi_queue_size (which the
    server's /metrics exports) with CPU as the fallback, and the Deployment leaves the
    replica count to it."""
    objs = objects("full")
    hpa, deployment = one(objs, "HorizontalPodAutoscaler"), one(objs, "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"]
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    pods = by_type["Pods"]["pods"]
    assert pods["metric"]["name"] == "tgi_queue_size"
    assert pods["target"]["type"] == "AverageValue"
    source = inspect.getsource(frontend_metrics)
    assert re.search(r'gauge\(\s*"tgi_queue_size"', source), "/metrics has no tgi_queue_size gauge"
    cpu = by_type["Resource"]["resource"]
    assert cpu["name"] == "cpu" and cpu["target"]["type"] == "Utilization"
    assert container(objs)["resources"]["requests"]["cpu"]  # what Utilization is a share of
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "HorizontalPodAutoscaler" not in kinds(objects("default"))
    assert "replicas" in one(objects("default"), "Deployment")["spec"]


def test_service_monitor() -> None:
    """The ServiceMonitor (not in Kubernetes' schemas) has monitoring.coreos.com/v1's
    shape: it selects the chart's Service and scrapes its `http` port at /metrics, a
    route the server serves without an API key."""
    objs = objects("full")
    sm, svc = one(objs, "ServiceMonitor"), one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) == {"selector", "endpoints"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = sm["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in get_routes()
    duration = re.compile(r"^(\d+(ms|s|m|h))+$")  # the CRD's Duration pattern, simplified
    assert duration.match(endpoint["interval"]) and duration.match(endpoint["scrapeTimeout"])


def test_disruption_budget() -> None:
    """The PDB selects the pods and lets drains proceed (one pod at a time)."""
    objs = objects("default")
    pdb = one(objs, "PodDisruptionBudget")
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] >= 1 and "minAvailable" not in pdb["spec"]


# ------------------------------------------------------------------ documentation


# Values that are Kubernetes structures of the user's own: one row each.
FREE_FORM = {"resources", "autoscaling.behavior"}


def _leaves(tree: Any, key: str = "") -> list[str]:
    if isinstance(tree, dict) and tree and key not in FREE_FORM:
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{key}.{k}" if key else k)]
    return [key]


def test_every_value_documented() -> None:
    """Each value in values.yaml (each leaf; resources and autoscaling.behavior whole)
    has a row in the chart README's table, and each row is a value."""
    readme = (CHART / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", readme, re.MULTILINE)
    leaves = _leaves(values())
    missing = [k for k in leaves if k not in rows]
    assert not missing, f"not in deploy/helm/tgi-mp/README.md's table: {missing}"
    unknown = [r for r in rows if r not in leaves]
    assert not unknown, f"rows of README.md's table that are not values: {unknown}"


def test_adapter_rule_documented() -> None:
    """The README's prometheus-adapter rule is YAML that serves the HPA's metric per pod
    (series mapped to namespaces and pods, named as the HPA asks)."""
    readme = (CHART / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "seriesQuery" in b]
    assert len(blocks) == 1
    (rule,) = yaml.safe_load(blocks[0])["rules"]
    hpa = one(objects("full"), "HorizontalPodAutoscaler")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    metric = pods["metric"]["name"]
    assert rule["seriesQuery"].startswith(metric + "{")
    assert rule["name"]["as"] == metric and re.fullmatch(rule["name"]["matches"], metric)
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
