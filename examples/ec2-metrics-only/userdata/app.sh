#!/bin/bash
# First boot: the Flask app (systemd, :8080, /metrics) and node_exporter (:9100).
set -euo pipefail
dnf install -y python3-pip
useradd --system --create-home --home-dir /opt/app app || true
pip3 install flask==3.0.0 prometheus-client==0.20.0
# The application itself is deployed by its own pipeline into /opt/app.
cat > /etc/systemd/system/app.service <<'UNIT'
[Unit]
Description=Flask application
After=network-online.target

[Service]
User=app
WorkingDirectory=/opt/app
ExecStart=/usr/bin/python3 /opt/app/app.py
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT

arch=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
version=1.8.2
curl -fsSL "https://github.com/prometheus/node_exporter/releases/download/v${version}/node_exporter-${version}.linux-${arch}.tar.gz" \
  | tar -xz -C /usr/local/bin --strip-components=1 "node_exporter-${version}.linux-${arch}/node_exporter"
useradd --system --no-create-home --shell /sbin/nologin node_exporter || true
touch /etc/default/node_exporter
cat > /etc/systemd/system/node_exporter.service <<'UNIT'
[Unit]
Description=Prometheus node_exporter
After=network-online.target

[Service]
User=node_exporter
EnvironmentFile=/etc/default/node_exporter
ExecStart=/usr/local/bin/node_exporter $ARGS
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now node_exporter app
