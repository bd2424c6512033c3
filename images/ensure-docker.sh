#!/usr/bin/env bash
# A running Docker engine (and debootstrap, for the offline base image) for the image tests:
# nothing to do when an engine answers; otherwise, as root on Debian, install docker.io and
# start dockerd in the background. Anything else gets one line and exit 2.
set -euo pipefail
need_debootstrap=0
command -v debootstrap >/dev/null || need_debootstrap=1
if docker info >/dev/null 2>&1 && ((!need_debootstrap)); then
  exit 0
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "ensure-docker: no running Docker engine (or no debootstrap), and installing them needs root on Debian" >&2
  exit 2
fi
install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
  }
}
((need_debootstrap)) && install debootstrap
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || install docker.io containerd iptables
  log=/var/log/cubebench-dockerd.log
  nohup dockerd >"$log" 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
  done
  echo "ensure-docker: dockerd did not start; see $log" >&2
  exit 1
fi
