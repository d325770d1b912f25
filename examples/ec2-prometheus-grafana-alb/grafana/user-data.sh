#!/bin/bash
# First boot of a Grafana instance: Grafana OSS from Grafana's RPM repository. Its configuration
# (grafana.ini, data sources, dashboards) is pushed by stackwarden over SSM; the push has the
# instance fetch the admin password from SSM itself with the AWS CLI, which Amazon Linux 2023
# includes (on Ubuntu, install it here: `snap install aws-cli --classic`).
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
