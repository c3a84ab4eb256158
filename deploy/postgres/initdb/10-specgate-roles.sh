#!/bin/sh
# PostgreSQL image, first start only (/docker-entrypoint-initdb.d): the group roles `specgate db roles`
# grants to, and the login roles the services and the reporting tools use, with passwords from the
# Compose secrets. The grants themselves come from `specgate db roles` (the migrate service), after the
# tables exist. Idempotent (a role already there keeps its rights; a login role gets the new password).
# Test: tests/integration/test_deploy_postgres_roles.py runs it against the real server.
set -eu
secrets=${SECRETS_DIR:-/run/secrets}
app_login=${APP_LOGIN:-specgate_svc}
report_login=${REPORT_LOGIN:-specgate_reporting}
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v app_login="$app_login" -v app_pw="$(cat "$secrets/pg_app_password")" \
     -v report_login="$report_login" -v report_pw="$(cat "$secrets/pg_report_password")" <<'SQL'
SELECT 'CREATE ROLE specgate_app NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'specgate_app') \gexec
SELECT 'CREATE ROLE specgate_report NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'specgate_report') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'app_login')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_login') \gexec
SELECT format('CREATE ROLE %I LOGIN', :'report_login')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'report_login') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'app_login', :'app_pw') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'report_login', :'report_pw') \gexec
SELECT format('GRANT specgate_app TO %I', :'app_login') \gexec
SELECT format('GRANT specgate_report TO %I', :'report_login') \gexec
SQL
