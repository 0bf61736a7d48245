"""Deployment files: the Kubernetes manifests parse and carry the essentials, and the
Dockerfile agrees with pyproject, the Makefile and the CLI (no Docker engine runs here, so
this is what can be checked: the build itself runs where Docker does)."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from avatar_stream.engines.flashhead.config import CHECKPOINT_LAYOUT  # noqa: E402
from avatar_stream.tools import cli  # noqa: E402

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
    # the face models ride in the wheel (setup.py): no image installs them apart
    assert "COPY setup.py" in dockerfile
    assert not re.search(r"face.detection.tflite", dockerfile, re.I)
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


# -- the flashhead image's lock file ------------------------------------------------------

LOCK = ROOT / "docker" / "flashhead-requirements.lock"
# What the lock is resolved for: the CUDA image's Python 3.10 on Linux x86_64
TARGET = {"python_version": "3.10", "python_full_version": "3.10.12", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
NCCL = "nvidia-nccl-cu12"
NCCL_FOR_TORCH = Version("2.26.2")  # torch 2.7.1 requires nvidia-nccl-cu12==2.26.2 ...
NCCL_UPSTREAM = Version("2.27.3")  # ... upstream pins this one, which no resolver can meet


def lock_pins() -> dict[str, Version]:
    """The lock's pins by canonical name. The image installs it with --no-deps, so every
    line must be an exact, unconditional `name==version` and each name appear once."""
    pins: dict[str, Version] = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()  # uv's header and `# via` annotations
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", raw
        assert req.marker is None and not req.extras and req.url is None, raw
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def upstream_dir() -> Path:
    """Upstream's checkout: $FLASHHEAD_SRC, else the shared read-only copy beside the repo;
    without either there is nothing to compare the lock with, so the caller skips."""
    candidates = [Path(os.environ["FLASHHEAD_SRC"])] if os.environ.get("FLASHHEAD_SRC") else []
    candidates.append(ROOT.parent / "shared" / "upstream" / "SoulX-FlashHead")
    for path in candidates:
        if (path / "requirements.txt").is_file():
            return path
    pytest.skip("no SoulX-FlashHead checkout with a requirements.txt (set FLASHHEAD_SRC; "
                f"looked in {', '.join(map(str, candidates))})")


def upstream_requirements() -> list[Requirement]:
    """upstream's requirements.txt that apply to the image's Python and platform."""
    reqs = []
    for raw in (upstream_dir() / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(TARGET):
                reqs.append(req)
    return reqs


def assert_satisfies(pins: dict[str, Version], req: Requirement, where: str) -> None:
    name = canonicalize_name(req.name)
    assert name in pins, f"{req} ({where}) is not in {LOCK.name}"
    assert req.specifier.contains(pins[name], prereleases=True), \
        f"{LOCK.name} pins {name}=={pins[name]}, {where} wants {req}"


def dockerfile_lock_install() -> str:
    """The flashhead stage's RUN line that installs the lock."""
    lines = [line for line in stages()["flashhead"]
             if line.startswith("RUN") and "flashhead-requirements.lock" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_lock_pins_torch_and_torchvision_as_the_dockerfile_names_them() -> None:
    """The lock holds upstream's documented torch 2.7.1, and the torchvision the Dockerfile
    names beside it (pip there refuses a lock with other versions; this says so earlier)."""
    pins = lock_pins()
    assert pins["torch"] == Version("2.7.1")
    named = re.search(r"\btorchvision==(\S+)", dockerfile_lock_install())
    assert named and pins["torchvision"] == Version(named.group(1))
    assert re.search(r"\btorch==2\.7\.1(\s|$)", dockerfile_lock_install())


def test_lock_meets_upstream_requirements_but_the_nccl_pin() -> None:
    """Every upstream requirement is locked at a version upstream accepts, except its nccl
    pin: torch 2.7.1 needs nvidia-nccl-cu12 2.26.2, and that is what the lock must hold."""
    pins = lock_pins()
    reqs = upstream_requirements()
    assert reqs, "upstream's requirements.txt lists nothing"
    for req in reqs:
        if canonicalize_name(req.name) == NCCL:
            continue
        assert_satisfies(pins, req, "upstream's requirements.txt")
    assert pins[NCCL] == NCCL_FOR_TORCH and pins[NCCL] != NCCL_UPSTREAM


def test_lock_meets_avatar_stream_runtime_dependencies() -> None:
    """The image installs the avatar-stream wheel with --no-deps: its runtime dependencies
    (and the torch of its `flashhead` extra) must already be in the lock."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = lock_pins()
    for dep in project["dependencies"] + project["optional-dependencies"]["flashhead"]:
        req = Requirement(dep)
        if req.marker is None or req.marker.evaluate(TARGET):
            assert_satisfies(pins, req, "pyproject.toml")


def test_dockerfile_installs_the_lock_at_upstreams_commit() -> None:
    """The flashhead stage copies the lock in and installs it with --no-deps (so nothing
    floats past it), installs nothing else with dependencies, and checks upstream out at
    the full commit the lock was resolved against."""
    s = stages()["flashhead"]
    assert any(line.startswith("COPY docker/flashhead-requirements.lock ") for line in s)
    assert re.search(r"pip install --no-deps -r \S*flashhead-requirements\.lock\b",
                     dockerfile_lock_install())
    installs = [cmd for line in s if line.startswith("RUN")
                for cmd in re.split(r"&&|;", line) if "pip install" in cmd]
    for cmd in installs:  # besides pip/wheel in the fresh venv and the ninja build tool
        if not re.search(r"pip install (--upgrade pip wheel|ninja)\s*$", cmd.strip()):
            assert "--no-deps" in cmd, cmd
    assert "requirements.txt" not in " ".join(s)  # upstream's own file is not installed
    env = " ".join(line for line in s if line.startswith("ENV"))
    assert "FLASHHEAD_SRC=/opt/SoulX-FlashHead" in env
    commit_file = upstream_dir() / "COMMIT"
    if not commit_file.is_file():
        pytest.skip(f"{commit_file} missing: no upstream commit to compare with")
    commit = commit_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    pinned = re.search(r"^ARG FLASHHEAD_COMMIT=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert pinned and pinned.group(1) == commit
