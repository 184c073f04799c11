#!/usr/bin/env bash
# Debian packages that shardq's tests and benchmarks use as real servers and
# tools. This file is the one list; `make test` and `make bench` call it.
#
#   scripts/ci_packages.sh test    # what the test suite needs
#   scripts/ci_packages.sh bench   # what the peer benchmarks need
#
# Installed only when missing, and only as root; otherwise it names what is
# missing and the tests that need it skip (outside CI) or fail (CI=true).
set -euo pipefail
case "${1:-test}" in
    test)
        # chromium: the dashboard test; prometheus (+ promtool): the
        # observability tier and the alert-rule tests; podman & co: the image
        # tier and the kind-less Kubernetes end-to-end tier; containerd & co:
        # the real-node tier (scripts/k8s/real_node.sh: its pods' runtime,
        # network plugins, kube-proxy's conntrack and iptables, the control
        # plane's etcd, and gcc for the pause image).
        packages=(chromium prometheus podman buildah runc debootstrap uidmap
                  slirp4netns fuse-overlayfs containerd containernetworking-plugins
                  conntrack iptables etcd-server gcc libc6-dev) ;;
    bench)
        # the peers of loadtest/bench_peers.py (BullMQ runs on nodejs/npm).
        packages=(redis-server beanstalkd nodejs npm) ;;
    *)  echo "usage: $0 test|bench" >&2; exit 2 ;;
esac
need=()
for pkg in "${packages[@]}"; do
    case "$pkg" in
        # a Node.js from elsewhere (NodeSource's nodejs bundles npm and
        # conflicts with Debian's npm) serves as well as Debian's
        nodejs|npm) command -v "${pkg/nodejs/node}" >/dev/null 2>&1 && continue ;;
    esac
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${need[*]} (run as root to install them)" >&2
    exit 0
fi
echo "installing Debian packages: ${need[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
