#!/bin/bash
# First boot: Grafana OSS from Grafana's RPM repository. Data sources and dashboards are pushed
# by stackwarden into /etc/grafana/provisioning and /var/lib/grafana/dashboards.
set -euo pipefail
cat > /etc/yum.repos.d/grafana.repo <<'REPO'
[grafana]
name=grafana
baseurl=https://rpm.grafana.com
repo_gpgcheck=1
enabled=1
gpgcheck=1
gpgkey=https://rpm.grafana.com/gpg.key
REPO
dnf install -y grafana
mkdir -p /var/lib/grafana/dashboards
systemctl enable --now grafana-server
