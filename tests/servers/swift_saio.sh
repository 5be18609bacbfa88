#!/usr/bin/env bash
# Copied from the shared setup (../shared/s3/swift_saio.sh, with its README.md) so a clean clone has it.
# swift_saio.sh - a throw-away single-node OpenStack Swift ("Swift All In One")
# with the s3api middleware, for test suites.  Needs ONE of:
#   a) Debian 12:  apt-get install -y --no-install-recommends python3-swift
#      (Swift 2.30.1; run with the default SAIO_PYTHON=/usr/bin/python3)
#   b) PyPI:       python3 -m venv V && V/bin/pip install swift==2.38.3
#      (run with SAIO_PYTHON=V/bin/python; adds If-None-Match:* on PUT)
#
# usage:
#   swift_saio.sh start  WORKDIR [PROXY_PORT [BACKEND_BASE_PORT]]
#   swift_saio.sh run    WORKDIR [PROXY_PORT [BACKEND_BASE_PORT]]
#   swift_saio.sh stop   WORKDIR [--purge]
#   swift_saio.sh status WORKDIR
#
#  start  sets up WORKDIR (configs, rings, data dir), starts the proxy and the
#         object/container/account servers in the background (one process
#         each, workers = 0, no swift-init, no daemonising), waits until an
#         S3-signed request succeeds, prints KEY=VALUE lines and exits 0.
#         Non-zero exit (and nothing left running) if it cannot.
#  run    the same, then stays in the foreground; SIGTERM/SIGINT/exit of this
#         script stops the servers (and the servers also get SIGTERM if this
#         script is SIGKILLed, via PR_SET_PDEATHSIG).  For subprocess.Popen.
#  stop   SIGTERM (then SIGKILL after 10 s) to the PIDs in WORKDIR/run/*.pid;
#         --purge also deletes WORKDIR.  A later start in the same WORKDIR
#         keeps the data; start after --purge begins empty.
#
#  PROXY_PORT        the S3 endpoint port; 0 or absent: a free port is picked.
#  BACKEND_BASE_PORT object, container, account servers listen on BASE,
#                    BASE+1, BASE+2; 0 or absent: three free ports are picked.
#  Everything listens on 127.0.0.1 only.  WORKDIR must support user xattrs
#  (ext4, xfs, tmpfs on Linux >= 6.6: /tmp and /dev/shm here).
#
# Output of start/run (also written to WORKDIR/saio.env, shell-sourceable):
#   S3_ENDPOINT=http://127.0.0.1:PORT
#   S3_ACCESS_KEY=test:tester
#   S3_SECRET_KEY=testing
#   S3_REGION=us-east-1
#   SAIO_WORKDIR=...  SAIO_PIDS=...  SAIO_PORTS=...
#   SAIO_READY after N s
# Logs: WORKDIR/log/{proxy,object,container,account}.log
#
# Environment overrides: SAIO_ACCOUNT (test), SAIO_USER (tester),
#   SAIO_SECRET (testing), SAIO_LOG_LEVEL (INFO), SAIO_START_TIMEOUT (60),
#   SAIO_DEBUG (1: phase timings on stderr), SAIO_PYTHON (/usr/bin/python3:
#   an interpreter that can import swift - NOT the project's venv python
#   unless swift is installed in it).
set -euo pipefail

PY=${SAIO_PYTHON:-/usr/bin/python3}
ACCOUNT=${SAIO_ACCOUNT:-test}
S3USER=${SAIO_USER:-tester}
SECRET=${SAIO_SECRET:-testing}
LOG_LEVEL=${SAIO_LOG_LEVEL:-INFO}
START_TIMEOUT=${SAIO_START_TIMEOUT:-60}
SERVERS="object container account proxy"
export EVENTLET_NO_GREENDNS=yes   # ~0.3 s less start-up per process; we use IPs only

die() { echo "swift_saio: $*" >&2; exit 1; }
now() { date +%s.%N; }
T_START=$(now)
phase() {  # SAIO_DEBUG=1 prints phase timings to stderr
    [ -n "${SAIO_DEBUG:-}" ] && echo "swift_saio: +$(echo "$(now) $T_START" | awk '{printf "%.2f", $1 - $2}')s $*" >&2
    return 0
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }

pid_alive() {  # pid_alive PID WORKDIR -> 0 if PID is one of our servers
    local pid=$1 w=$2
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$w/etc/run_server.py"
}

cmd_stop() {
    local w=$1 purge=${2:-} pids="" s pid
    [ -d "$w" ] || { [ "$purge" = --purge ] && return 0; die "no such WORKDIR $w"; }
    w=$(cd "$w" && pwd)
    for s in $SERVERS; do
        pid=$(cat "$w/run/$s.pid" 2>/dev/null || true)
        if pid_alive "$pid" "$w"; then kill -TERM "$pid" 2>/dev/null || true; pids="$pids $pid"; fi
    done
    local deadline=$(( $(date +%s) + 10 ))
    for pid in $pids; do
        while pid_alive "$pid" "$w" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
        if pid_alive "$pid" "$w"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    for pid in $pids; do while pid_alive "$pid" "$w"; do sleep 0.05; done; done
    rm -f "$w"/run/*.pid
    [ -n "$pids" ] && echo "swift_saio: stopped$pids" >&2
    if [ "$purge" = --purge ]; then rm -rf "$w"; echo "swift_saio: removed $w" >&2; fi
    return 0
}

cmd_status() {
    local w s pid rc=0
    w=$(cd "$1" && pwd) || exit 1
    for s in $SERVERS; do
        pid=$(cat "$w/run/$s.pid" 2>/dev/null || true)
        if pid_alive "$pid" "$w"; then echo "$s-server running pid $pid"
        else echo "$s-server not running"; rc=1; fi
    done
    [ -f "$w/saio.env" ] && cat "$w/saio.env"
    return $rc
}

cmd_start() {
    local w=$1 proxy_port=${2:-0} base=${3:-0}
    local t0; t0=$(now)
    "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("swift") is None)' 2>/dev/null ||
        die "$PY cannot import swift: apt-get install python3-swift, or pip install swift in a venv and set SAIO_PYTHON"
    mkdir -p "$w"
    w=$(cd "$w" && pwd)
    local s pid
    for s in $SERVERS; do
        pid=$(cat "$w/run/$s.pid" 2>/dev/null || true)
        pid_alive "$pid" "$w" && die "$s-server already running in $w (pid $pid); stop it first"
    done
    mkdir -p "$w/etc" "$w/srv/node/d1" "$w/run" "$w/log"
    phase "swift importable, workdir ok"

    # --- checks and port selection (one python process) -------------------
    local ports
    ports=$("$PY" - "$w/srv/node/d1" "$proxy_port" "$base" <<'PYEOF'
import os, socket, sys, errno
d, proxy, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
f = os.path.join(d, '.xattr_probe')
open(f, 'w').close()
try:
    os.setxattr(f, 'user.swift.probe', b'x' * 256)
except OSError as e:
    sys.exit('swift_saio: %s does not support user xattrs (%s); put WORKDIR on '
             'ext4/xfs/tmpfs>=6.6, e.g. /tmp or /dev/shm' % (d, e))
finally:
    os.unlink(f)
def free(port):
    # SO_REUSEADDR as eventlet.listen() uses it: TIME_WAIT leftovers from a
    # previous instance do not count, a listener does
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(('127.0.0.1', port))
        return s.getsockname()[1]
    except OSError as e:
        sys.exit('swift_saio: port %d on 127.0.0.1 is not free: %s' % (port, e))
    finally:
        s.close()
held = []
def pick():  # hold sockets until all are chosen so we get distinct ports
    s = socket.socket(); s.bind(('127.0.0.1', 0)); held.append(s)
    return s.getsockname()[1]
p = free(proxy) if proxy else pick()
backs = [free(base + i) for i in range(3)] if base else [pick() for _ in range(3)]
print(p, *backs)
PYEOF
) || exit 1
    local pport oport cport aport
    read -r pport oport cport aport <<<"$ports"
    phase "xattr ok, ports $ports"

    # --- configuration ------------------------------------------------------
    local me; me=$(id -un)
    # keep the hash suffix of an earlier start in this WORKDIR, so that a
    # stop/start keeps the data (stop --purge resets everything)
    local suffix=""
    [ -f "$w/etc/swift.conf" ] && suffix=$(sed -n 's/^swift_hash_path_suffix = //p' "$w/etc/swift.conf")
    [ -n "$suffix" ] || suffix=$("$PY" -c 'import uuid; print(uuid.uuid4().hex)')
    cat > "$w/etc/swift.conf" <<EOF
[swift-hash]
swift_hash_path_prefix = saio
swift_hash_path_suffix = $suffix

[storage-policy:0]
name = Policy-0
default = yes
EOF
    local s port
    for s in object container account; do
        case $s in object) port=$oport;; container) port=$cport;; account) port=$aport;; esac
        cat > "$w/etc/$s-server.conf" <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $port
workers = 0
user = $me
swift_dir = $w/etc
devices = $w/srv/node
mount_check = false
disable_fallocate = true
fallocate_reserve = 0
log_level = $LOG_LEVEL
log_name = $s-server

[pipeline:main]
pipeline = $s-server

[app:$s-server]
use = egg:swift#$s
# generous timeouts for the object->container and container->account
# updates: on a loaded 2-core CI box the object server's default 1 s wait can
# expire and the PUT returns before the listing shows the object (no updater
# daemon runs here to catch up later)
conn_timeout = 5
node_timeout = 30
EOF
        if [ $s = object ]; then echo "container_update_timeout = 30" >> "$w/etc/$s-server.conf"; fi
    done
    # container-sync is not used; an empty realms file silences a warning
    : > "$w/etc/container-sync-realms.conf"
    cat > "$w/etc/proxy-server.conf" <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $pport
workers = 0
user = $me
swift_dir = $w/etc
log_level = $LOG_LEVEL
log_name = proxy-server

[pipeline:main]
# versioned_writes is auto-inserted by swift; listed to keep logs quiet
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo versioned_writes proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
conn_timeout = 5
node_timeout = 60
# one device per ring: never "error-limit" it (that would mean 60 s of 503s)
error_suppression_limit = 1000000

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:cache]
# tempauth refuses to work without a swift.cache object, but no memcached
# is needed: an empty server list makes every cache lookup a miss.
use = egg:swift#memcache
memcache_servers = ,
# 'set' is needed: a plain key cannot override [DEFAULT] in paste.deploy
set log_level = CRITICAL

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:s3api]
use = egg:swift#s3api
location = us-east-1
# AWS allows 10000 parts; swift's default is 1000
max_upload_part_num = 10000

[filter:tempauth]
use = egg:swift#tempauth
# S3 access key = "$ACCOUNT:$S3USER", secret = the key below
user_${ACCOUNT}_${S3USER} = $SECRET .admin

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo
max_manifest_segments = 10000

[filter:dlo]
use = egg:swift#dlo

[filter:versioned_writes]
use = egg:swift#versioned_writes
EOF

    # --- launcher: reads swift.conf from WORKDIR/etc instead of /etc/swift ---
    cat > "$w/etc/run_server.py" <<'PYEOF'
# python3 run_server.py SWIFT_DIR SERVER_TYPE CONF_FILE
# Runs one Swift WSGI server in the foreground.  swift.conf's location is
# hard-coded (/etc/swift/swift.conf) in swift.common.utils; point it at
# SWIFT_DIR before swift.common.storage_policy is imported.
import os, sys
swift_dir, server_type, conf_file = sys.argv[1:4]
if os.environ.get('SAIO_PDEATHSIG'):
    import ctypes, signal
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        sys.exit(0)
from swift.common import utils
utils.SWIFT_CONF_FILE = os.path.join(swift_dir, 'swift.conf')
assert 'swift.common.storage_policy' not in sys.modules
utils.validate_configuration()
from swift.common.wsgi import run_wsgi
kwargs = {}
if server_type == 'object-server':
    from swift.obj import server
    kwargs['global_conf_callback'] = server.global_conf_callback
sys.exit(run_wsgi(conf_file, server_type, verbose=True, **kwargs))
PYEOF

    phase "configs written"
    # --- rings (same result as swift-ring-builder create/add/rebalance, ----
    # --- but one process: ~1 s instead of ~12 s)                        ----
    "$PY" - "$w/etc" "$oport" "$cport" "$aport" <<'PYEOF'
import sys, os
from swift.common.ring import RingBuilder
etc = sys.argv[1]
for name, port in zip(('object', 'container', 'account'), map(int, sys.argv[2:5])):
    b = RingBuilder(8, 1, 1)   # 2^8 partitions, 1 replica, min_part_hours 1
    b.add_dev({'id': 0, 'region': 1, 'zone': 1, 'ip': '127.0.0.1', 'port': port,
               'replication_ip': '127.0.0.1', 'replication_port': port,
               'device': 'd1', 'weight': 1.0, 'meta': ''})
    b.rebalance()
    b.get_ring().save(os.path.join(etc, name + '.ring.gz'))
    b.save(os.path.join(etc, name + '.builder'))
PYEOF

    phase "rings built"
    # --- start ---------------------------------------------------------------
    for s in $SERVERS; do
        "$PY" "$w/etc/run_server.py" "$w/etc" "$s-server" "$w/etc/$s-server.conf" \
            </dev/null >>"$w/log/$s.log" 2>&1 &
        echo $! > "$w/run/$s.pid"
    done

    phase "servers launched"
    # --- readiness: every port accepts, then a SigV4-signed ListBuckets -----
    if ! "$PY" - "$pport" "$oport" "$cport" "$aport" "$ACCOUNT:$S3USER" "$SECRET" \
            "$START_TIMEOUT" "$w" <<'PYEOF'
import datetime, hashlib, hmac, http.client, os, socket, sys, time
pport, ports, ak, sk, timeout, w = (int(sys.argv[1]), sys.argv[1:5], sys.argv[5],
                                    sys.argv[6], float(sys.argv[7]), sys.argv[8])
deadline = time.time() + timeout

def alive():
    for s in ('object', 'container', 'account', 'proxy'):
        pid = int(open(os.path.join(w, 'run', s + '.pid')).read())
        if not os.path.exists('/proc/%d' % pid) or \
                open('/proc/%d/stat' % pid).read().split()[2] == 'Z':
            sys.exit('swift_saio: %s-server (pid %d) died; see %s/log/%s.log'
                     % (s, pid, w, s))

def signed_list_buckets():
    t = datetime.datetime.now(datetime.timezone.utc)
    amzdate, date = t.strftime('%Y%m%dT%H%M%SZ'), t.strftime('%Y%m%d')
    host = '127.0.0.1:%d' % pport
    payload = hashlib.sha256(b'').hexdigest()
    canon = '\n'.join(['GET', '/', '', 'host:' + host,
                       'x-amz-content-sha256:' + payload, 'x-amz-date:' + amzdate,
                       '', 'host;x-amz-content-sha256;x-amz-date', payload])
    scope = '%s/us-east-1/s3/aws4_request' % date
    sts = '\n'.join(['AWS4-HMAC-SHA256', amzdate, scope,
                     hashlib.sha256(canon.encode()).hexdigest()])
    k = ('AWS4' + sk).encode()
    for part in (date, 'us-east-1', 's3', 'aws4_request'):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    auth = ('AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=host;'
            'x-amz-content-sha256;x-amz-date, Signature=%s' % (ak, scope, sig))
    c = http.client.HTTPConnection('127.0.0.1', pport, timeout=5)
    c.request('GET', '/', headers={'Host': host, 'x-amz-date': amzdate,
                                   'x-amz-content-sha256': payload,
                                   'Authorization': auth})
    r = c.getresponse()
    return r.status, r.read()

last = None
while time.time() < deadline:
    alive()
    try:
        for p in ports[1:]:  # backends answer any request once serving
            c = http.client.HTTPConnection('127.0.0.1', int(p), timeout=5)
            c.request('OPTIONS', '/')
            c.getresponse().read()
            c.close()
        status, body = signed_list_buckets()
        if status == 200 and b'ListAllMyBucketsResult' in body:
            sys.exit(0)
        last = 'ListBuckets -> %s %r' % (status, body[:300])
    except OSError as e:
        last = repr(e)
    time.sleep(0.1)
sys.exit('swift_saio: not ready after %ss: %s' % (timeout, last))
PYEOF
    then
        echo "swift_saio: start failed; last log lines:" >&2
        tail -n 20 "$w"/log/*.log >&2 || true
        cmd_stop "$w" >&2 || true
        exit 1
    fi

    phase "ready"
    local pids=""
    for s in $SERVERS; do pids="$pids${pids:+,}$s:$(cat "$w/run/$s.pid")"; done
    cat > "$w/saio.env" <<EOF
S3_ENDPOINT=http://127.0.0.1:$pport
S3_ACCESS_KEY=$ACCOUNT:$S3USER
S3_SECRET_KEY=$SECRET
S3_REGION=us-east-1
SAIO_WORKDIR=$w
SAIO_PIDS=$pids
SAIO_PORTS=proxy:$pport,object:$oport,container:$cport,account:$aport
EOF
    cat "$w/saio.env"
    echo "SAIO_READY after $(echo "$(now) - $t0" | awk '{printf "%.1f", $1 - $3}') s"
}

[ $# -ge 2 ] || usage
action=$1; workdir=$2; shift 2
case $action in
    start) cmd_start "$workdir" "$@" ;;
    run)
        export SAIO_PDEATHSIG=1
        trap 'trap - EXIT; cmd_stop "$workdir"; exit 0' TERM INT HUP
        trap 'cmd_stop "$workdir"' EXIT
        cmd_start "$workdir" "$@"
        parent=$PPID
        # stay in the foreground until signalled, a server dies, or the
        # process that started us (the test runner) is gone
        while :; do
            st=$(cat /proc/$$/stat); st=${st##*) }; set -- $st
            [ "$2" = "$parent" ] ||
                { echo "swift_saio: parent $parent exited; stopping" >&2; exit 0; }
            for s in $SERVERS; do
                pid=$(cat "$workdir/run/$s.pid" 2>/dev/null || true)
                pid_alive "$pid" "$(cd "$workdir" && pwd)" ||
                    { echo "swift_saio: $s-server exited; stopping" >&2; exit 1; }
            done
            sleep 1 & wait $! || true
        done ;;
    stop) cmd_stop "$workdir" "$@" ;;
    status) cmd_status "$workdir" ;;
    *) usage ;;
esac
