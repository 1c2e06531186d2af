#!/bin/sh
# radflag container entrypoint: `serve` (default) or any radflag command.
#   RADFLAG_CONFIG          TOML file used when it exists (RADFLAG_* variables override it)
#   RADFLAG_MIGRATE_ON_START=1  run `radflag db upgrade` (Alembic) before serving, retried
#                               RADFLAG_MIGRATE_TRIES times (default 30, 2 s apart)
set -eu
config=""
if [ -f "${RADFLAG_CONFIG:-}" ]; then config="--config=$RADFLAG_CONFIG"; fi
if [ "${1:-serve}" = serve ]; then
  [ $# -gt 0 ] && shift
  if [ "${RADFLAG_MIGRATE_ON_START:-0}" = 1 ]; then
    # the database may still be starting (compose does not wait for health): retry
    tries="${RADFLAG_MIGRATE_TRIES:-30}"
    # shellcheck disable=SC2086
    until radflag db upgrade $config; do
      tries=$((tries - 1))
      [ "$tries" -gt 0 ] || { echo "radflag db upgrade failed" >&2; exit 1; }
      sleep 2
    done
  fi
  # shellcheck disable=SC2086
  exec radflag serve $config "$@"
fi
exec radflag "$@"
