#!/usr/bin/env python3
"""Cross-file checks of deploy/ that no schema expresses.

Run by `cargo xtask deploy-check` (after the schema validators) with the Python of its
tool venv, which has PyYAML:

    python3 deploy/checks/check_manifests.py [REPO_ROOT]
    python3 deploy/checks/check_manifests.py --self-test [REPO_ROOT]   # mutation tests

Prints one line per problem and exits 1 when there is any; exits 0 with a summary line
otherwise. Checks:

- the worker's settings: every environment variable set in the ConfigMap, the
  Deployment and the compose file is one the worker reads (names taken from its CLI
  source, so a misspelt WORKER_CONCURENCY fails here); HEALTH_ADDR listens on 0.0.0.0
  on the port that the probes, the named port and the scrape annotations use;
- shutdown budget: terminationGracePeriodSeconds and compose's stop_grace_period exceed
  SHUTDOWN_TIMEOUT_S (with a margin for the hand-back and exit);
- probes: liveness on /health/live, readiness on /health/ready, on the port named http;
- the Deployment: QUEUE_URL from a Secret, non-root, read-only root filesystem, every
  capability dropped, requests and limits, exec-form `run`, no `replicas` while an
  autoscaler owns it, a pinned image tag; the PostgreSQL migrate Job runs `migrate`
  with the same image and Secret;
- Service, PodDisruptionBudget and autoscalers select or target the Deployment;
- HPA: autoscaling/v2, 1 <= minReplicas <= maxReplicas, queue depth as an External
  metric with an AverageValue target (never a Pods metric), CPU, scale-down
  stabilization; the KEDA ScaledObject: its required fields, a prometheus trigger that
  takes max over workers (not sum), the same bounds and target as the HPA;
- kustomizations: their resources exist, each overlay has exactly one autoscaler, the
  Secret example is in none;
- compose: worker services restart unless-stopped, init false, depend on healthy
  services, health check on /health/ready; Redis and PostgreSQL not published on the
  host (loopback only), Redis with an append-only file;
- alert rules: every metric they use is one docs/observability.md documents, and every
  alert it recommends is present;
- Dockerfile: exec-form ENTRYPOINT, numeric non-root USER, EXPOSE 8080,
  HEALTH_ADDR=0.0.0.0:8080.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ERRORS: list[str] = []
CHECKS = 0

# Seconds the worker needs, after SHUTDOWN_TIMEOUT_S, to cancel what is still running,
# hand it back to the queue and exit, before a SIGKILL may land.
EXIT_MARGIN_S = 5.0


def check(ok: bool, where: str, message: str) -> bool:
    """Records one check; `message` says what is wrong when `ok` is false."""
    global CHECKS
    CHECKS += 1
    if not ok:
        ERRORS.append(f"{where}: {message}")
    return ok


def load_all(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def dig(obj, *keys, default=None):
    for key in keys:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)")


def seconds(value, where: str) -> float | None:
    """A duration as the worker (a bare number is seconds) or compose (1m30s) writes it."""
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        check(False, where, f"cannot read the duration {value!r}")
        return None
    return sum(float(n) * units[u] for n, u in parts)


def worker_env_names(root: Path) -> set[str]:
    """Environment variables the worker reads: `env = "..."` in its CLI definition, the
    URL fallbacks, and OpenTelemetry's standard variables (checked by prefix)."""
    cli = root / "crates/worker-runtime/src/bin/penguiflow-worker/cli.rs"
    names = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', cli.read_text(encoding="utf-8")))
    check(
        {"QUEUE_URL", "WORKER_QUEUE", "SHUTDOWN_TIMEOUT_S", "HEALTH_ADDR"} <= names,
        str(cli),
        f"expected the worker's environment variables in it, found {sorted(names)}",
    )
    return names | {"REDIS_URL", "DATABASE_URL"}


def check_env_names(env: dict, known: set[str], where: str) -> None:
    for name in env:
        check(
            name in known or name.startswith("OTEL_"),
            where,
            f"environment variable {name} is not one the worker reads "
            f"(known: {', '.join(sorted(known))}, OTEL_*)",
        )


def check_health_addr(value, port: int, where: str) -> None:
    check(
        str(value) == f"0.0.0.0:{port}",
        where,
        f"HEALTH_ADDR is {value!r}; it must be 0.0.0.0:{port} so probes and Prometheus "
        "reach it from outside the container",
    )


def selects(selector: dict | None, labels: dict) -> bool:
    match = (selector or {}).get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def check_kubernetes(root: Path, known_env: set[str]) -> dict:
    kdir = root / "deploy/kubernetes"
    objects: dict[tuple[str, str], tuple[dict, Path]] = {}
    for path in sorted(kdir.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_all(path):
            key = (doc.get("kind", "?"), dig(doc, "metadata", "name", default="?"))
            # The same object may appear once per overlay; keep the first.
            objects.setdefault(key, (doc, path))

    def get(kind: str, name: str = "penguiflow-worker") -> tuple[dict, str]:
        doc, path = objects.get((kind, name), ({}, None))
        where = f"{path.relative_to(root) if path else kdir.relative_to(root)} ({kind} {name})"
        check(bool(doc), where, f"no {kind} named {name}")
        return doc, where

    deploy, dw = get("Deployment")
    config, cw = get("ConfigMap")
    secret, sw = get("Secret", "penguiflow-worker-queue")
    service, svw = get("Service")
    pdb, pw = get("PodDisruptionBudget")
    hpa, hw = get("HorizontalPodAutoscaler")
    scaled, kw = get("ScaledObject")

    data = config.get("data") or {}
    check_env_names(data, known_env, cw)
    shutdown = seconds(data.get("SHUTDOWN_TIMEOUT_S", "30"), cw)
    health = str(data.get("HEALTH_ADDR", ""))
    port = int(health.rsplit(":", 1)[1]) if ":" in health and health.rsplit(":", 1)[1].isdigit() else 8080
    check_health_addr(data.get("HEALTH_ADDR"), 8080, cw)

    spec = dig(deploy, "spec", default={})
    pod = dig(spec, "template", "spec", default={})
    pod_labels = dig(spec, "template", "metadata", "labels", default={})
    annotations = dig(spec, "template", "metadata", "annotations", default={})
    check(selects(spec.get("selector"), pod_labels), dw, "spec.selector does not match the pod template's labels")
    check(
        "replicas" not in spec,
        dw,
        "spec.replicas is set although an autoscaler (hpa/ or keda/) owns the replica count; "
        "every apply would reset it",
    )

    grace = pod.get("terminationGracePeriodSeconds")
    if check(isinstance(grace, int), dw, "terminationGracePeriodSeconds must be set (the default 30 s equals the worker's shutdown timeout)") and shutdown is not None:
        check(
            grace >= shutdown + EXIT_MARGIN_S,
            dw,
            f"terminationGracePeriodSeconds {grace} must exceed SHUTDOWN_TIMEOUT_S "
            f"({shutdown:g} s) by at least {EXIT_MARGIN_S:g} s, or SIGKILL lands on draining jobs",
        )
    psc = pod.get("securityContext") or {}
    check(psc.get("runAsNonRoot") is True, dw, "pod securityContext.runAsNonRoot must be true")
    check(isinstance(psc.get("runAsUser"), int) and psc["runAsUser"] > 0, dw, "pod securityContext.runAsUser must be a non-zero UID")

    containers = pod.get("containers") or []
    check(len(containers) == 1, dw, f"expected one container, found {len(containers)}")
    c = containers[0] if containers else {}
    image = str(c.get("image", ""))
    check(":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), dw, f"image {image!r} must carry a pinned tag (not latest)")
    check(c.get("args") == ["run"] and "command" not in c, dw, "the container must run the image's ENTRYPOINT with args [run]")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
    check(ports.get("http") == port, dw, f"the container needs a port named http on {port} (HEALTH_ADDR), found {ports}")
    check(
        str(annotations.get("prometheus.io/scrape")) == "true" and str(annotations.get("prometheus.io/port")) == str(port) and annotations.get("prometheus.io/path") == "/metrics",
        dw,
        f"pod annotations must ask Prometheus to scrape /metrics on {port}",
    )
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        got = dig(c, probe, "httpGet", default={})
        check(got.get("path") == path, dw, f"{probe} must GET {path}, found {got.get('path')!r}")
        check(got.get("port") in ("http", port), dw, f"{probe} must use the port named http, found {got.get('port')!r}")
    if "startupProbe" in c:
        check(dig(c, "startupProbe", "httpGet", "path") == "/health/live", dw, "startupProbe must GET /health/live (the backend may be down at start)")

    env = {e.get("name"): e for e in c.get("env") or []}
    check_env_names(env, known_env, dw)
    ref = dig(env.get("QUEUE_URL"), "valueFrom", "secretKeyRef", default={})
    check(
        ref.get("name") == dig(secret, "metadata", "name") and ref.get("key") in (dig(secret, "stringData", default={}) or {}),
        dw,
        "QUEUE_URL must come from the Secret penguiflow-worker-queue (secretKeyRef) with a key the example defines",
    )
    for name in ("REDIS_URL", "DATABASE_URL", "QUEUE_URL"):
        check("value" not in (env.get(name) or {}), dw, f"{name} must not be a literal value (it may carry a password)")
    froms = [dig(e, "configMapRef", "name") for e in c.get("envFrom") or []]
    check(dig(config, "metadata", "name") in froms, dw, "envFrom must reference the ConfigMap penguiflow-worker")
    if "HEALTH_ADDR" in env:
        check_health_addr(env["HEALTH_ADDR"].get("value"), port, dw)
    if "SHUTDOWN_TIMEOUT_S" in env:
        check(False, dw, "set SHUTDOWN_TIMEOUT_S in the ConfigMap only, so the grace-period check sees it")

    res = c.get("resources") or {}
    for kind in ("requests", "limits"):
        check({"cpu", "memory"} <= set(res.get(kind) or {}), dw, f"resources.{kind} must set cpu and memory")
    csc = c.get("securityContext") or {}
    check(csc.get("readOnlyRootFilesystem") is True, dw, "readOnlyRootFilesystem must be true")
    check(csc.get("allowPrivilegeEscalation") is False, dw, "allowPrivilegeEscalation must be false")
    check(dig(csc, "capabilities", "drop") == ["ALL"], dw, "capabilities.drop must be [ALL]")

    check(secret.get("stringData") is not None and "data" not in secret, sw, "the Secret example must use stringData")
    check(
        "placeholder" in str(dig(secret, "metadata", "annotations", default={})).lower(),
        sw,
        "the Secret example must be marked as a placeholder",
    )

    svc = service.get("spec") or {}
    check(svc.get("type", "ClusterIP") == "ClusterIP", svw, "the metrics Service must be ClusterIP")
    check(
        bool(svc.get("selector")) and all(pod_labels.get(k) == v for k, v in (svc.get("selector") or {}).items()),
        svw,
        "the Service selector must match the pod labels",
    )
    check(any(p.get("name") == "http" and p.get("targetPort") in ("http", port) for p in svc.get("ports") or []), svw, "the Service needs a port named http targeting the pod's http port")

    check(selects(dig(pdb, "spec", "selector"), pod_labels), pw, "the PodDisruptionBudget selector must match the pod labels")

    # --- the PostgreSQL migrate Job: same image and Secret as the workers
    job, jw = get("Job", "penguiflow-migrate")
    jc = dig(job, "spec", "template", "spec", "containers", 0, default={})
    check(jc.get("args") == ["migrate"], jw, "the migrate Job must run `migrate`")
    check(jc.get("image") == image, jw, f"the migrate Job's image {jc.get('image')!r} must be the workers' {image!r}")
    jenv = {e.get("name"): e for e in jc.get("env") or []}
    check_env_names(jenv, known_env, jw)
    check(
        dig(jenv.get("QUEUE_URL"), "valueFrom", "secretKeyRef", default={}) == ref,
        jw,
        "the migrate Job must read QUEUE_URL from the workers' Secret",
    )
    check(dig(job, "spec", "template", "spec", "restartPolicy") in ("Never", "OnFailure"), jw, "a Job needs restartPolicy Never or OnFailure")

    # --- HPA
    target_ok = lambda ref: ref.get("kind") == "Deployment" and ref.get("name") == dig(deploy, "metadata", "name")  # noqa: E731
    hs = hpa.get("spec") or {}
    check(hpa.get("apiVersion") == "autoscaling/v2", hw, "use autoscaling/v2")
    check(target_ok(hs.get("scaleTargetRef") or {}), hw, "scaleTargetRef must be the Deployment penguiflow-worker")
    lo, hi = hs.get("minReplicas"), hs.get("maxReplicas")
    check(isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi, hw, f"need 1 <= minReplicas <= maxReplicas, found {lo}, {hi} (the workers export the queue metric: never scale to 0)")
    metrics = hs.get("metrics") or []
    external = [m for m in metrics if m.get("type") == "External" and dig(m, "external", "metric", "name") == "penguiflow_queue_depth"]
    hpa_target = None
    if check(len(external) == 1, hw, "needs one External metric penguiflow_queue_depth"):
        t = dig(external[0], "external", "target", default={})
        check(t.get("type") == "AverageValue", hw, "the queue-depth target must be AverageValue (depth per pod)")
        hpa_target = str(t.get("averageValue"))
        sel = dig(external[0], "external", "metric", "selector", default={})
        check(bool(dig(sel, "matchLabels", "queue")), hw, "the queue-depth selector must name the queue")
    check(
        not any(m.get("type") == "Pods" and "queue" in str(dig(m, "pods", "metric", "name", default="")) for m in metrics),
        hw,
        "queue depth must not be a Pods metric: every pod reports the global depth (D22)",
    )
    check(any(m.get("type") == "Resource" and dig(m, "resource", "name") == "cpu" for m in metrics), hw, "needs a CPU Resource metric")
    window = dig(hs, "behavior", "scaleDown", "stabilizationWindowSeconds")
    check(isinstance(window, int) and window >= 60, hw, "behavior.scaleDown.stabilizationWindowSeconds must be at least 60")

    # --- KEDA
    ks = scaled.get("spec") or {}
    check(scaled.get("apiVersion") == "keda.sh/v1alpha1", kw, "apiVersion must be keda.sh/v1alpha1")
    check(target_ok({"kind": "Deployment", **(ks.get("scaleTargetRef") or {})}), kw, "scaleTargetRef must be the Deployment penguiflow-worker")
    klo, khi = ks.get("minReplicaCount"), ks.get("maxReplicaCount")
    check(isinstance(klo, int) and isinstance(khi, int) and 1 <= klo <= khi, kw, f"need 1 <= minReplicaCount <= maxReplicaCount, found {klo}, {khi}")
    check((klo, khi) == (lo, hi), kw, f"replica bounds ({klo}, {khi}) differ from the HPA's ({lo}, {hi})")
    prom = [t for t in ks.get("triggers") or [] if t.get("type") == "prometheus"]
    if check(len(prom) == 1, kw, "needs one prometheus trigger"):
        md = prom[0].get("metadata") or {}
        for key in ("serverAddress", "query", "threshold"):
            check(bool(md.get(key)), kw, f"the prometheus trigger needs metadata.{key}")
        query = str(md.get("query", ""))
        check("penguiflow_queue_depth" in query, kw, "the query must read penguiflow_queue_depth")
        check(
            re.search(r"max\s+by\s*\(\s*state\s*\)|max\s*\(", query) is not None,
            kw,
            "the query must take max over workers (each reports the same backend figure); a plain sum counts it once per pod",
        )
        check(prom[0].get("metricType", "AverageValue") == "AverageValue", kw, "the queue-depth trigger must use AverageValue")
        check(hpa_target is None or str(md.get("threshold")) == hpa_target, kw, f"threshold {md.get('threshold')!r} differs from the HPA's averageValue {hpa_target!r}")
        check(str(dig(data, "WORKER_QUEUE", default="")) and f'queue="{data.get("WORKER_QUEUE")}"' in query.replace(" ", ""), kw, "the query must select the ConfigMap's WORKER_QUEUE")
    if external and data.get("WORKER_QUEUE"):
        check(dig(external[0], "external", "metric", "selector", "matchLabels", "queue") == data["WORKER_QUEUE"], hw, "the queue-depth selector must name the ConfigMap's WORKER_QUEUE")

    # --- kustomizations
    autoscalers = {"hpa.yaml", "scaledobject.yaml"}
    for kpath in sorted(kdir.rglob("kustomization.yaml")):
        where = str(kpath.relative_to(root))
        k = load_all(kpath)[0]
        resources = k.get("resources") or []
        for r in resources:
            check((kpath.parent / r).exists(), where, f"resource {r} does not exist")
            check("secret" not in r, where, f"{r}: the Secret example must not be in a kustomization")
        mine = {Path(r).name for r in resources} & autoscalers
        if kpath.parent.name in ("hpa", "keda"):
            check(len(mine) == 1 and "../base" in resources, where, "an overlay must hold ../base and exactly one autoscaler")
        else:
            check(not mine, where, "the base must hold no autoscaler")

    return {"shutdown": shutdown, "port": port}


def check_compose(root: Path, known_env: set[str]) -> None:
    path = root / "deploy/docker-compose.yml"
    where = str(path.relative_to(root))
    compose = load_all(path)[0]
    services = compose.get("services") or {}
    workers = {n: s for n, s in services.items() if dig(s, "command", 0) == "run" or "worker" in n}
    check(len(workers) >= 1, where, "no worker service")
    for name, s in workers.items():
        w = f"{where} (service {name})"
        env = s.get("environment") or {}
        check(isinstance(env, dict), w, "environment must be a mapping")
        check_env_names(env, known_env, w)
        check(bool(env.get("QUEUE_URL") or env.get("REDIS_URL") or env.get("DATABASE_URL")), w, "needs QUEUE_URL")
        check_health_addr(env.get("HEALTH_ADDR"), 8080, w)
        shutdown = seconds(env.get("SHUTDOWN_TIMEOUT_S", "30"), w)
        grace = seconds(s.get("stop_grace_period", "10s"), w)
        if shutdown is not None and grace is not None:
            check(
                grace >= shutdown + EXIT_MARGIN_S,
                w,
                f"stop_grace_period ({grace:g} s) must exceed SHUTDOWN_TIMEOUT_S ({shutdown:g} s) by at least {EXIT_MARGIN_S:g} s",
            )
        check(s.get("restart") == "unless-stopped", w, "restart must be unless-stopped")
        check(s.get("init") is False, w, "init must be false: the worker handles signals itself")
        check("restart_policy" not in (s.get("deploy") or {}), w, "deploy.restart_policy applies to Swarm only; use restart")
        check(isinstance(dig(s, "deploy", "replicas"), int) and s["deploy"]["replicas"] >= 2, w, "needs deploy.replicas >= 2")
        test = " ".join(map(str, dig(s, "healthcheck", "test", default=[])))
        check("/health/ready" in test, w, "the health check must probe /health/ready")
        deps = s.get("depends_on") or {}
        check(isinstance(deps, dict) and bool(deps), w, "depends_on must use the long form with conditions")
        for dep, cond in (deps.items() if isinstance(deps, dict) else []):
            want = "service_completed_successfully" if dep == "migrate" else "service_healthy"
            check(dig(cond, "condition") == want, w, f"depends_on {dep} must wait for {want}")
            check("healthcheck" in (services.get(dep) or {}) or dep == "migrate", w, f"{dep} has no healthcheck to wait for")
        for port in s.get("ports") or []:
            check(str(port).startswith("127.0.0.1:"), w, f"port {port} must be bound to 127.0.0.1")
    for name in ("redis", "postgres"):
        s = services.get(name)
        if not check(s is not None, where, f"no {name} service"):
            continue
        for port in s.get("ports") or []:
            check(str(port).startswith("127.0.0.1:"), f"{where} (service {name})", f"port {port} must not be published beyond loopback")
        check("healthcheck" in s, f"{where} (service {name})", "needs a healthcheck")
    redis_cmd = " ".join(map(str, dig(services, "redis", "command", default=[])))
    check("--appendonly yes" in redis_cmd, f"{where} (service redis)", "Redis must run with --appendonly yes")
    migrate = services.get("migrate") or {}
    check(migrate.get("command") == ["migrate"] and migrate.get("restart") == "no", f"{where} (service migrate)", "migrate must be a one-shot `migrate` with restart \"no\"")


def check_alerts(root: Path) -> None:
    doc = root / "docs/observability.md"
    text = doc.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(penguiflow_[a-z_]+)` \|", text, re.M))
    check(len(documented) >= 10, str(doc), f"cannot find the metrics table (found {sorted(documented)})")
    recommended = set(re.findall(r"- alert: (\w+)", text))
    path = root / "deploy/prometheus/alerts.yml"
    where = str(path.relative_to(root))
    rules = [r for g in load_all(path)[0].get("groups") or [] for r in g.get("rules") or []]
    names = {r.get("alert") for r in rules}
    for alert in sorted(recommended - names):
        check(False, where, f"docs/observability.md recommends the alert {alert}; it is missing")
    for r in rules:
        expr = str(r.get("expr", ""))
        for metric in re.findall(r"\b(penguiflow_[a-z_]+)", expr):
            check(metric in documented, where, f"alert {r.get('alert')}: metric {metric} is not in docs/observability.md's table")
        check(str(dig(r, "labels", "severity")) in ("warning", "critical"), where, f"alert {r.get('alert')}: severity must be warning or critical")
        check(bool(dig(r, "annotations", "summary")), where, f"alert {r.get('alert')}: needs a summary annotation")
        if re.search(r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*(?:\w+\s*\(\s*)?penguiflow_(?:queue_|dead_letters_dropped)", expr):
            check(False, where, f"alert {r.get('alert')}: backend figures (penguiflow_queue_*, dead_letters_dropped) are reported by every worker: max, not sum")


def check_dockerfile(root: Path, port: int) -> None:
    path = root / "deploy/Dockerfile"
    where = str(path.relative_to(root))
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip() and not l.lstrip().startswith("#")]
    final = []
    for line in lines:
        if line.upper().startswith("FROM "):
            final = []
        final.append(line)
    check(bool(final) and "distroless" in final[0], where, "the last (default) stage must be the distroless runtime")
    entry = [l for l in final if l.upper().startswith("ENTRYPOINT")]
    check(entry == ['ENTRYPOINT ["/usr/local/bin/penguiflow-worker"]'], where, f"ENTRYPOINT must be the exec form of the binary, found {entry}")
    check('CMD ["run"]' in final, where, 'CMD must be ["run"]')
    users = [l.split(None, 1)[1] for l in final if l.upper().startswith("USER ")]
    check(bool(users) and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]) is not None, where, f"USER must be a numeric non-root UID, found {users}")
    check(f"EXPOSE {port}" in final, where, f"EXPOSE {port} missing")
    check(any(f"HEALTH_ADDR=0.0.0.0:{port}" in l for l in final), where, f"ENV HEALTH_ADDR=0.0.0.0:{port} missing")
    ignore = root / ".dockerignore"
    if check(ignore.exists(), str(ignore.relative_to(root)), "missing"):
        entries = {l.strip().rstrip("/") for l in ignore.read_text(encoding="utf-8").splitlines()}
        check({"target", ".git"} <= entries, ".dockerignore", "must exclude target/ and .git")


# Self-test: each mutation breaks one thing in a copy of the files; the checks must then
# fail with the expected message. Proves the checks are not vacuous, and fails loudly
# when a manifest changes under a mutation (its `old` text is gone): update both then.
MUTATIONS = [
    ("deploy/kubernetes/base/deployment.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 30", "must exceed SHUTDOWN_TIMEOUT_S"),
    ("deploy/kubernetes/base/configmap.yaml", 'SHUTDOWN_TIMEOUT_S: "30"', 'SHUTDOWN_TIMEOUT_S: "60"', "must exceed SHUTDOWN_TIMEOUT_S"),
    ("deploy/kubernetes/base/deployment.yaml", "path: /health/ready", "path: /health", "readinessProbe must GET /health/ready"),
    ("deploy/kubernetes/base/deployment.yaml", "path: /health/live\n              port: http\n            periodSeconds: 10", "path: /health\n              port: http\n            periodSeconds: 10", "livenessProbe must GET /health/live"),
    ("deploy/kubernetes/base/configmap.yaml", "WORKER_CONCURRENCY:", "WORKER_CONCURENCY:", "WORKER_CONCURENCY is not one the worker reads"),
    ("deploy/kubernetes/base/configmap.yaml", "HEALTH_ADDR: 0.0.0.0:8080", "HEALTH_ADDR: 127.0.0.1:8080", "HEALTH_ADDR is"),
    ("deploy/kubernetes/base/deployment.yaml", "spec:\n  revisionHistoryLimit", "spec:\n  replicas: 10\n  revisionHistoryLimit", "spec.replicas is set"),
    ("deploy/kubernetes/base/deployment.yaml", "              valueFrom:\n                secretKeyRef:\n                  name: penguiflow-worker-queue\n                  key: url", "              value: redis://redis:6379/0", "QUEUE_URL must come from the Secret"),
    ("deploy/kubernetes/base/deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem must be true"),
    ("deploy/kubernetes/postgres/migrate-job.yaml", 'args: ["migrate"]', 'args: ["run"]', "must run `migrate`"),
    ("deploy/kubernetes/hpa/hpa.yaml", "    - type: External\n      external:", "    - type: Pods\n      pods:", "must not be a Pods metric"),
    ("deploy/kubernetes/hpa/hpa.yaml", "minReplicas: 2", "minReplicas: 0", "minReplicas <= maxReplicas"),
    ("deploy/kubernetes/hpa/hpa.yaml", "stabilizationWindowSeconds: 300", "stabilizationWindowSeconds: 0", "stabilizationWindowSeconds must be at least 60"),
    ("deploy/kubernetes/keda/scaledobject.yaml", "query: sum(max by (state) (penguiflow_queue_depth", "query: sum((penguiflow_queue_depth", "must take max over workers"),
    ("deploy/kubernetes/keda/scaledobject.yaml", 'threshold: "8"', 'threshold: "80"', "differs from the HPA"),
    ("deploy/kubernetes/keda/scaledobject.yaml", "maxReplicaCount: 20", "maxReplicaCount: 30", "differ from the HPA"),
    ("deploy/kubernetes/keda/kustomization.yaml", "  - scaledobject.yaml", "  - scaledobject.yaml\n  - ../hpa/hpa.yaml", "exactly one autoscaler"),
    ("deploy/docker-compose.yml", "stop_grace_period: 45s", "stop_grace_period: 30s", "stop_grace_period (30 s) must exceed"),
    ("deploy/docker-compose.yml", "init: false\n  stop_signal", "init: true\n  stop_signal", "init must be false"),
    ("deploy/docker-compose.yml", "    volumes:\n      - redis-data:/data", '    ports: ["6379:6379"]\n    volumes:\n      - redis-data:/data', "must not be published beyond loopback"),
    ("deploy/docker-compose.yml", "      QUEUE_URL: redis://redis:6379/0\n", "      QUEUE_URL: redis://redis:6379/0\n      WORKER_CONCURENCY: \"5\"\n", "WORKER_CONCURENCY is not one the worker reads"),
    ("deploy/docker-compose.yml", "      redis:\n        condition: service_healthy", "      redis:\n        condition: service_started", "must wait for service_healthy"),
    ("deploy/prometheus/alerts.yml", "penguiflow_jobs_rescued_total", "penguiflow_jobs_rescue_total", "is not in docs/observability.md"),
    ("deploy/prometheus/alerts.yml", "alert: PenguiflowBackendDown", "alert: PenguiflowBackendIsDown", "recommends the alert PenguiflowBackendDown"),
    ("deploy/prometheus/alerts.yml", "max by (queue) (penguiflow_queue_oldest_ready_age_seconds)", "sum by (queue) (penguiflow_queue_oldest_ready_age_seconds)", "max, not sum"),
    ("deploy/Dockerfile", 'EXPOSE 8080\nENTRYPOINT ["/usr/local/bin/penguiflow-worker"]', "EXPOSE 8080\nENTRYPOINT /usr/local/bin/penguiflow-worker", "ENTRYPOINT must be the exec form"),
    ("deploy/Dockerfile", "USER 65532:65532\nEXPOSE 8080\nENTRYPOINT", "USER root\nEXPOSE 8080\nENTRYPOINT", "USER must be a numeric"),
]

SELF_TEST_FILES = [
    "deploy",
    "docs/observability.md",
    "crates/worker-runtime/src/bin/penguiflow-worker/cli.rs",
    ".dockerignore",
]


def run_all(root: Path) -> list[str]:
    """Runs every check on the tree at `root`; returns the problems found."""
    global CHECKS
    ERRORS.clear()
    CHECKS = 0
    known_env = worker_env_names(root)
    facts = check_kubernetes(root, known_env)
    check_compose(root, known_env)
    check_alerts(root)
    check_dockerfile(root, facts["port"])
    return list(ERRORS)


def self_test(root: Path) -> int:
    import shutil
    import tempfile

    failures = []
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as tmp:
        copy = Path(tmp)
        for rel in SELF_TEST_FILES:
            src, dst = root / rel, copy / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        baseline = run_all(copy)
        if baseline:
            failures.append(f"the unmodified copy fails: {baseline}")
        for rel, old, new, expected in MUTATIONS:
            path = copy / rel
            original = path.read_text(encoding="utf-8")
            if original.count(old) != 1:
                failures.append(f"{rel}: mutation text {old!r} found {original.count(old)} times, expected once")
                continue
            path.write_text(original.replace(old, new), encoding="utf-8")
            try:
                errors = run_all(copy)
            except Exception as error:  # a mutation may break the file's shape: fine if loud
                errors = [f"{type(error).__name__}: {error}"]
            finally:
                path.write_text(original, encoding="utf-8")
            if not any(expected in e for e in errors):
                failures.append(f"{rel}: {old!r} -> {new!r} should fail with {expected!r}, got {errors or 'no error'}")
    for failure in failures:
        print(f"self-test error: {failure}")
    if failures:
        print(f"self-test: {len(failures)} of {len(MUTATIONS)} mutations not caught")
        return 1
    print(f"self-test: all {len(MUTATIONS)} broken copies were rejected")
    return 0


def main() -> int:
    args = sys.argv[1:]
    if args and args[0] == "--self-test":
        return self_test(Path(args[1] if len(args) > 1 else ".").resolve())
    root = Path(args[0] if args else ".").resolve()
    errors = run_all(root)
    for error in errors:
        print(f"error: {error}")
    if errors:
        print(f"structural checks FAILED: {len(errors)} problems in {CHECKS} checks")
        return 1
    print(f"structural checks ok ({CHECKS} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
