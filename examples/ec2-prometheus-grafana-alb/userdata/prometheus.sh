#!/bin/bash
# First boot of the Prometheus host: Prometheus, Alertmanager, node_exporter and the CloudWatch
# exporter as systemd services, the TSDB on the data volume. Every configuration file is pushed
# by stackwarden afterwards: prometheus.yml and the rules, alertmanager.yml, the exporter's.
set -euo pipefail
dnf install -y java-17-amazon-corretto-headless
arch=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
fetch() { curl -fsSL "https://github.com/prometheus/$1/releases/download/v$2/$1-$2.linux-${arch}.tar.gz" \
  | tar -xz -C /usr/local/bin --strip-components=1 --wildcards "$1-$2.linux-${arch}/${3}"; }
fetch prometheus 2.53.2 'prom*'
fetch alertmanager 0.27.0 '*tool'
fetch alertmanager 0.27.0 alertmanager
fetch node_exporter 1.8.2 node_exporter
curl -fsSLo /usr/local/lib/cloudwatch-exporter.jar \
  https://repo1.maven.org/maven2/io/prometheus/cloudwatch/cloudwatch_exporter/0.16.0/cloudwatch_exporter-0.16.0-jar-with-dependencies.jar
useradd --system --no-create-home --shell /sbin/nologin prometheus || true

# The data volume (/dev/sdf, an NVMe device on Nitro): format once, mount.
for _ in $(seq 60); do
  dev=$(lsblk -ndo PATH,SERIAL | awk '$2 ~ /^vol/ {print $1}' | grep -v "$(findmnt -no SOURCE /)" | head -1)
  [ -n "$dev" ] && break
  sleep 5
done
blkid "$dev" || mkfs.xfs "$dev"
mkdir -p /var/lib/prometheus /etc/prometheus /etc/alertmanager/secrets /var/lib/alertmanager
echo "UUID=$(blkid -s UUID -o value "$dev") /var/lib/prometheus xfs defaults,nofail 0 2" >> /etc/fstab
mount /var/lib/prometheus

# Secrets Alertmanager reads from files: never in the desired state.
aws secretsmanager get-secret-value --secret-id aws-monitoring/slack-webhook-url \
  --query SecretString --output text > /etc/alertmanager/secrets/slack-webhook-url
aws secretsmanager get-secret-value --secret-id aws-monitoring/ses-smtp-password \
  --query SecretString --output text > /etc/alertmanager/secrets/smtp-password
chmod 0600 /etc/alertmanager/secrets/*
chown -R prometheus: /var/lib/prometheus /var/lib/alertmanager /etc/prometheus /etc/alertmanager

unit() {
  cat > "/etc/systemd/system/$1.service" <<UNIT
[Unit]
Description=$1
After=network-online.target

[Service]
User=prometheus
ExecStart=$2
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
}
unit prometheus "/usr/local/bin/prometheus --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/var/lib/prometheus --storage.tsdb.retention.time=30d --web.enable-lifecycle"
unit alertmanager "/usr/local/bin/alertmanager --config.file=/etc/alertmanager/alertmanager.yml --storage.path=/var/lib/alertmanager"
unit node_exporter "/usr/local/bin/node_exporter"
unit cloudwatch-exporter "/usr/bin/java -jar /usr/local/lib/cloudwatch-exporter.jar 9106 /etc/prometheus/cloudwatch-exporter.yml"
[ -f /etc/prometheus/prometheus.yml ] || printf 'global:\n  scrape_interval: 15s\n' > /etc/prometheus/prometheus.yml
[ -f /etc/alertmanager/alertmanager.yml ] || printf 'route:\n  receiver: none\nreceivers:\n  - name: none\n' > /etc/alertmanager/alertmanager.yml
systemctl daemon-reload
systemctl enable --now prometheus alertmanager node_exporter
systemctl enable cloudwatch-exporter
