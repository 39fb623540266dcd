"""Schema and policy checks over every render (deploy/check.sh runs this with pytest), and, for each
check, a deliberately broken manifest that it must refuse."""

import os
import subprocess
from pathlib import Path

import pytest

import manifests as m

BUTLER = os.environ.get("BUTLER_BIN", str(m.DEPLOY.parent / "target" / "debug" / "butler"))
BROKEN = Path(__file__).parent / "broken"


@pytest.fixture(scope="session")
def storage():
    return m.render(m.KUSTOMIZE / "storage")


@pytest.fixture(scope="session")
def renders():
    return {w: m.render(m.KUSTOMIZE / w) for w in m.WORKLOADS + m.OTHERS}


def base(renders):
    return m.mutated(renders["base"])


def fallback(renders):
    return m.mutated(renders["fallback"])


def jobset(docs):
    return next(d for d in docs if d.get("kind") == "JobSet")


def rjob(docs, name):
    return next(r for r in jobset(docs)["spec"]["replicatedJobs"] if r["name"] == name)


def pod_spec(docs, name):
    return rjob(docs, name)["template"]["spec"]["template"]["spec"]


def worker_container(docs):
    return pod_spec(docs, "workers")["containers"][0]


def coordinator_container(docs):
    return pod_spec(docs, "coordinator")["containers"][0]


def assert_refused(problems, *needles):
    text = "\n".join(problems)
    for n in needles:
        assert n in text, f"expected a problem mentioning {n!r}, got:\n{text or '(none)'}"


# ------------------------------------------------------------------------------------ every render passes


@pytest.mark.parametrize("workload", m.WORKLOADS + m.OTHERS)
def test_schemas(renders, workload):
    assert m.validate_schemas(renders[workload]) == []


@pytest.mark.parametrize("workload", m.WORKLOADS)
def test_policy(renders, storage, workload):
    assert m.policy(renders[workload], storage) == []


@pytest.mark.parametrize("workload", m.GPU_WORKLOADS)
def test_gpu(renders, workload):
    assert m.check_gpu(renders[workload]) == []


def test_kueue(renders):
    assert m.check_kueue(renders["overlays/kueue"]) == []


@pytest.mark.parametrize("workload", m.WORKLOADS + ["prepare-data"])
def test_flags_exist(renders, workload):
    assert m.check_flags(renders[workload], BUTLER) == []


@pytest.mark.parametrize("workload", m.WORKLOADS)
def test_job_config_parses(renders, workload):
    assert m.check_job_config(renders[workload], BUTLER) == []


def test_prepare_data_references(renders, storage):
    assert m.check_references(renders["prepare-data"], storage) == []


def test_elastic_survives_lost_workers(renders):
    docs = renders["overlays/elastic"]
    cfg, _ = m.job_config(docs, m.coordinator_template(docs))
    assert cfg["cluster"]["max_restarts"] >= 1
    assert m.worker_template(docs).job_spec["backoffLimit"] == cfg["cluster"]["max_restarts"]


# ------------------------------------------------------------------------- each check refuses a broken one


def test_schema_refuses_a_typo_deep_in_a_pod(renders):
    docs = base(renders)
    worker_container(docs)["volumeMounts"][0]["mountpath"] = "/x"
    assert_refused(m.validate_schemas(docs), "replicatedJob workers", "mountpath")


def test_schema_refuses_a_wrong_type(renders):
    docs = base(renders)
    rjob(docs, "workers")["template"]["spec"]["parallelism"] = "two"
    assert_refused(m.validate_schemas(docs), "parallelism")


def test_schema_refuses_an_unknown_jobset_field(renders):
    docs = base(renders)
    jobset(docs)["spec"]["network"]["enableDnsHostnames"] = True
    jobset(docs)["spec"]["startupPolicy"]["startupPolicyOrder"] = "Sequential"
    assert_refused(m.validate_schemas(docs), "enableDnsHostnames", "Sequential")


def test_schema_refuses_a_kind_without_schema(renders):
    docs = base(renders) + [{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}]
    assert_refused(m.validate_schemas(docs), "no schema for example.com/v1 Widget")


def test_schema_refuses_a_builtin_typo(renders):
    docs = fallback(renders)
    next(d for d in docs if d["kind"] == "Service")["spec"]["ports"][0]["targetport"] = 1
    assert_refused(m.validate_schemas(docs), "Service/butler-coordinator", "targetport")


def test_jobset_rules_refuse_inorder_with_depends_on(renders):
    docs = base(renders)
    rjob(docs, "workers")["dependsOn"] = [{"name": "coordinator", "status": "Ready"}]
    jobset(docs)["spec"]["coordinator"]["replicatedJob"] = "driver"
    assert_refused(m.validate_schemas(docs), "InOrder cannot be combined", "'driver' is not one of")


def test_token_refuses_a_literal_and_a_missing_token(renders):
    docs = base(renders)
    worker_container(docs)["env"][0] = {"name": "BUTLER_TOKEN", "value": "hunter2"}
    coordinator_container(docs)["env"] = coordinator_container(docs)["env"][1:]
    assert_refused(m.check_token(docs), "replicatedJob workers container worker: BUTLER_TOKEN must come",
                   "replicatedJob coordinator container coordinator: no BUTLER_TOKEN")


def test_token_refuses_a_shipped_secret(renders):
    docs = base(renders) + [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "butler-token"}}]
    assert_refused(m.check_token(docs), "must not be shipped")


def test_world_size_refuses_three_workers_for_two(renders):
    docs = base(renders)
    rjob(docs, "workers")["template"]["spec"]["completions"] = 3
    rjob(docs, "workers")["template"]["spec"]["parallelism"] = 3
    assert_refused(m.check_world_size(docs), "completions is 3", "parallelism is 3")


def test_world_size_refuses_two_worker_jobs(renders):
    docs = base(renders)
    rjob(docs, "workers")["replicas"] = 2
    assert_refused(m.check_world_size(docs), "must be one Job")


def test_rank_refuses_the_pod_name_and_a_fixed_host(renders):
    docs = fallback(renders)
    c = next(d for d in docs if d["metadata"]["name"] == "butler-workers")["spec"]["template"]["spec"]["containers"][0]
    next(e for e in c["env"] if e["name"] == "BUTLER_RANK")["valueFrom"]["fieldRef"]["fieldPath"] = "metadata.name"
    next(e for e in c["env"] if e["name"] == "BUTLER_ADVERTISE_HOST")["valueFrom"]["fieldRef"]["fieldPath"] = "status.hostIP"
    assert_refused(m.check_rank(docs), "BUTLER_RANK must come from the completion index",
                   "BUTLER_ADVERTISE_HOST must be the pod IP")


def test_claim_refuses_another_mount_path_and_a_local_run_dir(renders):
    docs = base(renders)
    worker_container(docs)["volumeMounts"][0]["mountPath"] = "/data"
    assert_refused(m.check_shared_claim(docs), "container worker: claim butler-shared is not mounted at /srv/butler")
    docs = base(renders)
    args = coordinator_container(docs)["args"]
    args[args.index("--run-dir") + 1] = "/tmp/run"
    assert_refused(m.check_shared_claim(docs), "--run-dir /tmp/run is not on a persistentVolumeClaim")


def test_claim_refuses_data_off_the_claim(renders):
    docs = base(renders)
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cm["data"]["job.toml"] = cm["data"]["job.toml"].replace('"/srv/butler/data/mnist1d"', '"data/mnist1d"')
    assert_refused(m.check_shared_claim(docs), "data.manifest = 'data/mnist1d' is not under")


def test_restarts_refuse_a_restarting_coordinator_and_jobset(renders):
    docs = base(renders)
    pod_spec(docs, "coordinator")["restartPolicy"] = "OnFailure"
    del rjob(docs, "coordinator")["template"]["spec"]["backoffLimit"]
    jobset(docs)["spec"]["failurePolicy"]["maxRestarts"] = 3
    assert_refused(m.check_restarts(docs), "restartPolicy must be Never", "backoffLimit must be 0, found 6",
                   "failurePolicy restarts the JobSet")


def test_restarts_refuse_worker_replacements_the_job_cannot_take(renders):
    docs = base(renders)
    rjob(docs, "workers")["template"]["spec"]["backoffLimit"] = 2
    assert_refused(m.check_restarts(docs), "up to 2 failed worker pods are replaced",
                   "cluster.max_restarts = 0")


def test_references_refuse_the_generator_hash_not_reaching_the_jobset(renders, storage):
    # What Kustomize renders without kustomizeconfig.yaml (broken/no-namereference proves it renders so).
    docs = base(renders)
    pod_spec(docs, "coordinator")["volumes"][0]["configMap"]["name"] = "butler-job"
    assert_refused(m.check_references(docs, storage), "ConfigMap butler-job is not in the render")


def test_references_refuse_a_missing_claim(renders):
    assert_refused(m.check_references(base(renders), []), "claim butler-shared does not exist")


def test_names_refuse_a_long_jobset_name(renders):
    docs = base(renders)
    jobset(docs)["metadata"]["name"] = "butler-mnist1d-supervised-label-smoothing-experiment"
    assert_refused(m.check_names(docs), "is not a DNS-1035 label of at most 63")


def test_gpu_refuses_no_gpus_no_shm_and_cpu(renders):
    docs = m.mutated(renders["overlays/gpu"])
    c = worker_container(docs)
    del c["resources"]["limits"]["nvidia.com/gpu"]
    c["volumeMounts"] = [v for v in c["volumeMounts"] if v["mountPath"] != "/dev/shm"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cm["data"]["job.toml"] = cm["data"]["job.toml"].replace('device = "cuda"', 'device = "auto"')
    assert_refused(m.check_gpu(docs), "limits nvidia.com/gpu", "/dev/shm", "cluster.device")
    assert m.check_gpu(base(renders)) != []


def test_kueue_refuses_an_unsuspended_jobset(renders):
    assert_refused(m.check_kueue(renders["overlays/gpu"]), "queue-name", "suspended")


def test_address_refuses_a_wrong_port_name_and_annotation(renders):
    docs = base(renders)
    args = worker_container(docs)["args"]
    args[args.index("--coordinator") + 1] = "http://$(BUTLER_COORDINATOR_HOST):50052"
    assert_refused(m.check_coordinator_address(docs), "port 50052 does not reach")
    docs = base(renders)
    next(e for e in worker_container(docs)["env"] if e["name"] == "BUTLER_COORDINATOR_HOST")["valueFrom"][
        "fieldRef"]["fieldPath"] = "metadata.annotations['jobset.sigs.k8s.io/leader']"
    assert_refused(m.check_coordinator_address(docs), "would have no such annotation")
    docs = fallback(renders)
    svc = next(d for d in docs if d["kind"] == "Service")
    svc["spec"]["selector"]["app.kubernetes.io/component"] = "worker"
    assert_refused(m.check_coordinator_address(docs), "resolves to ['butler-workers-0', 'butler-workers-1']")


def test_address_refuses_a_probe_on_another_port(renders):
    docs = base(renders)
    coordinator_container(docs)["readinessProbe"]["tcpSocket"]["port"] = 8080
    assert_refused(m.check_coordinator_address(docs), "readiness probe must test the gRPC port 50051")


def test_flags_refuse_an_unknown_flag_and_env(renders):
    docs = base(renders)
    worker_container(docs)["args"] += ["--connect-timeout-s", "5"]
    worker_container(docs)["env"].append({"name": "BUTLER_ADVERTISE_ADDR", "value": "x"})
    assert_refused(m.check_flags(docs, BUTLER), "has no flag --connect-timeout-s", "reads no variable BUTLER_ADVERTISE_ADDR")


def test_job_config_refuses_an_unknown_key_and_a_bad_world(renders):
    docs = base(renders)
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cm["data"]["job.toml"] = cm["data"]["job.toml"].replace("batch_size = 100", "batch_size = 100\nbatchsize = 3")
    assert_refused(m.check_job_config(docs, BUTLER), "batchsize")
    docs = base(renders)
    args = coordinator_container(docs)["args"]
    args[args.index("--world-size") + 1] = "3"
    assert_refused(m.check_job_config(docs, BUTLER), "not divisible by 3")


# --------------------------------------------------------- broken kustomizations: the two Kustomize pitfalls


def test_a_strategic_merge_patch_on_a_jobset_drops_the_coordinator():
    docs = m.render(BROKEN / "strategic-merge", unrestricted=True)
    assert_refused(m.validate_schemas(docs) + m.policy(docs), "coordinator")


def test_without_namereference_pods_mount_a_configmap_that_does_not_exist(storage):
    docs = m.render(BROKEN / "no-namereference", unrestricted=True)
    assert_refused(m.check_references(docs, storage), "ConfigMap butler-job is not in the render")


def test_kubectl_refuses_a_patch_at_the_wrong_index():
    with pytest.raises(RuntimeError, match="testing value"):
        m.render(BROKEN / "wrong-index", unrestricted=True)


def test_hadolint_refuses_a_root_image(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y gcc\nUSER root\n")
    hadolint = str(m.DEPLOY.parent / ".venv-deploy" / "bin" / "hadolint")
    out = subprocess.run([hadolint, str(f)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3002" in out.stdout
