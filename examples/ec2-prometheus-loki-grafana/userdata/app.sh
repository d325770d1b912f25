#!/bin/bash
# First boot: the Flask app (systemd, :5000, logs in /var/log/app) and promtail. promtail's
# config is pushed by stackwarden to /etc/promtail/config.yml.
set -euo pipefail
dnf install -y python3-pip unzip
useradd --system --create-home --home-dir /opt/app app || true
pip3 install flask==3.0.0 prometheus-client==0.20.0
mkdir -p /var/log/app && chown app: /var/log/app
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
version=2.9.3
curl -fsSLo /tmp/promtail.zip "https://github.com/grafana/loki/releases/download/v${version}/promtail-linux-${arch}.zip"
unzip -o /tmp/promtail.zip -d /tmp && install -m 0755 "/tmp/promtail-linux-${arch}" /usr/local/bin/promtail
mkdir -p /etc/promtail /var/lib/promtail
cat > /etc/systemd/system/promtail.service <<'UNIT'
[Unit]
Description=Promtail
After=network-online.target

[Service]
ExecStart=/usr/local/bin/promtail -config.expand-env=true -config.file=/etc/promtail/config.yml
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now app
systemctl enable promtail
