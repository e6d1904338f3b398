"""deploy/: the kustomize base and the example and cluster overlays render (with the kustomize
built into kubectl, or a kustomize binary), every object is valid for Kubernetes
(kubernetes-validate, strict: an unknown field fails), and what makes kvd work on a node holds —
shared hostPath directories, probes that run `kvctl health` against the daemon's own socket,
least privilege, resources that cover the arena (and the cluster segment), metrics wired from
the container port to the ServiceMonitor. The cluster overlay's Mooncake master agrees with
kvd's --cluster-* flags (its Service, ports, probes, NetworkPolicies), and a real
mooncake_master started with the Deployment's args answers its probes and lets a kvd node
join. Also: the Dockerfile builds what it copies (and installs what the cluster extra links),
and docs/deploy.md's engine pod fits the DaemonSet."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import wait_until

from kvd.cli.kvctl import build_parser as kvctl_parser
from kvd.cli.kvd_main import build_parser as kvd_parser
from kvd.cluster.local_master import free_port, master_binary
from kvd.server.config import ServeConfig
from kvd.server.config_file import load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERNETES_VERSION = "1.37"  # the newest the pinned kubernetes-validate knows
KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "example": DEPLOY / "overlays" / "example",
    "cluster": DEPLOY / "overlays" / "cluster",  # the example with the cluster tier (deploy/components/cluster)
}
POD_IP = "10.1.2.3"  # what the downward API gives status.podIP, for expanding $(POD_IP) in args
GiB = 1 << 30

# prometheus-operator's ServiceMonitor (monitoring.coreos.com/v1) is a CRD, outside the core
# schemas: the fields kvd uses, as the CRD (v0.84) types them — spec needs endpoints and
# selector; durations match its pattern. Stricter than the CRD on one point: an unknown field
# fails here, where the API server would prune it silently (a typo would lose the setting).
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        },
                    },
                },
            },
        },
    },
}


def kustomize_build(path: Path) -> list[dict]:
    """Render a kustomization as `kubectl apply -k` would."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(path)]  # kubectl's built-in kustomize, offline
    elif os.environ.get("CI"):
        pytest.fail("CI needs kubectl or kustomize to render deploy/ (the machine image has kubectl)")
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(command)} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize_build(path) for name, path in KUSTOMIZATIONS.items()}


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return obj


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    (c,) = [c for c in pod_spec["initContainers" if init else "containers"] if c["name"] == name]
    return c


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity (the suffixes these manifests use) as a number."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "m": 1e-3, "": 1}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|m|)", str(text))
    assert match, f"unexpected quantity {text!r}"
    return float(match.group(1)) * units[match.group(2)]


def flags_of(*command: str) -> set[str]:
    """The long options a command's -h lists."""
    out = subprocess.run([sys.executable, "-m", *command, "-h"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


SERVE_FLAGS: set[str] = set()


def exact_flags(args: list[str], known: set[str]) -> None:
    """argparse takes a prefix of a flag (--dram-byte for --dram-bytes); manifests must not."""
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"{arg}: not a flag of its command, or abbreviated"


def container_env(c: dict) -> dict[str, str]:
    """A container's environment as Kubernetes sets it: values, and the downward API's pod IP."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}, e  # the only one used
            env[e["name"]] = POD_IP
    return env


def expanded_args(c: dict) -> list[str]:
    """The container's args with $(VAR) expanded from its environment, as the kubelet does."""
    env = container_env(c)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in c["args"]]


def serve_config(kvd: dict) -> ServeConfig:
    """What the kvd container runs with: its args as `kvd serve` parses them (an unknown flag
    fails here) over its environment and the defaults, validated as the daemon validates."""
    if not SERVE_FLAGS:
        SERVE_FLAGS.update(flags_of("kvd.cli.kvd_main", "serve"))
    args = expanded_args(kvd)
    exact_flags(args, SERVE_FLAGS)
    args = kvd_parser().parse_args(["serve", *args])
    flags = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if getattr(args, f.name, None) is not None}
    if args.no_write_behind:
        flags["write_behind"] = False
    if args.no_verify_on_start:
        flags["verify_on_start"] = False
    env = {k: v for k, v in container_env(kvd).items() if k.startswith("KVD_")}
    return load_config(None, env, flags)


def host_paths(pod_spec: dict, c: dict) -> dict[str, str]:
    """mountPath -> host path of each hostPath volume container ``c`` mounts."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in c["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- rendering and schemas -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_object_is_valid_for_kubernetes(rendered, name):
    objects = rendered[name]
    kinds = sorted(o["kind"] for o in objects)
    expected = ["DaemonSet", "Service", "ServiceAccount", "ServiceMonitor"]
    if name != "base":
        expected.append("Namespace")
    if name == "cluster":  # the master's Deployment, Service and account; two NetworkPolicies
        expected += ["Deployment", "Service", "ServiceAccount", "NetworkPolicy", "NetworkPolicy"]
    assert kinds == sorted(expected)
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICEMONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_validators_reject_a_broken_object(rendered):
    """The checks above can fail: a misspelt probe field and a ServiceMonitor without its
    selector or with a bad interval are caught."""
    ds = json.loads(json.dumps(only(rendered["example"], "DaemonSet")))
    kvd = container(ds["spec"]["template"]["spec"], "kvd")
    kvd["readinessProbe"]["periodSecond"] = kvd["readinessProbe"].pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(ds, KUBERNETES_VERSION, strict=True)
    sm = json.loads(json.dumps(only(rendered["example"], "ServiceMonitor")))
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        jsonschema.validate(sm, SERVICEMONITOR_SCHEMA)
    del sm["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="'selector' is a required property"):
        jsonschema.validate(sm, SERVICEMONITOR_SCHEMA)


@pytest.mark.parametrize("name", ["example", "cluster"])
def test_the_overlays_set_namespace_and_image(rendered, name):
    objects = rendered[name]
    assert only(objects, "Namespace")["metadata"]["name"] == "kvd-system"
    # hostPath volumes are outside the baseline Pod Security Standard: the namespace must say so
    labels = only(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"kvd-system"}
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("DaemonSet", "Deployment")]
    images = {c["image"] for spec in pods for c in spec["containers"] + spec.get("initContainers", [])}
    # The cluster overlay runs kvd and the master from one image: kvd's, with the cluster extra.
    assert images == {"registry.example.com/kvd:0.1.0" + ("-cluster" if name == "cluster" else "")}


# -- the DaemonSet -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_gpu_nodes_only(rendered, name):
    spec = only(rendered[name], "DaemonSet")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_socket_arena_and_nvme_are_host_directories(rendered, name):
    """Engine pods reach the socket and map the arena by the paths kvd uses, so both are
    hostPath directories mounted at their host path; the arena's is on the host's /dev/shm
    (memory-backed); the NVMe tier is a host directory too (it outlives the pod)."""
    spec = only(rendered[name], "DaemonSet")["spec"]["template"]["spec"]
    kvd = container(spec, "kvd")
    config = serve_config(kvd)
    mounts = host_paths(spec, kvd)
    socket_dir, shm_dir, nvme_dir = str(config.socket.parent), str(config.shm_dir), str(config.nvme_dir)
    assert mounts[socket_dir] == socket_dir
    assert mounts[shm_dir] == shm_dir and PurePosixPath(shm_dir).is_relative_to("/dev/shm")
    assert nvme_dir in mounts
    assert config.nvme_bytes > 0
    assert not any("emptyDir" in v for v in spec["volumes"])  # nothing pod-private
    assert {"hostNetwork", "hostPID", "hostIPC"}.isdisjoint(spec)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_probes_run_kvctl_health_on_the_daemons_socket(rendered, name):
    kvd = container(only(rendered[name], "DaemonSet")["spec"]["template"]["spec"], "kvd")
    socket = serve_config(kvd).socket
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = kvd[probe_name]
        command = probe["exec"]["command"]
        assert command[0] == "kvctl", probe_name
        args = kvctl_parser().parse_args(command[1:])
        exact_flags(command[1:], flags_of("kvd.cli.kvctl", "health"))
        assert args.command == "health" and args.service == ""
        assert args.addr == f"unix://{socket}", probe_name
        assert args.liveness == (probe_name == "livenessProbe"), probe_name  # draining stays alive
        assert args.timeout < probe["timeoutSeconds"], f"{probe_name}: kvctl must give up before the kubelet"
    # SIGTERM: the drain, then 5 s of gRPC grace, must end before the kubelet's SIGKILL.
    pod = only(rendered[name], "DaemonSet")["spec"]["template"]["spec"]
    assert serve_config(kvd).drain_seconds + 5 < pod["terminationGracePeriodSeconds"]
    startup = kvd["startupProbe"]
    # Recovery reads every NVMe block before the socket opens: give it an hour.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_least_privilege(rendered, name):
    objects = rendered[name]
    pod = only(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    kvd = container(pod, "kvd")["securityContext"]
    assert kvd["allowPrivilegeEscalation"] is False and kvd["readOnlyRootFilesystem"] is True
    assert kvd["privileged"] is False
    assert kvd["capabilities"] == {"drop": ["ALL"]}
    assert "runAsUser" not in kvd and "runAsNonRoot" not in kvd  # the pod's non-root user
    init = container(pod, "own-dirs", init=True)["securityContext"]
    assert init["allowPrivilegeEscalation"] is False and init["readOnlyRootFilesystem"] is True
    assert init["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    # No Kubernetes API access: an own account, no token, nothing bound to it.
    sa = only(objects, "ServiceAccount", pod["serviceAccountName"])
    assert sa["metadata"]["name"] == "kvd"
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & {o["kind"] for o in objects}


def test_the_master_has_least_privilege(rendered):
    objects = rendered["cluster"]
    pod = only(objects, "Deployment", "mooncake-master")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (master,) = pod["containers"]
    security = master["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["privileged"] is False and security["capabilities"] == {"drop": ["ALL"]}
    assert {"hostNetwork", "hostPID", "hostIPC", "volumes"}.isdisjoint(pod)  # it writes no file
    sa = only(objects, "ServiceAccount", pod["serviceAccountName"])
    assert sa["metadata"]["name"] == "mooncake-master"  # its own, not kvd's nor the namespace's default
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False


def test_kvd_needs_no_kubernetes_api():
    """What lets the ServiceAccount go without roles: no kvd module imports a Kubernetes client."""
    client = re.compile(r"^\s*(import|from)\s+(kubernetes|kubernetes_asyncio|kr8s|pykube|lightkube)\b", re.M)
    users = [
        str(path.relative_to(REPO))
        for folder in ("kvd", "tiers", "policies", "native")
        for path in (REPO / folder).rglob("*.py")
        if client.search(path.read_text())
    ]
    assert users == []


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_resources_cover_the_arena(rendered, name):
    """Every container has requests = limits (Guaranteed QoS); the arena's tmpfs pages are
    charged to kvd, and so is the cluster segment (memory of the kvd process), so its memory
    limit is --dram-bytes, plus --cluster-bytes with the cluster tier, plus at least 1 GiB."""
    objects = rendered[name]
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("DaemonSet", "Deployment")]
    for pod in pods:
        for c in pod["containers"] + pod.get("initContainers", []):
            res = c["resources"]
            assert set(res["requests"]) == set(res["limits"]) == {"cpu", "memory"}, c["name"]
            assert res["requests"] == res["limits"], c["name"]
    kvd = container(only(objects, "DaemonSet")["spec"]["template"]["spec"], "kvd")
    config = serve_config(kvd)
    segment = config.cluster_bytes if config.cluster_master is not None else 0
    assert (config.cluster_master is not None) == (name == "cluster")
    assert quantity(kvd["resources"]["limits"]["memory"]) >= config.dram_bytes + segment + GiB


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_metrics_are_wired_from_the_container_port_to_the_servicemonitor(rendered, name):
    objects = rendered[name]
    ds, monitor = only(objects, "DaemonSet"), only(objects, "ServiceMonitor")
    service = only(objects, "Service", "kvd-metrics")
    kvd = container(ds["spec"]["template"]["spec"], "kvd")
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in kvd["ports"]
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", 9400, "metrics")
    assert selects(service["spec"]["selector"], ds["spec"]["template"]["metadata"]["labels"])
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["metadata"].get("namespace") == service["metadata"].get("namespace")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    config = serve_config(kvd)
    assert config.metrics_port == 9400  # the container port the Service targets
    assert config.metrics_host == "0.0.0.0"  # reachable from the pod's IP, not loopback only


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_own_dirs_covers_exactly_kvds_directories(rendered, name):
    pod = only(rendered[name], "DaemonSet")["spec"]["template"]["spec"]
    kvd, init = container(pod, "kvd"), container(pod, "own-dirs", init=True)
    config = serve_config(kvd)
    env = {e["name"]: e["value"] for e in init["env"]}
    assert env["SHARED_DIRS"].split() == [str(config.socket.parent), str(config.shm_dir)]
    assert env["PRIVATE_DIRS"].split() == [str(config.nvme_dir)]
    assert env["OWNER"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert host_paths(pod, init) == host_paths(pod, kvd)


def _own_dirs(init: dict, dirs: dict[str, Path], caps: list[str]) -> subprocess.CompletedProcess:
    """Run the init container's own command over stand-in directories, as root with only
    ``caps`` (the bounding set) and no_new_privs, as the container runtime would."""
    env = {e["name"]: e["value"] for e in init["env"]}
    for name in ("SHARED_DIRS", "PRIVATE_DIRS"):
        env[name] = " ".join(str(dirs[d]) for d in env[name].split())
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    return subprocess.run(
        ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs", "--", *init["command"]],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv (util-linux)"
)
def test_own_dirs_works_with_exactly_its_capabilities(rendered, tmp_path):
    """The init container's script, run for real: it hands the directories to kvd with CHOWN
    and FOWNER, again on a restart; without either capability it fails (neither is spare)."""
    pod = only(rendered["example"], "DaemonSet")["spec"]["template"]["spec"]
    init = container(pod, "own-dirs", init=True)
    caps = init["securityContext"]["capabilities"]["add"]
    uid, gid = pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]

    def fresh_dirs(root: Path) -> dict[str, Path]:  # as the kubelet makes them: root:root 0755
        env = {e["name"]: e["value"] for e in init["env"]}
        dirs = {d: root / d.strip("/").replace("/", "_") for d in (env["SHARED_DIRS"] + " " + env["PRIVATE_DIRS"]).split()}
        for p in dirs.values():
            p.mkdir(parents=True)
            p.chmod(0o755)
        return dirs

    dirs = fresh_dirs(tmp_path / "a")
    for attempt in ("first start", "restart"):
        r = _own_dirs(init, dirs, caps)
        assert r.returncode == 0, f"{attempt}: {r.stderr}"
        for host_path, p in dirs.items():
            st = p.stat()
            private = host_path == str(serve_config(container(pod, "kvd")).nvme_dir)
            assert (st.st_uid, st.st_gid) == (uid, gid), host_path
            assert stat.S_IMODE(st.st_mode) == (0o700 if private else 0o750), host_path

    assert _own_dirs(init, fresh_dirs(tmp_path / "b"), [c for c in caps if c != "CHOWN"]).returncode != 0
    # FOWNER: chmod of a directory that a previous start already gave to kvd
    assert _own_dirs(init, dirs, [c for c in caps if c != "FOWNER"]).returncode != 0


# -- the cluster tier (deploy/components/cluster) --------------------------------------------


def master_template(objects: list[dict]) -> dict:
    return only(objects, "Deployment", "mooncake-master")["spec"]["template"]


def gflags(args: list[str]) -> dict[str, str]:
    """mooncake_master's args (gflags, each written --name=value, once) as a dict."""
    flags = {}
    for arg in args:
        match = re.fullmatch(r"--(\w+)=(.*)", arg)
        assert match, f"{arg}: write mooncake_master's flags as --name=value"
        assert match.group(1) not in flags, f"{arg}: given twice"
        flags[match.group(1)] = match.group(2)
    return flags


def named_port(c: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


def test_kvd_reaches_the_master_through_its_service(rendered):
    """The Service forwards to the ports the master listens on (its args), and kvd's
    --cluster-master and --cluster-metadata name that Service and its ports; other nodes
    reach each node's segment at its pod IP."""
    objects = rendered["cluster"]
    template = master_template(objects)
    (master,) = template["spec"]["containers"]
    flags = gflags(master["args"])
    service = only(objects, "Service", "mooncake-master")
    assert selects(service["spec"]["selector"], template["metadata"]["labels"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"rpc", "http-metadata"}
    assert named_port(master, ports["rpc"]["targetPort"]) == int(flags["rpc_port"])
    assert named_port(master, ports["http-metadata"]["targetPort"]) == int(flags["http_metadata_server_port"])
    assert named_port(master, "metrics") == int(flags["metrics_port"])
    # The metadata server runs in the master's process, on every interface of the pod.
    assert flags["enable_http_metadata_server"] == "true" and flags["http_metadata_server_host"] == "0.0.0.0"
    kvd = container(only(objects, "DaemonSet")["spec"]["template"]["spec"], "kvd")
    config = serve_config(kvd)
    name = service["metadata"]["name"]
    assert config.cluster_master == f"{name}:{ports['rpc']['port']}"
    assert config.cluster_metadata == f"http://{name}:{ports['http-metadata']['port']}/metadata"
    assert "--cluster-host=$(POD_IP)" in kvd["args"] and config.cluster_host == POD_IP
    assert config.cluster_replicas >= 2  # one node leaving (a drain, a kill -9) loses no value
    assert config.cluster_protocol == "tcp"


def test_the_master_is_one_replica_probed_on_its_ports(rendered):
    deployment = only(rendered["cluster"], "Deployment", "mooncake-master")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two masters at once
    (master,) = deployment["spec"]["template"]["spec"]["containers"]
    assert master["image"] == "registry.example.com/kvd:0.1.0-cluster"
    assert master["command"] == ["mooncake_master"]  # the cluster extra's console script
    started, ready, alive = master["startupProbe"], master["readinessProbe"], master["livenessProbe"]
    # The RPC port opens after the metadata server: ready (metadata) only once started (RPC).
    assert started["tcpSocket"] == {"port": "rpc"}
    assert ready["httpGet"] == {"path": "/health", "port": "http-metadata"}
    assert alive["tcpSocket"] == {"port": "rpc"}
    # A restarted master has lost every value: liveness gives it a minute before it counts.
    assert alive["periodSeconds"] * alive["failureThreshold"] >= 60


def test_network_policies_keep_the_cluster_to_kvds_pods(rendered):
    """The master admits kvd's pods alone, on the ports its Service forwards; kvd's pods admit
    each other on any port (the transfer engines pick theirs at start) and anyone on the
    metrics port only."""
    objects = rendered["cluster"]
    ds = only(objects, "DaemonSet")
    kvd_labels = ds["spec"]["template"]["metadata"]["labels"]
    kvd = container(ds["spec"]["template"]["spec"], "kvd")
    template = master_template(objects)
    (master,) = template["spec"]["containers"]
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"mooncake-master", "kvd"}
    assert all(spec["policyTypes"] == ["Ingress"] for spec in policies.values())

    spec = policies["mooncake-master"]
    assert selects(spec["podSelector"]["matchLabels"], template["metadata"]["labels"])
    assert not selects(spec["podSelector"]["matchLabels"], kvd_labels)
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # this namespace's pods, no namespaceSelector or ipBlock
    assert selects(peer["podSelector"]["matchLabels"], kvd_labels)
    assert not selects(peer["podSelector"]["matchLabels"], template["metadata"]["labels"])
    service = only(objects, "Service", "mooncake-master")
    assert {(p["port"], p["protocol"]) for p in rule["ports"]} == {
        (p["targetPort"], "TCP") for p in service["spec"]["ports"]
    }
    for p in rule["ports"]:
        named_port(master, p["port"])

    spec = policies["kvd"]
    assert selects(spec["podSelector"]["matchLabels"], kvd_labels)
    peers, scrape = spec["ingress"]
    assert set(peers) == {"from"}  # every port
    (peer,) = peers["from"]
    assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"] == spec["podSelector"]["matchLabels"]
    assert set(scrape) == {"ports"} and scrape["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert named_port(kvd, "metrics") == serve_config(kvd).metrics_port
    assert only(objects, "Service", "kvd-metrics")["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.fixture
def manifest_master(rendered, tmp_path):
    """mooncake_master run with the Deployment's args, its three ports moved to free ones:
    (the master container, the ports by flag, the process, its log)."""
    binary = master_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("mooncake_master is missing: make install installs the cluster extra")
        pytest.skip("mooncake_master is not installed (pip install 'kvd[cluster]')")
    (master,) = master_template(rendered["cluster"])["spec"]["containers"]
    assert master["command"] == [Path(binary).name]
    flags = gflags(master["args"])
    ports = {flag: free_port() for flag in ("rpc_port", "http_metadata_server_port", "metrics_port")}
    flags.update({flag: str(port) for flag, port in ports.items()})
    log = tmp_path / "master.log"
    with open(log, "wb") as out:
        args = [binary, *(f"--{k}={v}" for k, v in flags.items())]
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield master, ports, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_manifests_master_answers_its_probes_and_a_kvd_node_joins_it(rendered, manifest_master, daemon_factory):
    """The master, started with the Deployment's args: the readiness probe's GET succeeds,
    the liveness probe's port accepts, and a kvd node with the DaemonSet's --cluster-* flags
    (the Service's name and the pod IP replaced by loopback) joins its cluster."""
    master, ports, proc, log = manifest_master
    http = ports["http_metadata_server_port"]
    ready = master["readinessProbe"]["httpGet"]

    def ready_probe_passes() -> bool:
        assert proc.poll() is None, f"mooncake_master exited:\n{log.read_text(errors='replace')}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}{ready['path']}", timeout=2) as reply:
                return 200 <= reply.status < 400  # what the kubelet counts as success
        except OSError:  # refused while it starts; an HTTPError (4xx, 5xx) fails the probe too
            return False

    def rpc_port_accepts() -> bool:  # the startup and liveness probes' TCP connect
        assert proc.poll() is None, f"mooncake_master exited:\n{log.read_text(errors='replace')}"
        try:
            with socket.create_connection(("127.0.0.1", ports["rpc_port"]), timeout=2):
                return True
        except OSError:
            return False

    started = master["startupProbe"]
    wait_until(rpc_port_accepts, timeout=started["periodSeconds"] * started["failureThreshold"], what="started")
    assert ready_probe_passes()

    kvd = container(only(rendered["cluster"], "DaemonSet")["spec"]["template"]["spec"], "kvd")
    config = serve_config(kvd)
    node = daemon_factory(
        dram="16MiB",
        extra=[
            "--cluster-master", f"127.0.0.1:{ports['rpc_port']}",
            "--cluster-metadata", f"http://127.0.0.1:{http}/metadata",
            "--cluster-bytes", "32MiB", "--cluster-host", "127.0.0.1",
            "--cluster-protocol", config.cluster_protocol,
            "--cluster-replicas", str(config.cluster_replicas),
            "--cluster-timeout-seconds", str(config.cluster_timeout_seconds),
        ],
    ).start()
    with node.client() as c:
        wait_until(lambda: c.status().cluster.state == "up", timeout=60, what="the node joins the manifest's master")


# -- the container image -------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_the_dockerfile_copies_what_the_build_needs(tmp_path):
    """Every COPY source exists, the sources include every folder pyproject maps into kvd, and
    those files alone build kvd's wheel (what `pip install .` in the image does)."""
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    sources = []
    for word, rest in instructions:
        if word == "COPY":
            *srcs, _dest = rest.split()
            sources += srcs
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    mapped = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert mapped <= set(sources), f"the image lacks {mapped - set(sources)}"
    assert {"pyproject.toml", "README.md"} <= set(sources)

    context = tmp_path / "context"
    context.mkdir()
    for src in sources:
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, context / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / src, context / src)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.glob("kvd-*.whl"))


def test_the_image_runs_kvd_serve_as_the_manifests_user(rendered):
    instructions = dict(dockerfile_instructions(DEPLOY / "Dockerfile"))  # the last of each kind
    assert json.loads(instructions["ENTRYPOINT"]) == ["kvd", "serve"]
    defaults = serve_config({"args": json.loads(instructions["CMD"])})
    assert defaults.socket == PurePosixPath("/run/kvd/kvd.sock")
    pod = only(rendered["example"], "DaemonSet")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    # numeric, so the kubelet can check runAsNonRoot; the same user as the manifests
    assert instructions["USER"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert instructions["ENV"] == f"KVD_ADDR=unix://{defaults.socket}"
    command = json.loads(re.fullmatch(r".*\bCMD (\[.*\])", instructions["HEALTHCHECK"]).group(1))
    assert command[0] == "kvctl" and kvctl_parser().parse_args(command[1:]).command == "health"


def apt_packages(run: str) -> set[str]:
    match = re.search(r"apt-get install -y --no-install-recommends ([\w.+ -]+?)\s*&&", run)
    assert match, run
    return set(match.group(1).split())


def test_the_cluster_image_installs_the_extra_and_what_it_links():
    """`--build-arg KVD_EXTRAS=cluster` installs kvd[cluster] (whose console script
    mooncake_master the master's Deployment runs) and Debian packages that provide every
    shared library the extra's binaries link beyond their own and the C/C++ runtime (read
    from the installed extra's ELF files and this machine's dpkg, on the image's Debian)."""
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    assert [rest for word, rest in instructions if word == "FROM"] == ["python:3.11-slim-bookworm"]
    runs = [rest for word, rest in instructions if word == "RUN"]
    assert sum('pip install --no-cache-dir ".${KVD_EXTRAS:+[$KVD_EXTRAS]}"' in r for r in runs) == 1
    (apt,) = [r for r in runs if "apt-get install" in r]
    assert apt.startswith('case ",$KVD_EXTRAS," in *,cluster,*)')
    packages = apt_packages(apt)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (requirement,) = pyproject["project"]["optional-dependencies"]["cluster"]
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: make install installs the cluster extra")
        pytest.skip(f"{name} is not installed")
    assert "mooncake_master" in {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}

    os_release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    if "VERSION_CODENAME=bookworm" not in os_release or not (shutil.which("readelf") and shutil.which("dpkg")):
        pytest.skip("the library check reads ELF files with readelf and asks dpkg on Debian 12")
    elves = []
    for f in dist.files or []:
        path = Path(dist.locate_file(f))
        if path.is_file():
            with open(path, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    elves.append(path)
    assert elves
    needed = set()
    for path in elves:
        out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, timeout=60).stdout
        needed |= set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out))
    runtime = re.compile(r"ld-linux.*|lib(c|m|dl|pthread|rt|resolv|util|stdc\+\+|gcc_s)\.so\..*")
    system = {n for n in needed if n not in {p.name for p in elves} and not runtime.fullmatch(n)}
    assert "libibverbs.so.1" in system  # linked even when only TCP is used
    providers = set()
    for soname in sorted(system):
        out = subprocess.run(["dpkg", "-S", f"*/{soname}"], capture_output=True, text=True, timeout=60)
        found = {line.split(":")[0] for line in out.stdout.splitlines() if not line.startswith("diversion")}
        assert found, f"{soname}: no installed Debian package has it"
        providers |= found
    assert providers <= packages, f"the image lacks {providers - packages}"


# -- docs/deploy.md ------------------------------------------------------------------------


def doc_objects() -> list[dict]:
    text = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_docs_yaml_is_valid_for_kubernetes():
    objects = doc_objects()
    assert objects, "docs/deploy.md has no yaml blocks"
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_docs_engine_pod_reaches_the_daemon(rendered):
    """The engine pod of docs/deploy.md runs where kvd runs, mounts the socket and arena
    directories at kvd's paths (the arena read-write: it maps it), joins kvd's group, and
    points vLLM's connector at kvd's socket."""
    (engine,) = [o for o in doc_objects() if o["kind"] == "Pod"]
    spec = engine["spec"]
    pod = only(rendered["example"], "DaemonSet")["spec"]["template"]["spec"]
    config = serve_config(container(pod, "kvd"))
    assert spec["nodeSelector"] == pod["nodeSelector"]
    assert all(t in spec["tolerations"] for t in pod["tolerations"])
    assert pod["securityContext"]["runAsGroup"] in spec["securityContext"]["supplementalGroups"]
    (vllm,) = spec["containers"]
    mounts = host_paths(spec, vllm)
    socket_dir, shm_dir = str(config.socket.parent), str(config.shm_dir)
    assert mounts[socket_dir] == socket_dir and mounts[shm_dir] == shm_dir
    assert str(config.nvme_dir) not in mounts  # NVMe is kvd's alone
    by_path = {m["mountPath"]: m for m in vllm["volumeMounts"]}
    assert not by_path[shm_dir].get("readOnly", False)
    args = vllm["args"]
    transfer = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert transfer == {
        "kv_connector": "KvdConnector",
        "kv_connector_module_path": "kvd.connector.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"kvd_address": f"unix://{config.socket}", "kvd_pod_id": "$(POD_IP):8000"},
    }
    # The pod id comes from the downward API, expanded by Kubernetes from the container's env.
    (env,) = [e for e in vllm["env"] if e["name"] == "POD_IP"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
