# Sourced by .ci/run: PostgreSQL from Debian's packages, started, with a role and a database for the
# tests; exports VMREPL_TEST_DATABASE_URL so the controller's database tests run on it as well as SQLite.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
if ! pg_isready -q -h 127.0.0.1; then
  if command -v pg_ctlcluster >/dev/null && [ -n "$(pg_lsclusters -h 2>/dev/null)" ]; then
    read -r pg_version pg_cluster _ < <(pg_lsclusters -h | head -1)
    pg_ctlcluster "$pg_version" "$pg_cluster" start
  else
    service postgresql start
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
fi
psql_admin() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q "$@"; }
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname='vmrepl'")" != 1 ]; then
  psql_admin -c "CREATE ROLE vmrepl LOGIN CREATEDB PASSWORD 'vmrepl'"
fi
psql_admin -c "ALTER ROLE vmrepl CREATEDB"
if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname='vmrepl_test'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE vmrepl_test OWNER vmrepl"
fi
export VMREPL_TEST_DATABASE_URL="postgresql+asyncpg://vmrepl:vmrepl@127.0.0.1/vmrepl_test"
