# Nexus operations. `just` lists the recipes; DEPLOYMENT.md walks through a deployment.
#
# One master host (bento.env + master-compose.yml) and any number of worker hosts
# (worker.env + worker-compose.yml); `just dev` runs the whole cluster on one machine
# without Docker. Every recipe says what it is about to do before doing it.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env("PYTHON", "python3")
# Compose v2 plugin by default; COMPOSE=docker-compose uses the standalone binary.
compose := env("COMPOSE", "docker compose")
master_compose := compose + " --env-file bento.env -f master-compose.yml"
worker_compose := compose + " --env-file worker.env -f worker-compose.yml"
# Benchmarks in bench/, run in this order when present.
benchmarks := "dispatch heartbeat inference proof replicas"

# Show the recipes (the default)
help:
    @just --list --unsorted
    @echo
    @echo "Deploy: just config, then just master-up on the master and just worker-up on each worker (DEPLOYMENT.md)."
    @echo "Local:  just dev starts a whole cluster without Docker; just test runs the tests."

# Write bento.env and worker.env: strong secrets and a join token (asks; `just config --help` for flags)
config *args:
    @echo "==> nexus config {{ args }}: filling bento.env / worker.env from their templates"
    {{ python }} -m nexus config {{ args }}

# Start the master: Redis, PostgreSQL, MinIO, the API (migrations first), reconciler, Flower [+ monitoring]
master-up:
    @echo "==> checking bento.env: placeholder or default secrets never reach production"
    {{ python }} -m nexus config --check bento.env
    @echo "==> building the image and starting the master services; waiting until each is healthy"
    {{ master_compose }} up -d --build --wait
    @echo "==> master is up. Next: copy worker.env to each worker host, run just config --role worker and just worker-up there; check with just status"

# Start this worker: the agent (GPU or CPU profile) and, with the replicas profile, local read replicas
worker-up:
    @echo "==> checking worker.env: the master's secrets and this node's name must be set"
    {{ python }} -m nexus config --check worker.env
    @if grep -Eq '^COMPOSE_PROFILES=.*gpu' worker.env && ! docker info 2>/dev/null | grep -qi nvidia; then \
        echo "warning: the gpu profile is set but Docker reports no nvidia runtime: install the NVIDIA Container Toolkit (DEPLOYMENT.md)"; fi
    @echo "==> building the worker image and starting the services of COMPOSE_PROFILES in worker.env"
    {{ worker_compose }} up -d --build
    @echo "==> worker is up; it registers with the master within seconds (just status on the master lists it)"

# Containers on this host, then the cluster as the API sees it (health, jobs, queues, nodes)
status:
    #!/usr/bin/env bash
    set -euo pipefail
    echo "==> Nexus containers on this host"
    found=0
    for project in nexus-master nexus-worker; do
        if {{ compose }} -p "$project" ps --format '{{{{.Service}}}}' 2>/dev/null | grep -q .; then
            {{ compose }} -p "$project" ps --format 'table {{{{.Service}}}}\t{{{{.Status}}}}\t{{{{.Ports}}}}'
            found=1
        fi
    done
    [ "$found" = 1 ] || echo "(none: no Docker here, or nothing started; just dev runs a local cluster)"
    echo "==> the cluster as the API reports it"
    source <(just _api-env)
    {{ python }} deploy/cluster_summary.py
    if [ -n "${NEXUS_TOKEN:-}" ] || [ -f .nexus/cluster.json ]; then
        echo "==> nodes (nexus status)"
        {{ python }} -m nexus status
    fi

# Flower and Grafana URLs, then a live summary of queues and nodes (Ctrl-C to stop)
monitor:
    #!/usr/bin/env bash
    set -euo pipefail
    ip=$(sed -n 's/^MASTER_HOST_IP=//p' bento.env 2>/dev/null | tail -n1)
    if [ -f .nexus/cluster.json ] && [ -z "${NEXUS_URL:-}" ]; then
        echo "==> local cluster: Flower $(sed -n 's/.*"flower_url": "\(.*\)".*/\1/p' .nexus/cluster.json) (password in .nexus/cluster.json)"
    else
        echo "==> Flower   http://${ip}:5555  (user/password: NEXUS_FLOWER_USER / NEXUS_FLOWER_PASSWORD in bento.env)"
        echo "==> Grafana  http://${ip}:3000  (GRAFANA_ADMIN_USER / GRAFANA_ADMIN_PASSWORD; needs COMPOSE_PROFILES=monitoring)"
        echo "==> Prometheus http://127.0.0.1:9090 on the master itself"
    fi
    source <(just _api-env)
    {{ python }} deploy/cluster_summary.py --watch 2

# Follow the logs of this host's Nexus services, or of one service (e.g. just logs api)
logs service="":
    #!/usr/bin/env bash
    set -euo pipefail
    for project in nexus-master nexus-worker; do
        if {{ compose }} -p "$project" ps -q 2>/dev/null | grep -q .; then
            echo "==> following logs of $project {{ service }} (Ctrl-C to stop)"
            exec {{ compose }} -p "$project" logs -f --tail 200 {{ service }}
        fi
    done
    if [ -d .nexus/logs ]; then
        echo "==> following the local cluster's logs in .nexus/logs/{{ if service == "" { "*" } else { service } }}.log"
        exec tail -n 200 -F .nexus/logs/{{ if service == "" { "*" } else { service } }}.log
    fi
    echo "no Nexus services run on this host" >&2; exit 1

# Stop this host's services and DELETE their data (volumes, .nexus/); asks first, or pass --yes
clean *flags:
    #!/usr/bin/env bash
    set -euo pipefail
    projects=()
    for project in nexus-master nexus-worker; do
        if {{ compose }} -p "$project" ps -a -q 2>/dev/null | grep -q . || \
           docker volume ls -q --filter "label=com.docker.compose.project=$project" 2>/dev/null | grep -q .; then
            projects+=("$project")
        fi
    done
    echo "==> this deletes, on this host only:"
    for project in "${projects[@]}"; do echo "    the containers and volumes of $project (databases, objects, models)"; done
    [ -d .nexus ] && echo "    .nexus/ (the local cluster's servers and data)"
    if [ ${#projects[@]} -eq 0 ] && [ ! -d .nexus ]; then echo "    nothing: no Nexus data here"; exit 0; fi
    if [[ " {{ flags }} " != *" --yes "* ]]; then
        if [ ! -t 0 ]; then echo "refusing to delete without a terminal to ask on; pass --yes" >&2; exit 1; fi
        read -r -p "Type 'delete' to confirm: " answer
        [ "$answer" = delete ] || { echo "nothing deleted"; exit 1; }
    fi
    for project in "${projects[@]}"; do
        echo "==> {{ compose }} -p $project down --volumes"
        {{ compose }} -p "$project" down --volumes --remove-orphans
    done
    if [ -d .nexus ]; then echo "==> removing .nexus/"; rm -rf .nexus; fi
    echo "==> clean"

# A whole local cluster with no Docker (real Redis, PostgreSQL, S3, API, Flower, workers); e.g. just dev -n 3
dev *args:
    @echo "==> nexus dev {{ args }}: starting a local cluster under .nexus/ (Ctrl-C stops everything)"
    {{ python }} -m nexus dev {{ args }}

# Run the tests, as README.md says (extra pytest arguments pass through, e.g. just test tests/unit)
test *args:
    @echo "==> python -m pytest -q {{ args }}"
    {{ python }} -m pytest -q {{ args }}

# Run the benchmarks in bench/ that exist (dispatch, heartbeat, inference, proof, replicas)
bench *args:
    #!/usr/bin/env bash
    set -euo pipefail
    ran=0
    for name in {{ benchmarks }}; do
        if [ -f "bench/$name.py" ]; then
            echo "==> {{ python }} bench/$name.py {{ args }}"
            {{ python }} "bench/$name.py" {{ args }}
            ran=1
        fi
    done
    [ "$ran" = 1 ] || { echo "no benchmarks found in bench/" >&2; exit 1; }

# Print NEXUS_URL / NEXUS_TOKEN exports for the summary: the master's bento.env (URL and admin
# token) when it holds real secrets, else a configured worker.env (URL only: health, no metrics)
[private]
_api-env:
    #!/usr/bin/env bash
    set -euo pipefail
    [ -z "${NEXUS_URL:-}" ] || exit 0
    for file in bento.env worker.env; do
        if [ -f "$file" ] && {{ python }} -m nexus config --check "$file" >/dev/null 2>&1; then
            ip=$(sed -n 's/^MASTER_HOST_IP=//p' "$file" | tail -n1)
            token=$(sed -n 's/^NEXUS_ADMIN_TOKEN=//p' "$file" | tail -n1)
            printf 'export NEXUS_URL=%q\n' "http://$ip:8000"
            [ -z "$token" ] || printf 'export NEXUS_TOKEN=%q\n' "$token"
            exit 0
        fi
    done
