#!/usr/bin/env bash
# Starts Redis for defectflow with deploy/redis/redis.conf, and refuses to start it open:
#   REDIS_BIND=10.20.0.5 REDIS_PASSWORD_FILE=/run/secrets/redis deploy/redis/start-redis.sh
# Without REDIS_BIND it listens on this machine only. With it, a password file is required;
# its password is written to a 0600 config file Redis includes, never onto a command line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
server="${REDIS_SERVER:-redis-server}"
dir="${REDIS_DIR:-/var/lib/redis}"
args=("$here/redis.conf" --dir "$dir")
if [ -n "${REDIS_PORT:-}" ]; then args+=(--port "$REDIS_PORT"); fi
if [ -n "${REDIS_BIND:-}" ]; then
    if [ -z "${REDIS_PASSWORD_FILE:-}" ] || [ ! -s "$REDIS_PASSWORD_FILE" ]; then
        echo "start-redis: refusing to listen on $REDIS_BIND without a password:" \
            "set REDIS_PASSWORD_FILE to a file holding it" >&2
        exit 2
    fi
    args+=(--bind "$REDIS_BIND")
fi
if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    secret="$dir/secret.conf"
    (umask 077; printf 'requirepass "%s"\n' "$(head -n1 "$REDIS_PASSWORD_FILE")" > "$secret")
    args+=(--include "$secret")
fi
exec "$server" "${args[@]}"
