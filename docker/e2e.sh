#!/usr/bin/env bash
# The compose deployment end to end on a real Docker engine (minutes; not run by CI):
# build the image from a local base with this machine's pip settings, `up`, train, SIGKILL the
# selector and one trainer rank, check that training resumes, `down` and `up` again (resume from
# the volumes), check the trainers' ledgers against the selector's journal, `down -v`.
#
#   docker/e2e.sh BASE_IMAGE                # e.g. colm-base:bookworm from docker/debian-base.sh
#   docker/e2e.sh --preflight [BASE_IMAGE]  # only the preflight below; exit 0 when all is found
#
# Run from anywhere, as a user who may use the Docker engine. First, before anything long, a
# preflight looks for what the run needs and prints one line each, or one line per missing thing
# saying how to get it, and stops (exit 1) if anything is missing: a docker CLI that builds with
# BuildKit (docker/Dockerfile uses `RUN --mount`, which the classic builder cannot run), a
# reachable engine, a compose command, the project's Python (`make venv`) and the base image.
# Environment (all optional):
#   DOCKER           docker CLI whose `build` runs BuildKit  (the first `docker` on PATH that can)
#   COMPOSE          compose command                         (`$DOCKER compose`, else docker-compose)
#   PIP_CONTEXT_DIR  pip settings folder from docker/pip_context.py (made from the project venv's pip)
#   PYTHON           the project's Python, for the checks    (.venv/bin/python, made by `make venv`)
#   PROJECT          compose project name: its own containers, network and volumes   (colm-e2e)
#   OUT              logs and results                         (/var/tmp/colm-e2e)
#   STEP_TIMEOUT     seconds to wait for each milestone       (1800)
# The job is docker/compose.yaml with docker/compose.e2e.yaml over it (40 steps, b=4 of L=8).
# Images: it keeps colm-stream:latest (what compose.yaml runs) and colm-pip-context:local (reused
# while this machine's pip settings stay the same, so the pip steps stay cached; it holds those
# settings and the files they name: `docker rmi colm-pip-context:local` when done) and removes
# the images these two tags pointed to before, once nothing uses them, so no run leaves `<none>`
# images behind. Containers and volumes are removed by the final `down -v`; a failed run leaves
# them for inspection (the next run's `down -v` removes them).
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFLIGHT_ONLY=0
if [[ ${1:-} == --preflight ]]; then PREFLIGHT_ONLY=1; shift; fi
BASE_IMAGE=${1:-${BASE_IMAGE:-}}
if [[ -z $BASE_IMAGE && $PREFLIGHT_ONLY == 0 ]]; then
    echo "usage: $0 [--preflight] BASE_IMAGE (a local image, e.g. from docker/debian-base.sh)" >&2
    exit 2
fi
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PROJECT=${PROJECT:-colm-e2e}
OUT=${OUT:-/var/tmp/colm-e2e}
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
IMAGE=colm-stream:latest          # the image compose.yaml names
PIP_IMAGE=colm-pip-context:local  # mounted while pip runs in the build, never part of the image
STEPS=40                          # --steps in compose.e2e.yaml
TRAIN_MODULE=colm_stream.train    # the trainer's `-m` module in compose.e2e.yaml (finds the rank to kill)

# --- 0. preflight: everything the run needs, before anything long ----------------------------------
PREFLIGHT=()  # its lines, for e2e.log
found()   { PREFLIGHT+=("preflight: ok: $*"); echo "preflight: ok: $*"; }
MISSING=0
missing() { PREFLIGHT+=("preflight: MISSING: $*"); echo "preflight: MISSING: $*" >&2; MISSING=$(( MISSING + 1 )); }

client_version() {  # the docker CLI's own version; printed even when no engine answers
    { $1 version --format '{{.Client.Version}}' 2>/dev/null || true; } | head -n 1
}
buildkit_of() {  # how docker CLI $1 runs BuildKit: "the buildx plugin ...", "built in", or nothing
    local version major
    if $1 buildx version >/dev/null 2>&1; then
        echo "the buildx plugin ($({ $1 buildx version 2>/dev/null || true; } | head -n 1))"
        return
    fi
    version=$(client_version "$1")
    major=${version%%.*}
    # Before 23 the CLI drives the engine's BuildKit itself (DOCKER_BUILDKIT=1); from 23 on only buildx does.
    if [[ $major =~ ^[0-9]+$ ]] && (( major < 23 )); then echo "built in (DOCKER_BUILDKIT=1)"; fi
}
GET_BUILDX="install buildx (Debian 13 and Ubuntu: apt-get install docker-buildx; Docker's own \
repository: docker-buildx-plugin; or its release binary as ~/.docker/cli-plugins/docker-buildx), or set \
DOCKER to a docker CLI before 23, which has BuildKit built in (Debian 12's docker.io 20.10: /usr/bin/docker); \
the classic builder (DOCKER_BUILDKIT=0) cannot build docker/Dockerfile: it uses RUN --mount"

if [[ -n ${DOCKER:-} ]]; then
    candidates=("$DOCKER")
    command -v "${DOCKER%% *}" >/dev/null || missing "no docker CLI at DOCKER=$DOCKER: set DOCKER to one, \
or install Docker (Debian and Ubuntu: apt-get install docker.io)"
else
    mapfile -t candidates < <(type -ap docker || true)
    (( ${#candidates[@]} )) || missing "no docker CLI on PATH: install Docker (Debian and Ubuntu: \
apt-get install docker.io, which brings the engine dockerd too), or set DOCKER=/path/to/docker"
fi
DOCKER=
if (( MISSING == 0 )); then
    for candidate in "${candidates[@]}"; do
        how=$(buildkit_of "$candidate")
        if [[ -n $how ]]; then DOCKER=$candidate; break; fi
    done
    if [[ -z $DOCKER ]]; then
        DOCKER=${candidates[0]}
        missing "BuildKit: $DOCKER ($(client_version "$DOCKER")) has no buildx plugin, which docker \
23 and later need for BuildKit ('BuildKit is enabled but the buildx component is missing or broken'): $GET_BUILDX"
    elif [[ $DOCKER != "${candidates[0]}" ]]; then
        found "docker: $DOCKER $(client_version "$DOCKER"), BuildKit $how; the first docker on PATH, \
${candidates[0]} ($(client_version "${candidates[0]}")), has no buildx (set DOCKER to choose)"
    else
        found "docker: $DOCKER $(client_version "$DOCKER"), BuildKit $how"
    fi
fi

ENGINE=0
if [[ -n $DOCKER ]]; then
    if engine=$($DOCKER version --format '{{.Server.Version}}' 2>&1); then
        ENGINE=1
        found "engine: Docker $engine"
    else
        missing "engine: $DOCKER reaches no Docker engine ($(tail -n 1 <<< "$engine")): start it \
(as root: systemctl start docker, or dockerd &), or, if permission is denied, run as a user in \
the docker group"
    fi
fi

if [[ -n ${COMPOSE:-} ]]; then
    if v=$($COMPOSE version 2>&1); then found "compose: $COMPOSE ($(head -n 1 <<< "$v"))"
    else missing "compose: COMPOSE=$COMPOSE does not run ($(tail -n 1 <<< "$v")): unset it or fix it"; fi
elif [[ -n $DOCKER ]] && v=$($DOCKER compose version 2>/dev/null); then
    COMPOSE="$DOCKER compose"
    found "compose: $COMPOSE ($(head -n 1 <<< "$v"))"
elif v=$(docker-compose version --short 2>/dev/null); then
    COMPOSE=docker-compose
    found "compose: docker-compose $v"
else
    missing "compose: neither \`docker compose\` (the plugin) nor docker-compose: install one \
(Debian: apt-get install docker-compose, 1.29 on Debian 12; Ubuntu: docker-compose-v2; Docker's \
own repository: docker-compose-plugin)"
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing "python: no project Python at $PYTHON (the layer and ledger checks and pip_context.py \
run with it): run \`make venv\` in $REPO, or set PYTHON to a Python with the project installed"
elif v=$("$PYTHON" "$REPO/docker/e2e_check.py" preflight 2>&1); then
    found "python: $v"
else
    missing "python: $PYTHON $(tail -n 1 <<< "$v"): run \`make venv\` in $REPO, or set PYTHON to \
a Python with the project installed"
fi

if [[ -n $BASE_IMAGE && $ENGINE == 0 ]]; then
    echo "preflight: base image $BASE_IMAGE not looked for: no engine to ask"
elif [[ -n $BASE_IMAGE ]]; then
    if $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        found "base image: $BASE_IMAGE"
    else
        missing "base image: $BASE_IMAGE is not on this engine: make it from Debian packages with \
docker/debian-base.sh $BASE_IMAGE (as root, needs debootstrap), or name another local image \
(Debian-based, with python3, its venv module and useradd)"
    fi
fi

if (( MISSING )); then
    echo "preflight: $MISSING missing (above); nothing was built or started" >&2
    exit 1
fi
if (( PREFLIGHT_ONLY )); then echo "preflight: all found"; exit 0; fi

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
printf '%s\n' "${PREFLIGHT[@]}" >> "$OUT/e2e.log"

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

image_id() { $DOCKER image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
drop_if_untagged() {  # drop_if_untagged ID WHAT: remove an image a tag of ours no longer names
    local id=$1
    [[ -n $id && $($DOCKER image inspect -f '{{len .RepoTags}}' "$id" 2>/dev/null) == 0 ]] || return 0
    if $DOCKER rmi "$id" > /dev/null 2>&1; then log "removed the previous $2 ($id)"
    else log "kept the previous $2 ($id): still in use"; fi
}
py_check() {  # py_check WHAT JSON ARGS...: e2e_check.py ARGS (stdin passed on), judged in its own terms
    local what=$1 json=$2 rc=0
    shift 2
    "$PYTHON" "$REPO/docker/e2e_check.py" "$@" > "$json" 2> "$json.err" || rc=$?
    case $rc in  # e2e_check.py: 0 passed, 1 failed (its JSON says what), 3 could not check
        0) check "$what" "ok ($(tr -d '\n ' < "$json"))" ;;
        1) check "$what" "no: $(tr -d '\n' < "$json")" ;;
        126|127) check "$what" "not checked: cannot run $PYTHON (\`make venv\` makes .venv/bin/python)" ;;
        *) check "$what" "not checked: e2e_check.py $1 exited $rc: $(tail -n 3 "$json.err" | tr '\n' ' ')" ;;
    esac
}

# --- 1. the image -------------------------------------------------------------------------------------
if [[ -z ${PIP_CONTEXT_DIR:-} ]]; then
    PIP_CONTEXT_DIR=$OUT/pip-context
    "$PYTHON" "$REPO/docker/pip_context.py" "$PIP_CONTEXT_DIR" > "$OUT/pip.conf.txt"
fi
log "pip settings passed to the build ($PIP_CONTEXT_DIR/pip.conf):"
sed 's/^/    /' "$PIP_CONTEXT_DIR/pip.conf" | tee -a "$OUT/e2e.log"
# Same files, same tar, same layer: while the context is unchanged the image stays as it is (not
# imported again, which would make a new image and leave the old one untagged), and so does the
# build cache of the pip steps. A changed context replaces the image and removes the old one.
tar -C "$PIP_CONTEXT_DIR" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$OUT/pip-context.tar" .
layer=sha256:$(sha256sum < "$OUT/pip-context.tar" | cut -d ' ' -f 1)
previous=$(image_id "$PIP_IMAGE")
if [[ -n $previous && $($DOCKER image inspect -f '{{index .RootFS.Layers 0}}' "$PIP_IMAGE") == "$layer" ]]; then
    log "$PIP_IMAGE holds these settings already ($previous)"
else
    $DOCKER import - "$PIP_IMAGE" < "$OUT/pip-context.tar" > /dev/null
    drop_if_untagged "$previous" "$PIP_IMAGE"
fi
rm -f "$OUT/pip-context.tar"

log "building $IMAGE from $BASE_IMAGE"
previous_image=$(image_id "$IMAGE")  # removed once the containers of an earlier run are gone (step 2)
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
py_check "no pip setting, certificate or wheel of the build machine in any layer" "$OUT/layers.json" \
    layers --context "$PIP_CONTEXT_DIR" < <($DOCKER save "$IMAGE")

# --- 2. up, train, kill, resume --------------------------------------------------------------------
$COMPOSE down -v --remove-orphans > /dev/null 2>&1 || true
[[ $previous_image == "$(image_id "$IMAGE")" ]] || drop_if_untagged "$previous_image" "$IMAGE"
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
        if grep -qF '"$TRAIN_MODULE"' "$d/cmdline" 2>/dev/null \
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
py_check "ledgers against the journal: every step once per rank, on the journaled batch, no sample twice" \
    "$OUT/ledgers.json" ledgers "$OUT/work" --steps "$STEPS"

# --- 5. down -v ----------------------------------------------------------------------------------
$COMPOSE down -v 2>&1 | tee -a "$OUT/e2e.log"
left=$($DOCKER volume ls -q --filter "name=${PROJECT}_"; cid selector; cid trainer)
if [[ -z $left ]]; then verdict=ok; else verdict=no; fi
check "down -v removes the containers and volumes" "$verdict: ${left:-nothing left}"
result "total" "$(( $(date +%s) - T0 )) s"
log "all checks passed; results in $RESULTS"
