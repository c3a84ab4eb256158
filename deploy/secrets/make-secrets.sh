#!/bin/sh
# Random passwords and keys for deploy/compose.yaml, one file each, made once (existing files are kept).
# They are never committed (deploy/secrets/.gitignore).
set -eu
cd "$(dirname "$0")"
umask 077
make() { [ -s "$1" ] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$1"; echo "made $1"; }; }
make pg_owner_password
make pg_app_password
make pg_report_password
[ -s s3_access_key ] || { printf specgate > s3_access_key; echo "made s3_access_key"; }
make s3_secret_key
make review_session_key
