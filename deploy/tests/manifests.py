"""What the rendered Kubernetes manifests mean for butler, and the checks over them.

A model of the pods the cluster would create from a rendered JobSet or Job (names, labels, the
annotations the Job and JobSet controllers add, the coordinator address JobSet publishes), the schema
validation, and the policy checks. Every check returns a list of problems (strings naming the object and
the field); an empty list means the check passed. deploy/tests/test_policy.py runs them over every overlay
and over deliberately broken manifests; deploy/tests/pods.py runs the pods of a render end to end.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent
KUSTOMIZE = DEPLOY / "kustomize"
# Every render a user may apply, by name (relative to deploy/kustomize).
WORKLOADS = ["base", "overlays/gpu", "overlays/kueue", "overlays/elastic", "fallback"]
GPU_WORKLOADS = ["overlays/gpu", "overlays/kueue"]
OTHERS = ["storage", "prepare-data"]

TOKEN_SECRET = "butler-token"
TOKEN_KEY = "token"
# Objects the user creates (deploy/README.md): the token Secret. Everything else a pod references must be
# in the renders.
USER_SECRETS = {TOKEN_SECRET}
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
COORDINATOR_ANNOTATION = "jobset.sigs.k8s.io/coordinator"
# The Kubernetes versions the schemas are checked against: the oldest we support and the newest the
# validator knows.
K8S_VERSIONS = ["1.30", "1.37"]
JOBSET = ("jobset.x-k8s.io/v1alpha2", "JobSet")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUB = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Job pod names end in a 5-character random suffix.
SUFFIX = "-xxxxx"


# --------------------------------------------------------------------------------------------- rendering


def kubectl() -> str:
    return os.environ.get("KUBECTL", str(DEPLOY.parent / ".venv-deploy" / "bin" / "kubectl"))


def render(directory: Path, unrestricted: bool = False) -> list[dict]:
    """`kubectl kustomize DIR`, parsed. Raises with kubectl's message when the kustomization is broken."""
    cmd = [kubectl(), "kustomize", str(directory)]
    if unrestricted:
        cmd += ["--load-restrictor", "LoadRestrictionsNone"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{out.stderr.strip()}")
    return load(out.stdout)


def load(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ----------------------------------------------------------------------------------------- the pod model


@dataclass
class Template:
    """One pod template and the Job it belongs to."""

    owner: str  # "JobSet/butler" or "Job/x"
    rjob: str | None  # the replicated job, for a JobSet
    job_names: list[str]  # the Jobs created from it
    job_spec: dict
    pod_spec: dict
    labels: dict
    jobset: dict | None = None

    @property
    def role(self) -> str:
        """coordinator, worker, or the first argument of its first container."""
        containers = self.pod_spec.get("containers") or [{}]
        args = container_args(containers[0])
        return {"coordinator": "coordinator", "worker": "worker"}.get(args[0] if args else "", args[0] if args else "?")

    @property
    def where(self) -> str:
        return f"{self.owner}" + (f" replicatedJob {self.rjob}" if self.rjob else "")


@dataclass
class Pod:
    template: Template
    job_name: str
    index: int
    hostname: str
    subdomain: str | None
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.hostname + SUFFIX

    def fqdn(self) -> str | None:
        return f"{self.hostname}.{self.subdomain}" if self.subdomain else None


def container_args(c: dict) -> list[str]:
    """The argument vector after the image's ENTRYPOINT ["butler"] (or after an explicit `butler`)."""
    cmd = list(c.get("command") or [])
    args = [str(a) for a in c.get("args") or []]
    if cmd and os.path.basename(cmd[0]) == "butler":
        return [str(a) for a in cmd[1:]] + args
    if cmd:
        return []
    return args


def jobset_subdomain(js: dict) -> str:
    return (js["spec"].get("network") or {}).get("subdomain") or js["metadata"]["name"]


def templates(docs: list[dict]) -> list[Template]:
    out = []
    for d in docs:
        kind = (d.get("apiVersion"), d.get("kind"))
        if kind == JOBSET:
            js = d["metadata"]["name"]
            for rj in d["spec"].get("replicatedJobs") or []:
                spec = rj.get("template", {}).get("spec", {})
                pod = spec.get("template", {})
                out.append(
                    Template(
                        owner=name_of(d),
                        rjob=rj.get("name"),
                        job_names=[f"{js}-{rj.get('name')}-{j}" for j in range(int(rj.get("replicas", 1)))],
                        job_spec=spec,
                        pod_spec=pod.get("spec", {}),
                        labels=(pod.get("metadata") or {}).get("labels") or {},
                        jobset=d,
                    )
                )
        elif d.get("kind") == "Job":
            pod = d["spec"].get("template", {})
            out.append(
                Template(
                    owner=name_of(d),
                    rjob=None,
                    job_names=[d["metadata"]["name"]],
                    job_spec=d["spec"],
                    pod_spec=pod.get("spec", {}),
                    labels=(pod.get("metadata") or {}).get("labels") or {},
                )
            )
    return out


def pods(docs: list[dict]) -> list[Pod]:
    """The pods the controllers would create, with the labels and annotations they would set."""
    out = []
    for t in templates(docs):
        spec = t.job_spec
        indexed = spec.get("completionMode") == "Indexed" or t.jobset is not None  # JobSet defaults Indexed
        count = int(spec.get("completions", spec.get("parallelism", 1)))
        for j, job in enumerate(t.job_names):
            for i in range(count):
                labels = dict(t.labels)
                labels.update({"batch.kubernetes.io/job-name": job, "job-name": job})
                ann = {}
                if indexed:
                    labels[COMPLETION_INDEX] = str(i)
                    ann[COMPLETION_INDEX] = str(i)
                subdomain = t.pod_spec.get("subdomain")
                if t.jobset is not None:
                    js = t.jobset
                    ann.update(
                        {
                            "jobset.sigs.k8s.io/jobset-name": js["metadata"]["name"],
                            "jobset.sigs.k8s.io/replicatedjob-name": t.rjob,
                            "jobset.sigs.k8s.io/job-index": str(j),
                        }
                    )
                    labels.update({"jobset.sigs.k8s.io/jobset-name": js["metadata"]["name"],
                                   "jobset.sigs.k8s.io/replicatedjob-name": t.rjob})
                    coord = js["spec"].get("coordinator")
                    if coord:
                        sub = jobset_subdomain(js)
                        ann[COORDINATOR_ANNOTATION] = (
                            f"{js['metadata']['name']}-{coord['replicatedJob']}-"
                            f"{coord.get('jobIndex', 0)}-{coord.get('podIndex', 0)}.{sub}"
                        )
                    if (js["spec"].get("network") or {}).get("enableDNSHostnames"):
                        subdomain = jobset_subdomain(js)
                hostname = f"{job}-{i}" if indexed else f"{job}-{i}"
                out.append(Pod(t, job, i, hostname, subdomain, labels, ann))
    return out


def services(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") == "Service"]


def config_maps(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}


def claims(docs: list[dict]) -> set[str]:
    return {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def env_entry(c: dict, name: str) -> dict | None:
    for e in c.get("env") or []:
        if e.get("name") == name:
            return e
    return None


def all_containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def mount_of(pod_spec: dict, c: dict, path: str) -> tuple[dict, dict] | None:
    """The (volumeMount, volume) whose mount path holds `path` (the longest such mount path)."""
    best = None
    for m in c.get("volumeMounts") or []:
        mp = m["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    if best is None:
        return None
    vol = next((v for v in pod_spec.get("volumes") or [] if v.get("name") == best.get("name")), None)
    return best, vol or {}


def job_config(docs: list[dict], t: Template) -> tuple[dict | None, str | None]:
    """The job config (parsed TOML) the coordinator of template `t` reads, and where it came from."""
    c = t.pod_spec["containers"][0]
    path = flag_value(container_args(c), "--config")
    if path is None:
        return None, None
    hit = mount_of(t.pod_spec, c, path)
    if hit is None or "configMap" not in hit[1]:
        return None, None
    cm = config_maps(docs).get(hit[1]["configMap"]["name"])
    if cm is None:
        return None, None
    key = path[len(hit[0]["mountPath"].rstrip("/")) + 1:]
    text = (cm.get("data") or {}).get(key)
    if text is None:
        return None, None
    return tomllib.loads(text), f"ConfigMap/{cm['metadata']['name']} key {key}"


def coordinator_template(docs: list[dict]) -> Template | None:
    return next((t for t in templates(docs) if t.role == "coordinator"), None)


def worker_template(docs: list[dict]) -> Template | None:
    return next((t for t in templates(docs) if t.role == "worker"), None)


# ------------------------------------------------------------------------------------ schema validation


def jobset_schema() -> dict:
    return json.loads((Path(__file__).parent / "jobset-envelope.schema.json").read_text())


def validate_schemas(docs: list[dict], versions: list[str] = K8S_VERSIONS) -> list[str]:
    """Every built-in object strictly against Kubernetes' own schemas (a kind without one is a failure),
    the JobSet envelope against ours and each of its job templates as a batch/v1 Job."""
    import jsonschema
    import kubernetes_validate

    problems = []

    def builtin(obj: dict, what: str) -> None:
        for v in versions:
            try:
                kubernetes_validate.validate(obj, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{what}: not a valid {obj.get('kind')} for Kubernetes {v}: {e.message} "
                                f"at {'/'.join(str(p) for p in e.path)}")
                return
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{what}: no schema for {obj.get('apiVersion')} {obj.get('kind')} "
                                f"(Kubernetes {v}); only built-in kinds and JobSet are allowed")
                return
            except kubernetes_validate.InvalidSchemaError as e:
                problems.append(f"{what}: invalid schema: {e}")
                return

    schema = jobset_schema()
    for d in docs:
        what = name_of(d)
        if (d.get("apiVersion"), d.get("kind")) == JOBSET:
            v = jsonschema.Draft202012Validator(schema)
            for e in sorted(v.iter_errors(d), key=lambda e: list(e.path)):
                problems.append(f"{what}: {e.message} at /{'/'.join(str(p) for p in e.path)}")
            for rj in d.get("spec", {}).get("replicatedJobs") or []:
                if "template" not in rj:
                    continue
                job = {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {"name": f"{d['metadata']['name']}-{rj.get('name')}-0"},
                    "spec": rj["template"].get("spec", {}),
                }
                builtin(job, f"{what} replicatedJob {rj.get('name')} (as a batch/v1 Job)")
            problems += jobset_rules(d)
        else:
            builtin(d, what)
    return problems


def jobset_rules(js: dict) -> list[str]:
    """What the JobSet CRD's CEL rules and webhook would refuse, beyond the envelope schema."""
    what = name_of(js)
    spec = js.get("spec", {})
    rjobs = [rj.get("name") for rj in spec.get("replicatedJobs") or []]
    problems = []
    if len(set(rjobs)) != len(rjobs):
        problems.append(f"{what}: replicatedJobs names repeat: {rjobs}")
    order = (spec.get("startupPolicy") or {}).get("startupPolicyOrder")
    if order == "InOrder" and any(rj.get("dependsOn") for rj in spec.get("replicatedJobs") or []):
        problems.append(f"{what}: startupPolicyOrder InOrder cannot be combined with dependsOn")
    coord = spec.get("coordinator")
    if coord and coord.get("replicatedJob") not in rjobs:
        problems.append(f"{what}: spec.coordinator.replicatedJob {coord.get('replicatedJob')!r} is not one of {rjobs}")
    for target in (spec.get("successPolicy") or {}).get("targetReplicatedJobs") or []:
        if target not in rjobs:
            problems.append(f"{what}: successPolicy targets {target!r}, not one of {rjobs}")
    return problems


# ---------------------------------------------------------------------------------------- policy checks


def check_token(docs: list[dict]) -> list[str]:
    """Every container gets BUTLER_TOKEN from the user's Secret, never as a literal; no Secret is shipped."""
    problems = [f"{name_of(d)}: a Secret must not be shipped (the user creates {TOKEN_SECRET})"
                for d in docs if d.get("kind") == "Secret"]
    for t in templates(docs):
        for c in all_containers(t.pod_spec):
            e = env_entry(c, "BUTLER_TOKEN")
            ref = ((e or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if e is None:
                problems.append(f"{t.where} container {c['name']}: no BUTLER_TOKEN")
            elif "value" in e or ref.get("name") != TOKEN_SECRET or ref.get("key") != TOKEN_KEY:
                problems.append(f"{t.where} container {c['name']}: BUTLER_TOKEN must come from Secret "
                                f"{TOKEN_SECRET} key {TOKEN_KEY}, found {e}")
            for a in container_args(c):
                if a.startswith("--token"):
                    problems.append(f"{t.where} container {c['name']}: the token is passed on the command line")
    return problems


def check_world_size(docs: list[dict]) -> list[str]:
    """One coordinator; the workers' parallelism and completions equal its --world-size; one worker Job."""
    co, wo = coordinator_template(docs), worker_template(docs)
    if co is None or wo is None:
        return [f"the render needs a coordinator and a workers template, found roles "
                f"{[t.role for t in templates(docs)]}"]
    problems = []
    ws = flag_value(container_args(co.pod_spec["containers"][0]), "--world-size")
    if ws is None or not ws.isdigit():
        return [f"{co.where}: the coordinator has no numeric --world-size ({ws!r})"]
    ws = int(ws)
    if len(co.job_names) != 1 or int(co.job_spec.get("completions", 1)) != 1 or int(co.job_spec.get("parallelism", 1)) != 1:
        problems.append(f"{co.where}: there must be exactly one coordinator pod")
    if len(wo.job_names) != 1:
        problems.append(f"{wo.where}: the workers must be one Job (replicas: 1) so that rank = completion index, "
                        f"found {len(wo.job_names)}")
    for key in ("completions", "parallelism"):
        if int(wo.job_spec.get(key, -1)) != ws:
            problems.append(f"{wo.where}: {key} is {wo.job_spec.get(key)}, the coordinator's --world-size is {ws}")
    if wo.jobset is None and wo.job_spec.get("completionMode") != "Indexed":
        problems.append(f"{wo.where}: completionMode must be Indexed (the rank is the completion index)")
    return problems


def check_rank(docs: list[dict]) -> list[str]:
    """Workers take their rank from the completion index and advertise their pod IP."""
    wo = worker_template(docs)
    if wo is None:
        return ["no worker template"]
    problems = []
    c = wo.pod_spec["containers"][0]
    args = container_args(c)
    rank = env_entry(c, "BUTLER_RANK")
    field_path = (((rank or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
    if field_path != f"metadata.annotations['{COMPLETION_INDEX}']" and not (
        rank and rank.get("value") == "$(JOB_COMPLETION_INDEX)"
    ):
        problems.append(f"{wo.where}: BUTLER_RANK must come from the completion index, found {rank}")
    if "--rank" in args:
        problems.append(f"{wo.where}: --rank on the command line would override BUTLER_RANK")
    adv = env_entry(c, "BUTLER_ADVERTISE_HOST")
    if (((adv or {}).get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath") != "status.podIP":
        problems.append(f"{wo.where}: BUTLER_ADVERTISE_HOST must be the pod IP (fieldRef status.podIP), found {adv}")
    return problems


def check_shared_claim(docs: list[dict]) -> list[str]:
    """The run directory and the data are on one ReadWriteMany claim mounted at one path in every pod."""
    co, wo = coordinator_template(docs), worker_template(docs)
    if co is None or wo is None:
        return ["no coordinator or worker template"]
    problems = []
    args = container_args(co.pod_spec["containers"][0])
    run_dir = flag_value(args, "--run-dir")
    if not run_dir or not run_dir.startswith("/"):
        return [f"{co.where}: --run-dir must be an absolute path on the claim, found {run_dir!r}"]
    hit = mount_of(co.pod_spec, co.pod_spec["containers"][0], run_dir)
    if hit is None or "persistentVolumeClaim" not in hit[1]:
        return [f"{co.where}: --run-dir {run_dir} is not on a persistentVolumeClaim mount"]
    mount_path, claim = hit[0]["mountPath"], hit[1]["persistentVolumeClaim"]["claimName"]
    if hit[0].get("readOnly"):
        problems.append(f"{co.where}: the claim {claim} is mounted read-only")
    cfg, _ = job_config(docs, co)
    paths = []
    if cfg:
        paths = [("data.manifest", cfg.get("data", {}).get("manifest", ""))]
        for key in ("teacher_checkpoint", "init_checkpoint"):
            for section in cfg.values():
                if isinstance(section, dict) and isinstance(section.get(key), str):
                    paths.append((key, section[key]))
    for what, p in paths:
        if not str(p).startswith(mount_path.rstrip("/") + "/"):
            problems.append(f"job config {what} = {p!r} is not under the claim's mount path {mount_path}")
    for t in templates(docs):
        if t.role not in ("coordinator", "worker"):
            continue
        for c in t.pod_spec["containers"]:
            found = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == mount_path]
            vol = next((v for v in t.pod_spec.get("volumes") or [] if found and v.get("name") == found[0]["name"]), {})
            if not found or (vol.get("persistentVolumeClaim") or {}).get("claimName") != claim:
                problems.append(f"{t.where} container {c['name']}: claim {claim} is not mounted at {mount_path}")
            elif found[0].get("readOnly"):
                problems.append(f"{t.where} container {c['name']}: claim {claim} is mounted read-only")
    for d in docs:
        if d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == claim:
            if "ReadWriteMany" not in d["spec"].get("accessModes", []):
                problems.append(f"{name_of(d)}: must be ReadWriteMany (every pod mounts it at once)")
    return problems


def backoff(spec: dict) -> int:
    # Kubernetes' default backoffLimit is 6.
    return int(spec.get("backoffLimit", 6))


def check_restarts(docs: list[dict]) -> list[str]:
    """No restart the coordinator cannot survive: the coordinator never restarts (started again without
    --resume it deletes the run's summary and metrics), the JobSet never restarts (that restarts the
    coordinator too), and worker pods are replaced at most as often as the job regroups
    (cluster.max_restarts)."""
    problems = []
    for d in docs:
        if (d.get("apiVersion"), d.get("kind")) == JOBSET:
            fp = d["spec"].get("failurePolicy")
            if fp is not None and (int(fp.get("maxRestarts", 0)) != 0 or any(
                    r.get("action", "RestartJobSet") != "FailJobSet" for r in fp.get("rules") or [])):
                problems.append(f"{name_of(d)}: failurePolicy restarts the JobSet (and with it the coordinator): {fp}")
    co, wo = coordinator_template(docs), worker_template(docs)
    if co is None or wo is None:
        return problems + ["no coordinator or worker template"]
    if co.pod_spec.get("restartPolicy") != "Never":
        problems.append(f"{co.where}: the coordinator's restartPolicy must be Never, found {co.pod_spec.get('restartPolicy')}")
    if backoff(co.job_spec) != 0 or co.job_spec.get("backoffLimitPerIndex"):
        problems.append(f"{co.where}: the coordinator's backoffLimit must be 0, found {co.job_spec.get('backoffLimit', '6 (default)')}")
    cfg, _ = job_config(docs, co)
    max_restarts = int(((cfg or {}).get("cluster") or {}).get("max_restarts", 0))
    per_index = wo.job_spec.get("backoffLimitPerIndex")
    replacements = backoff(wo.job_spec) if per_index is None else int(per_index) * int(wo.job_spec.get("completions", 1))
    if wo.pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{wo.where}: restartPolicy must be Never or OnFailure")
    if replacements > max_restarts:
        problems.append(
            f"{wo.where}: up to {replacements} failed worker pods are replaced (backoffLimit "
            f"{wo.job_spec.get('backoffLimit', '6 (default)')}), but the job regroups only "
            f"cluster.max_restarts = {max_restarts} times; a replacement after that joins a failed job")
    return problems


def check_references(docs: list[dict], extra: list[dict] = ()) -> list[str]:
    """Every ConfigMap, claim and Secret a pod references exists in the render (claims may come from the
    storage kustomization, `extra`); Secrets only the user's token."""
    cms, pvcs = config_maps(docs), claims(list(docs) + list(extra))
    problems = []
    for t in templates(docs):
        for v in t.pod_spec.get("volumes") or []:
            if "configMap" in v and v["configMap"]["name"] not in cms:
                problems.append(f"{t.where} volume {v['name']}: ConfigMap {v['configMap']['name']} is not "
                                f"in the render (found {sorted(cms)})")
            if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                problems.append(f"{t.where} volume {v['name']}: claim {v['persistentVolumeClaim']['claimName']} "
                                f"does not exist (found {sorted(pvcs)})")
            if "secret" in v and v["secret"].get("secretName") not in USER_SECRETS:
                problems.append(f"{t.where} volume {v['name']}: unknown Secret {v['secret'].get('secretName')}")
        for c in all_containers(t.pod_spec):
            names = {v["name"] for v in t.pod_spec.get("volumes") or []}
            for m in c.get("volumeMounts") or []:
                if m["name"] not in names:
                    problems.append(f"{t.where} container {c['name']}: mounts undeclared volume {m['name']}")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                if "configMapKeyRef" in vf and vf["configMapKeyRef"]["name"] not in cms:
                    problems.append(f"{t.where} env {e['name']}: ConfigMap {vf['configMapKeyRef']['name']} missing")
                if "secretKeyRef" in vf and vf["secretKeyRef"]["name"] not in USER_SECRETS:
                    problems.append(f"{t.where} env {e['name']}: unknown Secret {vf['secretKeyRef']['name']}")
    return problems


def check_names(docs: list[dict]) -> list[str]:
    """Pod names (with the 5-character suffix), hostnames, Job and Service names are DNS-1035 labels."""
    problems = []
    for p in pods(docs):
        for what, n in (("pod name", p.name), ("hostname", p.hostname), ("Job name", p.job_name)):
            if len(n) > 63 or not DNS1035.match(n):
                problems.append(f"{p.template.where}: {what} {n!r} is not a DNS-1035 label of at most 63 characters")
        if p.subdomain and (len(p.subdomain) > 63 or not DNS1035.match(p.subdomain)):
            problems.append(f"{p.template.where}: subdomain {p.subdomain!r} is not a DNS-1035 label")
    for s in services(docs):
        n = s["metadata"]["name"]
        if len(n) > 63 or not DNS1035.match(n):
            problems.append(f"{name_of(s)}: not a DNS-1035 label of at most 63 characters")
    return sorted(set(problems))


def check_gpu(docs: list[dict]) -> list[str]:
    """GPU renders: every worker asks for GPUs in limits, mounts a memory-backed /dev/shm, and the job
    insists on CUDA."""
    wo, co = worker_template(docs), coordinator_template(docs)
    if wo is None:
        return ["no worker template"]
    problems = []
    c = wo.pod_spec["containers"][0]
    res = c.get("resources") or {}
    gpus = (res.get("limits") or {}).get("nvidia.com/gpu")
    if not isinstance(gpus, int) or gpus < 1:
        problems.append(f"{wo.where}: limits nvidia.com/gpu must be a positive integer, found {gpus!r}")
    req = (res.get("requests") or {}).get("nvidia.com/gpu")
    if req is not None and req != gpus:
        problems.append(f"{wo.where}: GPU requests ({req}) must equal limits ({gpus})")
    hit = mount_of(wo.pod_spec, c, "/dev/shm")
    if hit is None or hit[0]["mountPath"] != "/dev/shm" or (hit[1].get("emptyDir") or {}).get("medium") != "Memory":
        problems.append(f"{wo.where}: /dev/shm must be an emptyDir with medium Memory (NCCL)")
    if co is not None:
        cfg, src = job_config(docs, co)
        if ((cfg or {}).get("cluster") or {}).get("device") != "cuda":
            problems.append(f"job config ({src}): cluster.device must be \"cuda\" on GPU nodes")
    return problems


def check_kueue(docs: list[dict]) -> list[str]:
    problems = []
    top = [d for d in docs if (d.get("apiVersion"), d.get("kind")) == JOBSET]
    if not top:
        return ["no JobSet to queue"]
    for d in top:
        if not (d["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name"):
            problems.append(f"{name_of(d)}: no kueue.x-k8s.io/queue-name label")
        if d["spec"].get("suspend") is not True:
            problems.append(f"{name_of(d)}: must be created suspended (Kueue starts it)")
    return problems


def port_number(c: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port), None)


def resolve_name(docs: list[dict], host: str) -> list[Pod]:
    """The pods a name resolves to: a pod's hostname.subdomain (JobSet DNS hostnames) or a Service."""
    ps = pods(docs)
    found = [p for p in ps if p.fqdn() and host in (p.fqdn(), p.fqdn() + ".svc.cluster.local")]
    for s in services(docs):
        n = s["metadata"]["name"]
        if host in (n, f"{n}.svc.cluster.local") or host.startswith(n + ".") and host.endswith(".svc.cluster.local"):
            sel = s["spec"].get("selector") or {}
            found += [p for p in ps if sel and all(p.labels.get(k) == v for k, v in sel.items())]
    return found


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion ($$ escapes; unknown references stay as written)."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def field_value(pod: Pod, path: str, pod_ip: str) -> str:
    """A downward-API fieldRef value for `pod`."""
    m = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
    if m:
        table = pod.annotations if m.group(1) == "annotations" else pod.labels
        if m.group(2) not in table:
            raise KeyError(f"{pod.template.where}: fieldRef {path}: pod {pod.hostname} would have no such "
                           f"{m.group(1)[:-1]} (it has {sorted(table)})")
        return table[m.group(2)]
    simple = {"metadata.name": pod.name, "metadata.namespace": "default", "status.podIP": pod_ip,
              "spec.nodeName": "node-0", "status.hostIP": pod_ip, "spec.serviceAccountName": "default"}
    if path not in simple:
        raise KeyError(f"{pod.template.where}: unsupported fieldRef {path}")
    return simple[path]


def pod_env(pod: Pod, c: dict, pod_ip: str, token: str, cms: dict[str, dict]) -> dict[str, str]:
    """The environment Kubernetes gives container `c` of `pod`, in order, with $(VAR) expanded."""
    env: dict[str, str] = {"HOSTNAME": pod.hostname}
    if COMPLETION_INDEX in pod.annotations:
        env["JOB_COMPLETION_INDEX"] = pod.annotations[COMPLETION_INDEX]
    for e in c.get("env") or []:
        vf = e.get("valueFrom")
        if vf is None:
            env[e["name"]] = expand(str(e.get("value", "")), env)
        elif "fieldRef" in vf:
            env[e["name"]] = field_value(pod, vf["fieldRef"]["fieldPath"], pod_ip)
        elif "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            if (ref.get("name"), ref.get("key")) != (TOKEN_SECRET, TOKEN_KEY):
                raise KeyError(f"{pod.template.where} env {e['name']}: no Secret {ref.get('name')} key {ref.get('key')}")
            env[e["name"]] = token
        elif "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            env[e["name"]] = cms[ref["name"]]["data"][ref["key"]]
        else:
            raise KeyError(f"{pod.template.where} env {e['name']}: unsupported valueFrom {vf}")
    return env


def check_coordinator_address(docs: list[dict]) -> list[str]:
    """Every worker's --coordinator URL names the coordinator pod (through the JobSet annotation or a
    Service) at the port it listens on, and the coordinator's readiness probe tests that port."""
    co, wo = coordinator_template(docs), worker_template(docs)
    if co is None or wo is None:
        return ["no coordinator or worker template"]
    problems = []
    cc = co.pod_spec["containers"][0]
    listen = flag_value(container_args(cc), "--listen") or "0.0.0.0:50051"
    listen_port = int(listen.rsplit(":", 1)[1])
    probe = (cc.get("readinessProbe") or {})
    probe_port = port_number(cc, (probe.get("tcpSocket") or probe.get("grpc") or {}).get("port"))
    if probe_port != listen_port:
        problems.append(f"{co.where}: the readiness probe must test the gRPC port {listen_port}, found {probe}")
    coord_pods = [p for p in pods(docs) if p.template is co or p.template.owner == co.owner and p.template.rjob == co.rjob]
    for p in [p for p in pods(docs) if p.template.role == "worker"]:
        c = p.template.pod_spec["containers"][0]
        try:
            env = pod_env(p, c, "10.0.0.1", "token", config_maps(docs))
        except KeyError as e:
            problems.append(str(e.args[0]))
            continue
        url = expand(flag_value(container_args(c), "--coordinator") or "", env)
        m = re.fullmatch(r"https?://([^:/]+):(\d+)/?", url)
        if not m:
            problems.append(f"{p.template.where}: --coordinator {url!r} is not http://HOST:PORT")
            continue
        host, port = m.group(1), int(m.group(2))
        hits = resolve_name(docs, host)
        if [h.hostname for h in hits] != [h.hostname for h in coord_pods]:
            problems.append(f"{p.template.where} pod {p.hostname}: --coordinator host {host!r} resolves to "
                            f"{[h.hostname for h in hits]}, not the coordinator pod")
        svc_port = port
        for s in services(docs):
            if host.split(".")[0] == s["metadata"]["name"]:
                sp = next((x for x in s["spec"].get("ports") or [] if x.get("port") == port), None)
                svc_port = port_number(cc, sp.get("targetPort", port)) if sp else None
        if svc_port != listen_port:
            problems.append(f"{p.template.where}: --coordinator port {port} does not reach the coordinator's "
                            f"--listen port {listen_port}")
    return sorted(set(problems))


# ------------------------------------------------------------------------------- checks with the binary


def help_text(butler: str, sub: list[str]) -> str:
    out = subprocess.run([butler, *sub, "--help"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{butler} {' '.join(sub)} --help failed: {out.stderr}")
    return out.stdout


# Read by butler outside clap (tracing's filter) or by libraries it loads.
OTHER_ENV = {"BUTLER_LOG", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG"}


def check_flags(docs: list[dict], butler: str) -> list[str]:
    """Every --flag the manifests pass is in `butler <subcommand> --help`, and every BUTLER_* variable is
    one butler reads ([env: NAME] in the help) or one the arguments use as $(NAME)."""
    problems = []
    for t in templates(docs):
        for c in all_containers(t.pod_spec):
            args = container_args(c)
            sub = []
            for a in args:
                if a.startswith("-"):
                    break
                sub.append(a)
            if not sub:
                problems.append(f"{t.where} container {c['name']}: does not run a butler subcommand: {args}")
                continue
            try:
                text = help_text(butler, sub)
            except RuntimeError as e:
                problems.append(f"{t.where} container {c['name']}: {e}")
                continue
            known = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", text))
            for a in args[len(sub):]:
                if a.startswith("--"):
                    flag = a.split("=", 1)[0]
                    if flag not in known:
                        problems.append(f"{t.where} container {c['name']}: `butler {' '.join(sub)}` has no flag {flag}")
            envs = set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", text))
            used = set(re.findall(r"\$\(([A-Za-z0-9_]+)\)", " ".join(args)))
            for e in c.get("env") or []:
                n = e["name"]
                if (n.startswith("BUTLER_") or n.startswith("NCCL_")) and n not in envs | used | OTHER_ENV:
                    problems.append(f"{t.where} container {c['name']}: `butler {' '.join(sub)}` reads no "
                                    f"variable {n} (its help lists {sorted(envs)})")
    return problems


def check_job_config(docs: list[dict], butler: str) -> list[str]:
    """The coordinator's exact command line, with the ConfigMap's files where it mounts them, passes
    `butler coordinator … --check`: butler's strict config parser and the world-size rules."""
    problems = []
    for t in templates(docs):
        if t.role != "coordinator":
            continue
        c = t.pod_spec["containers"][0]
        args = container_args(c)
        cfg_path = flag_value(args, "--config")
        hit = mount_of(t.pod_spec, c, cfg_path or "")
        if hit is None or "configMap" not in hit[1]:
            problems.append(f"{t.where}: --config {cfg_path} is not in a ConfigMap mount")
            continue
        cm = config_maps(docs).get(hit[1]["configMap"]["name"])
        if cm is None:
            problems.append(f"{t.where}: ConfigMap {hit[1]['configMap']['name']} is not in the render")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for k, v in (cm.get("data") or {}).items():
                (Path(tmp) / k).write_text(v)
            local = [tmp + a[len(hit[0]["mountPath"].rstrip("/")):] if a == cfg_path else a for a in args]
            env = dict(os.environ, BUTLER_TOKEN="check-only")
            out = subprocess.run([butler, *local, "--check"], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                problems.append(f"{t.where}: `butler {shlex.join(args)} --check` fails: "
                                f"{(out.stderr or out.stdout).strip()}")
    return problems


POLICY = [check_token, check_world_size, check_rank, check_shared_claim, check_restarts, check_names,
          check_coordinator_address]


def policy(docs: list[dict], extra: list[dict] = ()) -> list[str]:
    problems = [p for check in POLICY for p in check(docs)]
    return problems + check_references(docs, extra)


def mutated(docs: list[dict]) -> list[dict]:
    return copy.deepcopy(docs)
