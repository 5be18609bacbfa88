#!/usr/bin/env bash
# Installs the real servers and tools the test suite talks to, when missing.
# Needs root (CI and the dev machines run as root); otherwise prints what is missing.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
# packaging/logrotate/hmacfs is run with the real logrotate (tests/test_packaging, test_nginx).
command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || need+=(logrotate)
# tests/test_prosody starts its own Prosody; mod_http_upload_external comes from prosody-modules.
command -v prosody >/dev/null 2>&1 || need+=(prosody)
[ -f /usr/lib/prosody/modules/mod_http_upload_external/mod_http_upload_external.lua ] || need+=(prosody-modules)
# tests/test_ejabberd starts its own ejabberd (mod_http_upload with external_secret).
[ -x /usr/sbin/ejabberdctl ] || need+=(ejabberd)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts the packaged services; the tests start their own on free ports.
systemctl disable --now redis-server nginx prosody ejabberd >/dev/null 2>&1 || true
service redis-server stop >/dev/null 2>&1 || true
service nginx stop >/dev/null 2>&1 || true
service prosody stop >/dev/null 2>&1 || true
service ejabberd stop >/dev/null 2>&1 || true
# Installing ejabberd leaves Erlang's port mapper running on every interface; the
# test's ejabberd uses a fixed loopback distribution port and needs none.
if printf '%s\n' "${need[@]}" | grep -qx ejabberd; then
  /usr/bin/epmd -kill >/dev/null 2>&1 || true
fi
