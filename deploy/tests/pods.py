"""The rendered manifests' pods, run end to end without a cluster (needs root).

For every pod the controllers would create from a render (deploy/tests/manifests.py's model), this runs
its container's command with the environment the manifest gives it — downward-API values substituted
(completion index, pod IP, the JobSet coordinator annotation), the token from a test Secret — each pod in
its own network namespace with its own address on a bridge made here (the pod's interface is eth0), and
in its own mount namespace: the shared claim (a directory here) and the ConfigMaps are mounted at the
manifest's mount paths, and /etc/hosts holds the cluster DNS names the render defines (JobSet pod
hostnames under its subdomain, Services → the pod they select). The coordinator's readiness probe is
tested from the host before later replicated jobs start (startupPolicy InOrder). Passing means the job
wrote summary.json in the coordinator's --run-dir on the claim.

    python deploy/tests/pods.py RENDER.yaml --butler target/debug/butler --data data/mnist1d
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import manifests as m

SUBNET = "10.231.{}.{}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)}: {out.stderr.strip()}")
    return out


class Cluster:
    """A bridge, one network namespace per pod, and the processes started in them; cleaned up on exit."""

    def __init__(self, tag: str, subnet: int):
        self.tag, self.subnet = tag, subnet
        self.bridge = f"bk{tag}"
        self.netns: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", SUBNET.format(self.subnet, 1) + "/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def add_pod(self, i: int) -> tuple[str, str]:
        ns, host_if = f"bk{self.tag}p{i}", f"bk{self.tag}v{i}"
        ip = SUBNET.format(self.subnet, 10 + i)
        sh("ip", "netns", "add", ns)
        self.netns.append(ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.links.append(host_if)
        sh("ip", "link", "set", host_if, "master", self.bridge)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", ip + "/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns, ip

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for link in self.links:
            sh("ip", "link", "del", link, check=False)
        for ns in self.netns:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


def launcher_script(mounts: list[tuple[str, str, bool]], files: dict[str, str], scratch: str,
                    argv: list[str], env: dict[str, str], uid: int | None, gid: int | None) -> str:
    """Runs inside `ip netns exec` (a private mount namespace): builds the pod's filesystem view and
    execs the container command as the pod's user."""
    lines = ["set -eu", f"mount -t tmpfs tmpfs {shlex.quote(scratch)}"]
    overlaid: set[str] = set()

    def ensure(path: str) -> None:
        if os.path.exists(path):
            return
        anc = os.path.dirname(path.rstrip("/"))
        while anc != "/" and not os.path.isdir(anc):
            anc = os.path.dirname(anc)
        if anc == "/":
            raise SystemExit(f"pods.py: cannot create {path} (its first ancestor is /): mount under an existing directory")
        if anc not in overlaid:
            n = len(overlaid)
            up, work = f"{scratch}/o{n}/u", f"{scratch}/o{n}/w"
            lines.append(f"mkdir -p {up} {work}")
            lines.append(f"mount -t overlay overlay -o lowerdir={anc},upperdir={up},workdir={work} {anc}")
            overlaid.add(anc)
        lines.append(f"mkdir -p {shlex.quote(path)}")

    ensure("/etc/butler-pods-probe")  # /etc is overlaid so /etc/hosts and /etc/hostname are the pod's
    for path, text in files.items():
        lines.append(f"cat > {path} <<'POD_EOF'\n{text}POD_EOF")
    for target, source, read_only in mounts:
        ensure(target)
        lines.append(f"mount --bind {shlex.quote(source)} {shlex.quote(target)}")
        if read_only:
            lines.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
    envs = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    priv = ""
    if uid is not None:
        priv = f"setpriv --reuid {uid} --regid {gid if gid is not None else uid} --clear-groups "
    lines.append(f"cd /tmp && exec {priv}env -i {envs} {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


def wait_tcp(ip: str, port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it became ready")
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"not ready at {ip}:{port} in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("render", type=Path)
    ap.add_argument("--butler", required=True)
    ap.add_argument("--data", required=True, type=Path, help="prepared MNIST-1D, copied onto the claim")
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--subnet", type=int, default=os.getpid() % 200 + 20)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("pods.py: needs root (network and mount namespaces)", file=sys.stderr)
        return 2
    docs = m.load(a.render.read_text())
    butler = str(Path(a.butler).resolve())
    pods = m.pods(docs)
    cms = m.config_maps(docs)
    token = secrets.token_hex(16)
    work = Path(tempfile.mkdtemp(prefix="butler-pods-"))
    os.chmod(work, 0o755)
    claims: dict[str, Path] = {}
    tag = f"{os.getpid() % 100000:05d}"[-4:]
    started = time.time()
    logs: dict[str, Path] = {}
    try:
        with Cluster(tag, a.subnet) as cluster:
            addrs = {}
            for i, p in enumerate(pods):
                addrs[p.hostname] = cluster.add_pod(i)
            # Cluster DNS: JobSet pod hostnames under the subdomain, Services to the pods they select.
            hosts = ["127.0.0.1 localhost"]
            for p in pods:
                if p.subdomain:
                    ip = addrs[p.hostname][1]
                    hosts.append(f"{ip} {p.fqdn()} {p.fqdn()}.default.svc.cluster.local")
            for s in m.services(docs):
                sel = s["spec"].get("selector") or {}
                chosen = [p for p in pods if sel and all(p.labels.get(k) == v for k, v in sel.items())]
                for sp in s["spec"].get("ports") or []:
                    tp = sp.get("targetPort", sp["port"])
                    nums = {m.port_number(p.template.pod_spec["containers"][0], tp) for p in chosen}
                    if nums != {sp["port"]}:
                        raise RuntimeError(f"{m.name_of(s)}: port {sp['port']} → {tp} resolves to {nums}; this "
                                           "test maps a Service name to its pod's IP, so ports must agree")
                if len(chosen) == 1:
                    n = s["metadata"]["name"]
                    hosts.append(f"{addrs[chosen[0].hostname][1]} {n} {n}.default {n}.default.svc.cluster.local")
            # Pods start in replicated-job order when the JobSet says InOrder; each group waits for the
            # previous one to be ready. Plain Jobs all start at once.
            groups: list[list[m.Pod]] = []
            for p in pods:
                if groups and groups[-1][0].template is p.template:
                    groups[-1].append(p)
                else:
                    groups.append([p])
            in_order = any(((t.jobset or {}).get("spec", {}).get("startupPolicy") or {}).get("startupPolicyOrder")
                           == "InOrder" for t in m.templates(docs))
            running: list[tuple[m.Pod, subprocess.Popen]] = []
            for group in groups:
                for p in group:
                    ns, ip = addrs[p.hostname]
                    spec = p.template.pod_spec
                    if len(spec["containers"]) != 1:
                        raise RuntimeError(f"{p.template.where}: this test runs one container per pod")
                    c = spec["containers"][0]
                    env = m.pod_env(p, c, ip, token, cms)
                    if c.get("command"):
                        argv = [m.expand(x, env) for x in c["command"]] + [m.expand(x, env) for x in c.get("args") or []]
                    else:
                        argv = ["butler"] + [m.expand(x, env) for x in c.get("args") or []]
                    if os.path.basename(argv[0]) != "butler":
                        raise RuntimeError(f"{p.template.where}: runs {argv[0]}, not butler")
                    argv[0] = butler
                    # What the image's ENV provides (deploy/Dockerfile): the loader path to libtorch.
                    base_env = {"PATH": os.environ["PATH"], "HOME": "/tmp"}
                    if "LD_LIBRARY_PATH" in os.environ:
                        base_env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
                    base_env["OMP_NUM_THREADS"] = "1"
                    base_env["BUTLER_THREADS"] = "1"
                    base_env.update(env)
                    pod_dir = work / p.hostname
                    pod_dir.mkdir()
                    (pod_dir / "scratch").mkdir()
                    mounts = []
                    for vm in c.get("volumeMounts") or []:
                        vol = next(v for v in spec.get("volumes") or [] if v["name"] == vm["name"])
                        if "persistentVolumeClaim" in vol:
                            name = vol["persistentVolumeClaim"]["claimName"]
                            if name not in claims:
                                claims[name] = work / f"claim-{name}"
                                (claims[name] / "data").mkdir(parents=True)
                                shutil.copytree(a.data, claims[name] / "data" / a.data.name)
                                gid = (spec.get("securityContext") or {}).get("fsGroup")
                                if gid is not None:  # fsGroup: the volume belongs to the pod's group
                                    sh("chown", "-R", f"{gid}:{gid}", str(claims[name]))
                                    sh("chmod", "-R", "g+rwX", str(claims[name]))
                            src = claims[name]
                        elif "configMap" in vol:
                            src = pod_dir / f"cm-{vm['name']}"
                            src.mkdir()
                            for k, v in (cms[vol["configMap"]["name"]].get("data") or {}).items():
                                (src / k).write_text(v)
                            os.chmod(src, 0o755)
                        elif "emptyDir" in vol:
                            src = pod_dir / f"empty-{vm['name']}"
                            src.mkdir(mode=0o1777)
                        else:
                            raise RuntimeError(f"{p.template.where}: volume {vol} is not supported here")
                        mounts.append((vm["mountPath"], str(src), bool(vm.get("readOnly"))))
                    sc = {**(spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
                    files = {"/etc/hosts": "\n".join(hosts) + "\n", "/etc/hostname": p.hostname + "\n"}
                    script = launcher_script(mounts, files, str(pod_dir / "scratch"), argv, base_env,
                                             sc.get("runAsUser"), sc.get("runAsGroup"))
                    (pod_dir / "launch.sh").write_text(script)
                    logs[p.hostname] = pod_dir / "log"
                    proc = subprocess.Popen(["ip", "netns", "exec", ns, "bash", str(pod_dir / "launch.sh")],
                                            stdout=open(logs[p.hostname], "w"), stderr=subprocess.STDOUT,
                                            start_new_session=True)
                    cluster.procs.append(proc)
                    running.append((p, proc))
                    print(f"pod {p.hostname} ({ip}): {shlex.join(['butler'] + argv[1:])}", flush=True)
                if in_order:
                    for p in group:
                        probe = (p.template.pod_spec["containers"][0].get("readinessProbe") or {}).get("tcpSocket")
                        if probe:
                            port = m.port_number(p.template.pod_spec["containers"][0], probe["port"])
                            proc = next(pr for q, pr in running if q is p)
                            try:
                                wait_tcp(addrs[p.hostname][1], port, proc, started + a.timeout)
                            except RuntimeError as e:
                                raise RuntimeError(f"pod {p.hostname}: {e}") from None
                            print(f"pod {p.hostname}: ready ({addrs[p.hostname][1]}:{port} accepts)", flush=True)
            for p, proc in running:
                left = started + a.timeout - time.time()
                try:
                    proc.wait(timeout=max(left, 0.1))
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"pod {p.hostname} still running after {a.timeout:.0f} s") from None
                if proc.returncode != 0:
                    raise RuntimeError(f"pod {p.hostname} exited with {proc.returncode}")
            co = m.coordinator_template(docs)
            run_dir = m.flag_value(m.container_args(co.pod_spec["containers"][0]), "--run-dir")
            mnt, vol = m.mount_of(co.pod_spec, co.pod_spec["containers"][0], run_dir)
            local = claims[vol["persistentVolumeClaim"]["claimName"]] / run_dir[len(mnt["mountPath"].rstrip("/")) + 1:]
            summary = local / "summary.json"
            if not summary.exists():
                raise RuntimeError(f"no summary.json in {run_dir} on the claim")
            s = json.loads(summary.read_text())
            print(f"OK: {len(pods)} pods, summary.json in {run_dir}: world_size {s.get('world_size')}, "
                  f"test_accuracy {s.get('test_accuracy')}, {time.time() - started:.1f} s", flush=True)
            if s.get("world_size") != len([p for p in pods if p.template.role == "worker"]):
                raise RuntimeError(f"summary world_size {s.get('world_size')} is not the number of worker pods")
            return 0
    except (RuntimeError, KeyError) as e:
        print(f"FAILED: {e.args[0] if e.args else e}", file=sys.stderr)
        for name, log in logs.items():
            if log.exists():
                tail = log.read_text().splitlines()[-15:]
                print(f"--- pod {name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
        return 1
    finally:
        subprocess.run(["umount", "-R", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
