#!/bin/sh
# PostgreSQL image, first start only (/docker-entrypoint-initdb.d): the group roles `specgate db roles`
# grants to, and the login roles the services and the reporting tools use, with passwords from the
# Compose secrets. The grants themselves come from `specgate db roles` (the migrate service), after the
# tables exist.
set -eu
app_pw=$(cat /run/secrets/pg_app_password)
report_pw=$(cat /run/secrets/pg_report_password)
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v app_pw="$app_pw" -v report_pw="$report_pw" <<'SQL'
CREATE ROLE specgate_app NOLOGIN;
CREATE ROLE specgate_report NOLOGIN;
CREATE ROLE specgate_svc LOGIN PASSWORD :'app_pw' IN ROLE specgate_app;
CREATE ROLE specgate_reporting LOGIN PASSWORD :'report_pw' IN ROLE specgate_report;
SQL
