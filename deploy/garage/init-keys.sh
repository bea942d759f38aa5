#!/bin/sh
# Least-privilege S3 keys for the factory, through Garage's admin API (v2). Idempotent: run on
# every `docker compose up`; what exists already is left as it is.
#
#   - the working bucket ($SYNCD_BUCKET, which Garage's --default-bucket usually made already)
#     and the dataset bucket ($SYNCD_DATASET_BUCKET), where the coordinator writes datasets;
#   - the workers' key ($GARAGE_WORKER_ACCESS_KEY), allowed to read and write the working bucket
#     ($SYNCD_BUCKET) and nothing else: a worker cannot read, change or delete a finished dataset;
#   - the coordinator's key ($GARAGE_DEFAULT_ACCESS_KEY, Garage's default key) allowed on both.
#
# Needs sh and curl (the compose file runs it in a curl image); GARAGE_ADMIN_URL defaults to
# the compose service. Secrets are read from the environment and never printed.
set -eu

ADMIN_URL="${GARAGE_ADMIN_URL:-http://garage:3903}"
: "${GARAGE_ADMIN_TOKEN:?}" "${GARAGE_DEFAULT_ACCESS_KEY:?}" "${GARAGE_WORKER_ACCESS_KEY:?}"
: "${GARAGE_WORKER_SECRET_KEY:?}" "${SYNCD_BUCKET:?}" "${SYNCD_DATASET_BUCKET:?}"

# Secrets go to curl through files and stdin, never on a command line other processes can read.
WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT
BODY="$WORK_DIR/body"
HEADERS="$WORK_DIR/headers"
printf 'Authorization: Bearer %s\nContent-Type: application/json\n' "$GARAGE_ADMIN_TOKEN" >"$HEADERS"

# api METHOD ENDPOINT [JSON]: sets STATUS and leaves the answer in $BODY.
api() {
    STATUS="$(printf '%s' "${3:-}" | curl -sS -X "$1" -H "@$HEADERS" --data-binary @- \
        -o "$BODY" -w '%{http_code}' "$ADMIN_URL/v2/$2")" || STATUS=000
}
fail() {
    echo "init-keys: $*" >&2
    exit 1
}

# The id of the bucket with global alias $1 (empty when there is none).
bucket_id() {
    api GET "GetBucketInfo?globalAlias=$1"
    [ "$STATUS" = 200 ] || return 0
    tr -d '\n' <"$BODY" | sed -n 's/^{[^{]*"id" *: *"\([0-9a-f]*\)".*/\1/p'
}

# allow KEY BUCKET_ID READ WRITE OWNER
allow() {
    api POST AllowBucketKey "{\"bucketId\":\"$2\",\"accessKeyId\":\"$1\",\"permissions\":{\"read\":$3,\"write\":$4,\"owner\":$5}}"
    [ "$STATUS" = 200 ] || fail "allowing key $1 on bucket $2: HTTP $STATUS"
}

tries=0
until curl -fsS -o /dev/null "$ADMIN_URL/health"; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || fail "Garage's admin API at $ADMIN_URL did not answer within 60 s"
    sleep 1
done

api GET "GetKeyInfo?id=$GARAGE_WORKER_ACCESS_KEY"
if [ "$STATUS" != 200 ]; then
    api POST ImportKey "{\"accessKeyId\":\"$GARAGE_WORKER_ACCESS_KEY\",\"secretAccessKey\":\"$GARAGE_WORKER_SECRET_KEY\",\"name\":\"syncd-workers\"}"
    [ "$STATUS" = 200 ] || fail "importing the workers' key: HTTP $STATUS"
    echo "init-keys: created the workers' key $GARAGE_WORKER_ACCESS_KEY"
fi

# The id of the bucket with global alias $1, created if there is none.
ensure_bucket() {
    id="$(bucket_id "$1")"
    if [ -z "$id" ]; then
        api POST CreateBucket "{\"globalAlias\":\"$1\"}"
        [ "$STATUS" = 200 ] || fail "creating bucket $1: HTTP $STATUS"
        id="$(bucket_id "$1")"
        [ -n "$id" ] || fail "bucket $1 was created but cannot be found"
        echo "init-keys: created bucket $1" >&2
    fi
    printf '%s' "$id"
}

work="$(ensure_bucket "$SYNCD_BUCKET")"
datasets="$(ensure_bucket "$SYNCD_DATASET_BUCKET")"

allow "$GARAGE_WORKER_ACCESS_KEY" "$work" true true false
allow "$GARAGE_DEFAULT_ACCESS_KEY" "$work" true true true
allow "$GARAGE_DEFAULT_ACCESS_KEY" "$datasets" true true true
echo "init-keys: workers may use $SYNCD_BUCKET only; datasets go to $SYNCD_DATASET_BUCKET"
