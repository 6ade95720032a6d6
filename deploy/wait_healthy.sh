#!/usr/bin/env bash
# deploy/wait_healthy.sh SERVICE SECONDS: wait until the compose service's health check passes (exit 0), or fail
# at once, with the service's last log lines, when Docker declares it unhealthy, when it exits or restarts (a
# crash loop: `restart: unless-stopped` would start it again and again), or after SECONDS. Used by deploy.sh.
set -euo pipefail
service=$1
limit=$2
poll=${POLL_SECONDS:-5}

fail() {
  docker compose logs --no-color --tail 80 "$service" >&2 || true
  printf 'deploy: the %s service %s (its last log lines are above; `make logs` follows them)\n' "$service" "$*" >&2
  exit 1
}

container=$(docker compose ps -q "$service")
[ -n "$container" ] || fail "has no container (docker compose ps -q $service printed nothing)"
# `docker compose up -d` may have kept a container that restarted before: count from here.
restarts_before=$(docker inspect -f '{{.RestartCount}}' "$container")
format='{{.RestartCount}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}'
deadline=$((SECONDS + limit))
while :; do
  info=$(docker inspect -f "$format" "$container") || fail "cannot be inspected (docker inspect $container failed)"
  read -r restarts state health <<<"$info"
  if [ "$restarts" -gt "$restarts_before" ]; then
    fail "exited and was restarted $((restarts - restarts_before)) time(s) while starting: it crash-loops"
  fi
  case $state in exited | dead | restarting) fail "is $state (it crashed while starting)" ;; esac
  case $health in
    healthy) printf 'the %s service is healthy\n' "$service"; exit 0 ;;
    unhealthy) fail "is unhealthy: its health check failed after the start period" ;;
    none) fail "has no health check (docker-compose.yml defines one)" ;;
  esac
  [ "$SECONDS" -lt "$deadline" ] || fail "is still $health after ${limit}s"
  sleep "$poll"
done
