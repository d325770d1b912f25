#!/bin/bash
# First boot only: install node_exporter, the ADOT collector and the CloudWatch agent. Their
# configuration is not here: stackwarden pushes it over SSM once the SSM agent is up, and again
# on every change, without replacing the instance.
set -euo pipefail

dnf install -y amazon-cloudwatch-agent

arch=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
version=1.8.2
curl -fsSL "https://github.com/prometheus/node_exporter/releases/download/v${version}/node_exporter-${version}.linux-${arch}.tar.gz" \
  | tar -xz -C /usr/local/bin --strip-components=1 "node_exporter-${version}.linux-${arch}/node_exporter"
useradd --system --no-create-home --shell /sbin/nologin node_exporter || true
cat > /etc/systemd/system/node_exporter.service <<'UNIT'
[Unit]
Description=Prometheus node_exporter
After=network-online.target

[Service]
User=node_exporter
ExecStart=/usr/local/bin/node_exporter --web.listen-address=127.0.0.1:9100
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now node_exporter

rpm -Uvh "https://aws-otel-collector.s3.amazonaws.com/amazon_linux/${arch}/latest/aws-otel-collector.rpm"
systemctl enable aws-otel-collector
