#!/usr/bin/env bash
# Makes sure `prometheus` and `promtool` are installed for the deployment tests: installs Debian's
# prometheus package when either is missing (its system service is never started; the tests run
# their own Prometheus on a free port). Prints the directory holding both binaries on stdout.
set -euo pipefail

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "prometheus.sh: installing Prometheus (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d keeps the package's post-install step from starting the system service.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1
    fi
    trap 'if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

prometheus_bin=$(command -v prometheus)
promtool_bin=$(command -v promtool)
if [ "$(dirname "$prometheus_bin")" != "$(dirname "$promtool_bin")" ]; then
    echo "prometheus.sh: prometheus ($prometheus_bin) and promtool ($promtool_bin) are in different directories" >&2
    exit 1
fi
dirname "$prometheus_bin"
