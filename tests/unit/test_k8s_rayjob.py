"""launch/k8s/rayjob.yaml against the KubeRay RayJob CRD (ray.io/v1) and vlarl's own config.

SCHEMA below is the part of the CRD's openAPIV3Schema that the manifest uses, written down from
ray-operator/config/crd/bases/ray.io_rayjobs.yaml (KubeRay v1): the keys each object may hold, the
ones it must hold, and the value types. The check refuses unknown keys where the CRD has a closed
set, so a misspelt field fails here rather than being pruned silently by the API server. The
entrypoint must also be a vlarl command whose placement fits the worker group.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from vlarl.main import main

REPO = Path(__file__).resolve().parents[2]
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")

# type: "string" | "integer" | "boolean" | "quantity" | ("map", value type) | ("list", schema) | schema dict
# schema dict: {"keys": {name: type}, "required": (...)}; "open" keys = any other key allowed.
STR, INT, BOOL, QTY = "string", "integer", "boolean", "quantity"
ENV = {"keys": {"name": STR, "value": STR, "valueFrom": "object"}, "required": ("name",)}
CONTAINER = {"keys": {"name": STR, "image": STR, "imagePullPolicy": STR, "command": ("list", STR), "args": ("list", STR),
                      "env": ("list", ENV), "envFrom": "object", "ports": ("list", {"keys": {
                          "containerPort": INT, "hostIP": STR, "hostPort": INT, "name": STR, "protocol": STR},
                          "required": ("containerPort",)}),
                      "resources": {"keys": {"claims": "object", "limits": ("map", QTY), "requests": ("map", QTY)}},
                      "volumeMounts": ("list", {"keys": {"mountPath": STR, "mountPropagation": STR, "name": STR,
                                                         "readOnly": BOOL, "recursiveReadOnly": STR, "subPath": STR,
                                                         "subPathExpr": STR}, "required": ("mountPath", "name")}),
                      **{k: "object" for k in ("lifecycle", "livenessProbe", "readinessProbe", "startupProbe",
                                               "securityContext", "resizePolicy", "restartPolicyRules",
                                               "volumeDevices")},
                      "restartPolicy": STR, "stdin": BOOL, "stdinOnce": BOOL, "tty": BOOL, "workingDir": STR,
                      "terminationMessagePath": STR, "terminationMessagePolicy": STR},
             "required": ("name",)}
VOLUME = {"keys": {"name": STR, "persistentVolumeClaim": {"keys": {"claimName": STR, "readOnly": BOOL},
                                                          "required": ("claimName",)},
                   "emptyDir": {"keys": {"medium": STR, "sizeLimit": QTY}},
                   **{k: "object" for k in ("configMap", "secret", "hostPath", "nfs", "csi", "ephemeral", "projected")}},
          "required": ("name",)}
POD = {"keys": {"containers": ("list", CONTAINER), "initContainers": ("list", CONTAINER), "volumes": ("list", VOLUME),
                "terminationGracePeriodSeconds": INT, "tolerations": ("list", {"keys": {
                    "effect": STR, "key": STR, "operator": STR, "tolerationSeconds": INT, "value": STR}}),
                "nodeSelector": ("map", STR), "serviceAccountName": STR, "priorityClassName": STR,
                "affinity": "object", "imagePullSecrets": "object", "securityContext": "object",
                "runtimeClassName": STR, "schedulerName": STR, "hostNetwork": BOOL, "restartPolicy": STR},
       "required": ("containers",)}
TEMPLATE = {"keys": {"metadata": {"keys": {"labels": ("map", STR), "annotations": ("map", STR), "name": STR}},
                     "spec": POD}}
GROUP = {"rayStartParams": ("map", STR), "template": TEMPLATE, "labels": ("map", STR), "resources": ("map", STR)}
SCHEMA = {"keys": {
    "apiVersion": STR, "kind": STR, "metadata": {"keys": {"name": STR, "namespace": STR, "labels": ("map", STR),
                                                         "annotations": ("map", STR)}, "required": ("name",)},
    "spec": {"keys": {
        "entrypoint": STR, "submissionMode": STR, "shutdownAfterJobFinishes": BOOL, "ttlSecondsAfterFinished": INT,
        "backoffLimit": INT, "activeDeadlineSeconds": INT, "runtimeEnvYAML": STR, "entrypointNumCpus": "number",
        "entrypointNumGpus": "number", "suspend": BOOL, "metadata": ("map", STR),
        "rayClusterSpec": {"keys": {
            "rayVersion": STR, "enableInTreeAutoscaling": BOOL,
            "headGroupSpec": {"keys": {**GROUP, "serviceType": STR, "enableIngress": BOOL}, "required": ("template",)},
            "workerGroupSpecs": ("list", {"keys": {**GROUP, "groupName": STR, "replicas": INT, "minReplicas": INT,
                                                   "maxReplicas": INT, "numOfHosts": INT, "idleTimeoutSeconds": INT},
                                          "required": ("groupName", "maxReplicas", "minReplicas", "template")})},
            "required": ("headGroupSpec",)}}}},
    "required": ("apiVersion", "kind", "metadata", "spec")}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def problems(value, kind, where: str = "") -> list[str]:
    """Where `value` breaks the schema `kind` (empty: it fits)."""
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            return [f"{where}: an object expected, got {type(value).__name__}"]
        out = [f"{where}.{k}: required" for k in kind.get("required", ()) if k not in value]
        for k, v in value.items():
            if k not in kind["keys"]:
                out.append(f"{where}.{k}: not a field of this object")
            else:
                out += problems(v, kind["keys"][k], f"{where}.{k}")
        return out
    if isinstance(kind, tuple):
        shape, inner = kind
        if shape == "list":
            return (problems(None, "list", where) if not isinstance(value, list) else
                    [p for i, item in enumerate(value) for p in problems(item, inner, f"{where}[{i}]")])
        return (problems(None, "map", where) if not isinstance(value, dict) else
                [p for k, item in value.items() for p in problems(item, inner, f"{where}.{k}")])
    ok = {STR: isinstance(value, str), INT: isinstance(value, int) and not isinstance(value, bool),
          BOOL: isinstance(value, bool), "number": isinstance(value, (int, float)) and not isinstance(value, bool),
          QTY: (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(QUANTITY.match(value))),
          "object": isinstance(value, (dict, list))}.get(kind, False)
    return [] if ok else [f"{where}: {value!r} is not a {kind}"]


@pytest.fixture(scope="module")
def job():
    return yaml.safe_load((REPO / "launch" / "k8s" / "rayjob.yaml").read_text())


def test_manifest_fits_the_rayjob_crd(job):
    assert problems(job, SCHEMA) == []
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["submissionMode"] in SUBMISSION_MODES
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every mount names a volume of its pod; the run directory is a persistent claim
        names = {v["name"] for v in pod["volumes"]}
        assert all(m["name"] in names for c in pod["containers"] for m in c.get("volumeMounts", []))
        runs = next(v for v in pod["volumes"] if v["name"] == "runs")
        assert "persistentVolumeClaim" in runs


def test_the_checker_finds_mistakes(job):
    import copy

    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # misspelt
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"]
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"]["memory"] = "lots"
    found = problems(bad, SCHEMA)
    assert len(found) == 4, found
    assert any("replica: not a field" in p for p in found) and any("minReplicas: required" in p for p in found)


def test_entrypoint_is_a_vlarl_run_that_fits_the_worker_group(job, tmp_path, capsys):
    from vlarl.models.openvla.tiny import write_tiny_openvla

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "vlarl.main"]
    args = argv[3:]
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("trainer.run_dir="))
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(run_dir.startswith(m["mountPath"]) for m in head["volumeMounts"] if m["name"] == "runs")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["rayStartParams"]["num-gpus"] == str(gpus)
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    folder = tmp_path / "openvla"  # the tiny folder in the real layout stands in for the mounted checkpoint
    write_tiny_openvla(folder, seed=0)
    args = [f"model.path={folder}" if a.startswith("model.path=") else a for a in args]
    assert main([*args, f"cluster.describe={group['replicas']}x{gpus}:{cpus}", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "rollout workers: 4, SPREAD" in plan and "learner ranks: 12, PACK" in plan
