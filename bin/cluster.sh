# Shell helpers to run a PostgreSQL cluster of our own, sourced by bin/run
# (and later the benchmark). The cluster runs as the postgres user (the
# server refuses root), listens on 127.0.0.1 only, on a port other than 5432.
#
#   cluster_start DIR PORT [SETTING...]   initdb DIR if needed, then start it
#   cluster_stop DIR                      stop it (fast shutdown)
#   cluster_psql PORT [psql args...]      psql as the postgres superuser
#   random_token                          32 hex digits from /dev/urandom
#   load_registry BASE TOKEN PSQL...      imports n8n/n8n_webhook_registry.json
#   point_services BASE PSQL...           sends the stage work's calls to BASE (pipeline.services)
#                                         pointed at BASE, its auth header
#                                         set to TOKEN, with the psql command

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_BIN=$("$PG_CONFIG" --bindir)

as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cluster_start() {
    local dir=$1 port=$2 setting
    shift 2
    if [ "$port" = 5432 ]; then echo "refusing port 5432" >&2; return 1; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" != 0 ] || chown postgres:postgres "$dir"
        as_postgres "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-sync >/dev/null
        {
            echo "port = $port"
            echo "listen_addresses = '127.0.0.1'"
            echo "unix_socket_directories = '$dir'"
            for setting in "$@"; do echo "$setting"; done
        } | as_postgres tee -a "$dir/data/postgresql.conf" >/dev/null
    fi
    as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
}

cluster_stop() {
    local dir=$1
    [ -f "$dir/data/postmaster.pid" ] || return 0
    as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
}

cluster_psql() {
    local port=$1
    shift
    "$PG_BIN/psql" -X -h 127.0.0.1 -p "$port" -U postgres "$@"
}

random_token() {
    od -An -tx1 -N16 /dev/urandom | tr -d ' \n'
}

# The file names the token's variable ({"env": ...}); the value goes in here,
# from the client, as n8n/README.md shows.
load_registry() {
    local base=$1 token=$2
    shift 2
    "$@" -v registry="$(cat n8n/n8n_webhook_registry.json)" -v base="$base" -v token="$token" <<'SQL'
SELECT event_type, url, action
FROM pipeline.import_registry(jsonb_set(jsonb_set(:'registry'::jsonb, '{base_url}', to_jsonb(:'base'::text)),
                                        '{headers,X-Pipeline-Auth}', to_jsonb(:'token'::text)));
SQL
}

# Where the stage work calls Apify and MillionVerifier (the stand-ins of
# examples/outreach_standins.rs here): pipeline.set_service, which only the
# pipeline's owner may change.
point_services() {
    local base=$1
    shift
    "$@" -v base="$base" <<'SQL'
SELECT service, base_url FROM pipeline.set_service('apify', base_url => :'base');
SELECT service, base_url FROM pipeline.set_service('millionverifier', base_url => :'base');
SQL
}
