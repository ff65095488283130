#!/usr/bin/env bash
# Installs the Debian packages the project needs when they are missing: nginx, prometheus and
# prometheus-alertmanager for the stack, chromium and docker-compose for the browser and
# compose checks, wrk for the benchmark. As root it installs them; otherwise it prints the
# command to run and fails, so nothing half-works.
set -euo pipefail
want=("$@")
[ ${#want[@]} -gt 0 ] || want=(nginx prometheus prometheus-alertmanager)
missing=()
for pkg in "${want[@]}"; do
  case "$pkg" in
    nginx) command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx) ;;
    prometheus) command -v prometheus >/dev/null || [ -x /usr/bin/prometheus ] || missing+=(prometheus) ;;
    prometheus-alertmanager) [ -x /usr/bin/prometheus-alertmanager ] || missing+=(prometheus-alertmanager) ;;
    chromium) [ -x /usr/bin/chromium ] || missing+=(chromium) ;;
    *) dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg") ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${missing[*]}; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the packaged services; the fleet runs its own under its run directory.
for svc in nginx prometheus prometheus-alertmanager; do
  if [[ " ${missing[*]} " == *" $svc "* ]]; then
    (command -v systemctl >/dev/null && systemctl disable --now "$svc" >/dev/null 2>&1) || true
    (command -v service >/dev/null && service "$svc" stop >/dev/null 2>&1) || true
  fi
done
