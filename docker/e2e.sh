#!/usr/bin/env bash
# The compose deployment end to end on a real Docker engine (minutes; not run by CI):
# build the image from a local base with this machine's pip settings, `up`, train, SIGKILL the
# selector and one trainer rank, check that training resumes, `down` and `up` again (resume from
# the volumes), check the trainers' ledgers against the selector's journal, `down -v`.
#
#   docker/e2e.sh BASE_IMAGE        # e.g. colm-base:bookworm from docker/debian-base.sh
#
# Run from anywhere, as a user who may use the Docker engine. Environment (all optional):
#   DOCKER           docker CLI whose `build` runs BuildKit        (docker)
#   COMPOSE          compose command                               (`docker compose`, else docker-compose)
#   PIP_CONTEXT_DIR  pip settings folder from docker/pip_context.py (made from this machine's pip)
#   PYTHON           the project's Python, for the checks          (.venv/bin/python)
#   PROJECT          compose project name: its own containers, network and volumes   (colm-e2e)
#   OUT              logs and results                               (/var/tmp/colm-e2e)
#   STEP_TIMEOUT     seconds to wait for each milestone             (1800)
# The job is docker/compose.yaml with docker/compose.e2e.yaml over it (40 steps, b=4 of L=8).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${1:-${BASE_IMAGE:-}}
[[ -n $BASE_IMAGE ]] || { echo "usage: $0 BASE_IMAGE (a local image, e.g. from docker/debian-base.sh)" >&2; exit 2; }
DOCKER=${DOCKER:-docker}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PROJECT=${PROJECT:-colm-e2e}
OUT=${OUT:-/var/tmp/colm-e2e}
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
IMAGE=colm-stream:latest          # the image compose.yaml names
PIP_IMAGE=colm-pip-context:local  # mounted while pip runs in the build, never part of the image
STEPS=40                          # --steps in compose.e2e.yaml
if [[ -z ${COMPOSE:-} ]]; then
    if $DOCKER compose version >/dev/null 2>&1; then COMPOSE="$DOCKER compose"; else COMPOSE=docker-compose; fi
fi
COMPOSE="$COMPOSE -p $PROJECT -f $REPO/docker/compose.yaml -f $REPO/docker/compose.e2e.yaml"
export DOCKER_BUILDKIT=1          # RUN --mount needs BuildKit (already the default since Docker 23)

rm -rf "$OUT" && mkdir -p "$OUT"
RESULTS=$OUT/results.txt
T0=$(date +%s)
log() { printf '[%s +%4ds] %s\n' "$(date -u +%T)" "$(( $(date +%s) - T0 ))" "$*" | tee -a "$OUT/e2e.log"; }
result() { printf '%s: %s\n' "$1" "$2" | tee -a "$RESULTS"; }
check() { result "check: $1" "$2"; [[ $2 == ok* ]] || fail "$1"; }
fail() {
    trap - ERR
    log "FAILED: $*"
    $COMPOSE logs --no-color --timestamps > "$OUT/compose.log" 2>&1 || true
    log "logs: $OUT/compose.log; containers and volumes of project $PROJECT left for inspection"
    exit 1
}

trap 'fail "line $LINENO: $BASH_COMMAND"' ERR

cid() {  # the container of a service, running or not
    $DOCKER ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}
state() { $DOCKER inspect -f "$2" "$(cid "$1")"; }
health() { state "$1" '{{if .State.Health}}{{.State.Health.Status}}{{end}}'; }
in_work() {  # a shell command over the work volume, read-only, in a throwaway container
    $DOCKER run --rm --network none -v "${PROJECT}_work:/work:ro" --entrypoint sh "$IMAGE" -c "$1"
}
last_step() {  # the newest step both ranks have trained (-1 before the first)
    in_work 'for r in 0 1; do
                 s=$(tail -n 1 /work/trainer/ledger-rank$r.jsonl 2>/dev/null | sed -n "s/^{\"step\": \([0-9]*\),.*/\1/p")
                 echo "${s:--1}"
             done' | sort -n | head -n 1
}
wait_for() {  # wait_for WHAT COMMAND...: until COMMAND succeeds, at most STEP_TIMEOUT seconds
    local what=$1 start=$SECONDS
    shift
    until "$@"; do
        (( SECONDS - start < STEP_TIMEOUT )) || fail "$what: not within ${STEP_TIMEOUT}s"
        sleep 5
    done
}
healthy() { [[ $(health selector) == healthy ]]; }
reached() { local s; s=$(last_step); [[ -n $s && $s -ge $1 ]]; }

# --- 1. the image -------------------------------------------------------------------------------------
$DOCKER image inspect "$BASE_IMAGE" >/dev/null || fail "base image $BASE_IMAGE is not on this engine"
if [[ -z ${PIP_CONTEXT_DIR:-} ]]; then
    PIP_CONTEXT_DIR=$OUT/pip-context
    python3 "$REPO/docker/pip_context.py" "$PIP_CONTEXT_DIR" > "$OUT/pip.conf.txt"
fi
log "pip settings passed to the build ($PIP_CONTEXT_DIR/pip.conf):"
sed 's/^/    /' "$PIP_CONTEXT_DIR/pip.conf" | tee -a "$OUT/e2e.log"
# Same files, same tar, same layer: an unchanged context keeps the build cache of the pip steps.
tar -C "$PIP_CONTEXT_DIR" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -c . \
    | $DOCKER import - "$PIP_IMAGE" > /dev/null

log "building $IMAGE from $BASE_IMAGE"
start=$SECONDS
$DOCKER build --progress=plain -f "$REPO/docker/Dockerfile" -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_CONTEXT="$PIP_IMAGE" --build-arg TORCH_INDEX= \
    "$REPO" > "$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; fail "docker build"; }
result "build time" "$(( SECONDS - start )) s (log: $OUT/build.log)"
result "image size" "$($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
result "torch in the image" "$($DOCKER run --rm "$IMAGE" python -c 'import torch; print(torch.__version__)')"
warm=$($DOCKER run --rm "$IMAGE" sh -c 'colm-stream model warm smollm2 2>&1')
if [[ $warm != *converting* ]]; then verdict=ok; else verdict=no; fi
check "model converted at build time (a container converts nothing)" "$verdict: $warm"
if $PYTHON "$REPO/docker/e2e_check.py" layers --context "$PIP_CONTEXT_DIR" \
        < <($DOCKER save "$IMAGE") > "$OUT/layers.json"; then
    check "no pip setting, certificate or wheel of the build machine in any layer" \
        "ok ($(tr -d '\n ' < "$OUT/layers.json"))"
else
    check "no pip setting of the build machine in any layer" "no: $(cat "$OUT/layers.json")"
fi

# --- 2. up, train, kill, resume --------------------------------------------------------------------
$COMPOSE down -v --remove-orphans > /dev/null 2>&1 || true
log "up"
start=$SECONDS
$COMPOSE up -d --no-build 2>&1 | tee -a "$OUT/e2e.log"  # returns once the trainer is started
result "up to selector healthy and trainer started" "$(( SECONDS - start )) s"
wait_for "first step" reached 0
result "up to first step trained by both ranks" "$(( SECONDS - start )) s"
wait_for "step 11" reached 11
result "steps 0..11" "$(( SECONDS - start )) s after up"

killed_at=$(last_step)
log "docker kill selector at step $killed_at"
$DOCKER kill "$(cid selector)" > /dev/null
sleep 10
result "selector after docker kill" "$(state selector '{{.State.Status}} exit {{.State.ExitCode}}, restarts {{.RestartCount}}') (docker applies no restart policy to a container it killed)"
status=$(state trainer '{{.State.Status}}')
if [[ $status == running ]]; then verdict=ok; else verdict=no; fi
check "trainer keeps running while the selector is down" "$verdict: $status"
start=$SECONDS
$COMPOSE start selector 2>&1 | tee -a "$OUT/e2e.log"
wait_for "selector healthy again" healthy
result "selector restart to healthy" "$(( SECONDS - start )) s"
wait_for "training after the selector restart" reached $(( killed_at + 3 ))
check "training resumes after the selector was killed at step $killed_at" \
    "ok: step $(last_step) $(( SECONDS - start )) s after its restart"

restarts=$(state trainer '{{.RestartCount}}')
killed_at=$(last_step)
rank_pid=$($DOCKER exec "$(cid trainer)" sh -c 'for d in /proc/[0-9]*; do
        if grep -q colm_stream.train "$d/cmdline" 2>/dev/null \
            && tr "\0" "\n" < "$d/environ" 2>/dev/null | grep -qx RANK=1; then echo "${d#/proc/}"; fi
    done')
[[ -n $rank_pid ]] || fail "no trainer rank 1 process found"
log "SIGKILL trainer rank 1 (pid $rank_pid in its container) at step $killed_at"
$DOCKER exec "$(cid trainer)" sh -c "kill -9 $rank_pid"
start=$SECONDS
trainer_restarted() { [[ $(state trainer '{{.RestartCount}}') -gt $restarts ]]; }
wait_for "trainer restarted by its restart policy" trainer_restarted
failed=$($DOCKER logs "$(cid trainer)" 2>&1 | grep -o 'failed (exitcode: [-0-9]*) local_rank: [0-9]*' | tail -n 1)
result "trainer after a rank was killed" "torchrun: ${failed:-?}; container restarted by restart: on-failure (restarts: $(state trainer '{{.RestartCount}}'))"
wait_for "training after the trainer restart" reached $(( killed_at + 3 ))
check "training resumes after trainer rank 1 was killed at step $killed_at" \
    "ok: step $(last_step) $(( SECONDS - start )) s after the kill"

# --- 3. down, up: resume from the volumes ----------------------------------------------------------
wait_for "step 27" reached 27
down_at=$(last_step)
log "down at step $down_at (volumes kept)"
$COMPOSE logs --no-color --timestamps > "$OUT/compose-before-down.log" 2>&1
$COMPOSE down 2>&1 | tee -a "$OUT/e2e.log"
volumes=$($DOCKER volume ls -q --filter "name=${PROJECT}_" | tr '\n' ' ')
if [[ $volumes == *_shards* && $volumes == *_work* ]]; then verdict=ok; else verdict=no; fi
check "down keeps the shards and work volumes" "$verdict: $volumes"
start=$SECONDS
$COMPOSE up -d --no-build 2>&1 | tee -a "$OUT/e2e.log"
result "up again to selector healthy and trainer started" "$(( SECONDS - start )) s"
resumed=$($COMPOSE logs --no-color selector 2>&1 | grep -o 'resumed at step [0-9]*, param version [0-9]*' | tail -n 1)
if [[ -n $resumed ]]; then verdict=ok; else verdict=no; fi
check "selector resumes from its journal after down/up" "$verdict: $resumed"
trainer_done() { [[ $(state trainer '{{.State.Status}}') == exited ]]; }
wait_for "the trainer to finish $STEPS steps" trainer_done
result "up again to the end of the job" "$(( SECONDS - start )) s"
code=$(state trainer '{{.State.ExitCode}}')
if [[ $code == 0 ]]; then verdict=ok; else verdict=no; fi
check "trainer finished the job" "$verdict: exit $code, last step $(last_step)"
resumes=$($COMPOSE logs --no-color trainer 2>&1 | grep -o 'resuming from [^ ]* at step [0-9]*' | tr '\n' ';')
result "trainer resumes (its log)" "${resumes:-none}"
$COMPOSE exec -T selector colm-status 127.0.0.1:50051 > "$OUT/status.txt" 2>&1 || true
$COMPOSE logs --no-color --timestamps > "$OUT/compose.log" 2>&1

# --- 4. the ledgers against the journal ----------------------------------------------------------
rm -rf "$OUT/work" && mkdir -p "$OUT/work"
$DOCKER run --rm --network none -v "${PROJECT}_work:/work:ro" --entrypoint tar "$IMAGE" \
    -C /work -cf - selector trainer | tar -C "$OUT/work" -xf -
if $PYTHON "$REPO/docker/e2e_check.py" ledgers "$OUT/work" --steps "$STEPS" > "$OUT/ledgers.json"; then
    check "ledgers against the journal: every step once per rank, on the journaled batch, no sample twice" \
        "ok ($(tr -d '\n ' < "$OUT/ledgers.json"))"
else
    check "ledgers against the journal" "no: $(cat "$OUT/ledgers.json")"
fi

# --- 5. down -v ----------------------------------------------------------------------------------
$COMPOSE down -v 2>&1 | tee -a "$OUT/e2e.log"
left=$($DOCKER volume ls -q --filter "name=${PROJECT}_"; cid selector; cid trainer)
if [[ -z $left ]]; then verdict=ok; else verdict=no; fi
check "down -v removes the containers and volumes" "$verdict: ${left:-nothing left}"
result "total" "$(( $(date +%s) - T0 )) s"
log "all checks passed; results in $RESULTS"
