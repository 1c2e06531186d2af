#!/bin/sh
# Initialise an empty $PGDATA (user/password/database from POSTGRES_*), then run postgres.
# Network clients authenticate with scram-sha-256; the Unix socket (inside the container only)
# trusts, so that this script and `podman exec ... psql` work without the password.
set -eu
: "${POSTGRES_USER:=radflag}" "${POSTGRES_DB:=radflag}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
  pg_ctl -w -o "-c listen_addresses=''" start >/dev/null
  [ "$POSTGRES_DB" = postgres ] || createdb -U "$POSTGRES_USER" -O "$POSTGRES_USER" "$POSTGRES_DB"
  pg_ctl -w -m fast stop >/dev/null
fi
exec postgres -c listen_addresses='*' "$@"
