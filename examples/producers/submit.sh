#!/bin/sh
# Submit a job with curl and wait for its result.
#
#   sh submit.sh math.add '[2, 3]'            # TASK [ARGS-JSON [QUEUE]]
#
# CELERIAC_SERVER_URL (default http://127.0.0.1:8000); CELERIAC_API_KEY, a key with the
# submit and read scopes, if the service has keys. Needs curl and sed, nothing else.
set -eu
server=${CELERIAC_SERVER_URL:-http://127.0.0.1:8000}
task=${1:?usage: submit.sh TASK [ARGS-JSON [QUEUE]]}
args=${2:-[]}
queue=${3:-default}

# From here on "$@" holds the options every curl call shares.
set -- -sS --fail-with-body -H 'Content-Type: application/json'
if [ -n "${CELERIAC_API_KEY:-}" ]; then
  set -- "$@" -H "Authorization: Bearer $CELERIAC_API_KEY"
fi

# 202 means the job is committed. The Idempotency-Key makes retrying this request safe:
# the same key and body answer with the original job instead of making a second one.
job=$(curl "$@" -X POST "$server/jobs" -H "Idempotency-Key: submit-sh-$$-$(date +%s)" \
  -d "{\"task\": \"$task\", \"args\": $args, \"queue\": \"$queue\"}")
# The id is the Job's first field (jq -r .id does the same, if you have jq).
id=$(printf '%s' "$job" | sed 's/^{"id":"\([^"]*\)".*/\1/')
echo "submitted $id" >&2

# One long-poll: answered the moment the job finishes (or after 60 s with its state).
curl "$@" "$server/jobs/$id?wait=60"
echo
