#!/bin/sh
# A celeriac worker in POSIX sh: lease one job at a time over HTTP, run its task,
# heartbeat while it runs, and complete or fail it with the lease token.
# Needs curl and jq.
#
#   CELERIAC_SERVER_URL=http://127.0.0.1:8000 CELERIAC_QUEUES=default sh worker.sh
#
# A task is an executable named after it in $CELERIAC_TASKS_DIR (default: tasks/ beside
# this script), or else a shell function task_<name> ('.', ':' and '-' become '_')
# defined in $CELERIAC_TASKS_FILE, which is sourced. It gets the job's args as its
# arguments (strings as they are, anything else as JSON) and, in the environment,
# CELERIAC_JOB_ID, CELERIAC_JOB_ATTEMPT, CELERIAC_JOB_ARGS, CELERIAC_JOB_KWARGS (JSON),
# CELERIAC_JOB_PARENTS (a workflow job's parents' results by ref, JSON; {} for others)
# and CELERIAC_PROGRESS_FILE (write a JSON value there: the next heartbeat sends it).
# Exit 0: stdout is the result (JSON if it is one JSON value, else a string). Other
# statuses fail the job, which the service retries while attempts remain; 100 fails it
# for good. SIGTERM/SIGINT: finish the current job, then exit.
#
# Other settings: CELERIAC_API_KEY, CELERIAC_LEASE_SECONDS (60), CELERIAC_POLL_WAIT (20).

set -u
command -v curl >/dev/null 2>&1 || { echo "worker.sh: curl is required" >&2; exit 2; }
command -v jq >/dev/null 2>&1 || { echo "worker.sh: jq is required" >&2; exit 2; }

SERVER=${CELERIAC_SERVER_URL:-http://127.0.0.1:8000}
QUEUES=${CELERIAC_QUEUES:-default}
LEASE=${CELERIAC_LEASE_SECONDS:-60}
WAIT=${CELERIAC_POLL_WAIT:-20}
NAME=${CELERIAC_WORKER_NAME:-sh-$$@$(uname -n)}
TASKS_DIR=${CELERIAC_TASKS_DIR:-$(dirname "$0")/tasks}
BEAT=$((LEASE / 3)); [ "$BEAT" -ge 1 ] || BEAT=1  # heartbeat at least every lease/3
# shellcheck source=/dev/null
if [ -n "${CELERIAC_TASKS_FILE:-}" ]; then . "$CELERIAC_TASKS_FILE"; fi

tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
stop=0
trap 'stop=1' TERM INT
io=$tmp/main  # where api() keeps its request and answer (the heartbeater has its own)

# The key goes in a curl config file, not on the command line where ps would show it.
: >"$tmp/curlrc"
chmod 600 "$tmp/curlrc"
if [ -n "${CELERIAC_API_KEY:-}" ]; then
  printf 'header = "Authorization: Bearer %s"\n' "$CELERIAC_API_KEY" >"$tmp/curlrc"
fi

log() { echo "[$(date -u +%H:%M:%S) $NAME] $*" >&2; }

# api METHOD PATH BODY: print the HTTP status (000: no answer); the answer is in $io.res.
api() {
  printf '%s' "$3" >"$io.req"
  curl -sS -K "$tmp/curlrc" -X "$1" -H 'Content-Type: application/json' \
    --max-time $((WAIT + 30)) --data-binary @"$io.req" -o "$io.res" -D "$io.hdr" -w '%{http_code}' \
    "$SERVER$2" 2>"$io.err" || true
}

# settle ACTION BODY: POST /jobs/{id}/complete or /fail, trying again if there is no answer.
settle() {
  for _ in 1 2 3; do
    status=$(api POST "/jobs/$id/$1" "$2")
    case $status in
      200) log "${task}[$id] $(jq -r .status "$io.res")"; return ;;
      409) log "${task}[$id]: lease is stale (re-leased or settled): dropped"; return ;;
      000 | 5*) sleep 2 ;;
      *) break ;;
    esac
  done
  log "${task}[$id]: $1 failed: HTTP $status $(cat "$io.res" "$io.err" 2>/dev/null)"
}

fail() {  # fail TYPE MESSAGE RETRY
  settle fail "$(jq -nc --arg t "$token" --arg type "$1" --arg m "$2" --argjson retry "$3" \
    '{token: $t, error: {type: $type, message: $m}, retry: $retry}')"
}

# Runs in the background while the task does: extend the lease every BEAT seconds;
# stop the task when the job is cancelled or the lease turns out stale.
heartbeat() {  # heartbeat PID
  io=$tmp/hb.$id
  while sleep "$BEAT"; do
    progress=null
    if [ -s "$CELERIAC_PROGRESS_FILE" ]; then
      progress=$(jq -c . "$CELERIAC_PROGRESS_FILE" 2>/dev/null) || progress=null
    fi
    status=$(api POST "/jobs/$id/heartbeat" "$(jq -nc --arg t "$token" --argjson s "$LEASE" \
      --argjson p "$progress" '{token: $t, lease_seconds: $s} + (if $p then {progress: $p} else {} end)')")
    if [ "$status" = 409 ] || [ "$status" = 404 ]; then
      echo lost >"$tmp/flag"; kill "$1" 2>/dev/null; return
    elif [ "$status" = 200 ] && [ "$(jq .cancel_requested "$io.res")" = true ]; then
      echo cancelled >"$tmp/flag"; kill "$1" 2>/dev/null; return
    fi
  done
}

# shellcheck disable=SC2120  # "$@" is set inside, to the job's args
run_job() {
  jq -c '.jobs[0]' "$io.res" >"$tmp/job"
  id=$(jq -r .id "$tmp/job")
  task=$(jq -r .task "$tmp/job")
  token=$(jq -r .lease.token "$tmp/job")
  CELERIAC_JOB_ID=$id
  CELERIAC_JOB_ATTEMPT=$(jq .attempt "$tmp/job")
  CELERIAC_JOB_ARGS=$(jq -c .args "$tmp/job")
  CELERIAC_JOB_KWARGS=$(jq -c .kwargs "$tmp/job")
  CELERIAC_JOB_PARENTS=$(jq -c '.parents // {}' "$tmp/job")
  CELERIAC_PROGRESS_FILE=$tmp/progress
  export CELERIAC_JOB_ID CELERIAC_JOB_ATTEMPT CELERIAC_JOB_ARGS CELERIAC_JOB_KWARGS CELERIAC_PROGRESS_FILE
  export CELERIAC_JOB_PARENTS
  rm -f "$tmp/flag" "$tmp/progress"

  handler=task_$(printf '%s' "$task" | tr '.:-' '___')
  if [ -f "$TASKS_DIR/$task" ] && [ -x "$TASKS_DIR/$task" ]; then
    handler=$TASKS_DIR/$task
  elif ! command -v "$handler" >/dev/null 2>&1; then
    fail UnknownTask "no task $task in $TASKS_DIR or ${CELERIAC_TASKS_FILE:-a tasks file}" false
    return
  fi
  # The args as positional parameters: jq's @sh quotes each one for the shell.
  eval "set -- $(jq -r '.args | map(if type == "string" then . else tojson end | @sh) | join(" ")' "$tmp/job")"
  ("$handler" "$@") <"/dev/null" >"$tmp/out" 2>"$tmp/err" &
  pid=$!
  heartbeat "$pid" &
  beater=$!
  wait "$pid" 2>/dev/null; code=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null; code=$?; done  # a signal cut wait short
  # SIGKILL, as a TERM sent the instant after the fork can be lost (dash), and the
  # heartbeater has nothing to clean up.
  kill -9 "$beater" 2>/dev/null; wait "$beater" 2>/dev/null
  rm -f "$tmp/hb.$id".*

  case $(cat "$tmp/flag" 2>/dev/null) in
    lost) log "${task}[$id]: lost the lease (re-leased or settled): dropped"; return ;;
    cancelled) fail Cancelled "cancel requested" false; return ;;
  esac
  if [ "$code" -eq 0 ]; then
    # One JSON value (or nothing: null) is the result as is; any other output a string.
    jq -cs 'if length == 1 then .[0] elif length == 0 then null else error("many") end' \
      "$tmp/out" >"$tmp/result" 2>/dev/null || jq -Rs 'rtrimstr("\n")' "$tmp/out" >"$tmp/result"
    settle complete "$(jq -nc --arg t "$token" --slurpfile r "$tmp/result" '{token: $t, result: $r[0]}')"
  else
    retry=true; [ "$code" -eq 100 ] && retry=false
    fail ExitStatus "$task exited with status $code: $(tail -c 4000 "$tmp/err")" "$retry"
  fi
}

lease=$(jq -nc --arg w "$NAME" --arg q "$QUEUES" --argjson wait "$WAIT" --argjson s "$LEASE" \
  '{worker: $w, queues: ($q | split(",")), max_jobs: 1, wait: $wait, lease_seconds: $s}')
log "leasing from $QUEUES at $SERVER"
while [ "$stop" = 0 ]; do
  status=$(api POST /leases "$lease")
  case $status in
    200)
      if [ "$(jq '.jobs | length' "$io.res")" = 1 ]; then run_job; else
        # Nothing, with Retry-After: the service is at its long-poll cap (docs/protocol.md).
        pause=$(sed -n 's/^[Rr]etry-[Aa]fter: *\([0-9][0-9]*\).*/\1/p' "$io.hdr")
        if [ -n "$pause" ]; then sleep "$pause"; fi
      fi ;;
    401 | 403 | 422) log "the service refuses this worker: $(cat "$io.res")"; exit 1 ;;
    *) log "lease: HTTP $status $(cat "$io.res" "$io.err" 2>/dev/null), retrying in 5s"; sleep 5 ;;
  esac
done
log "stopped"
