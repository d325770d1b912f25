#!/bin/bash
# First boot of a Grafana instance: Grafana OSS from Grafana's RPM repository. Its configuration
# (grafana.ini, data sources, dashboards, the admin password) is pushed by stackwarden over SSM.
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
systemctl enable --now grafana-server
