#!/bin/bash
# First boot: Prometheus as a systemd service, its TSDB on the data volume (/dev/sdf, which
# Nitro instances expose as an NVMe device). prometheus.yml is pushed by stackwarden.
set -euo pipefail
arch=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
version=2.53.2
curl -fsSL "https://github.com/prometheus/prometheus/releases/download/v${version}/prometheus-${version}.linux-${arch}.tar.gz" \
  | tar -xz -C /usr/local/bin --strip-components=1 \
      "prometheus-${version}.linux-${arch}/prometheus" "prometheus-${version}.linux-${arch}/promtool"
useradd --system --no-create-home --shell /sbin/nologin prometheus || true

# Wait for the data volume stackwarden attaches, format it once, mount it.
for _ in $(seq 60); do
  dev=$(lsblk -ndo PATH,SERIAL | awk '$2 ~ /^vol/ {print $1}' | grep -v "$(findmnt -no SOURCE /)" | head -1)
  [ -n "$dev" ] && break
  sleep 5
done
blkid "$dev" || mkfs.xfs "$dev"
mkdir -p /var/lib/prometheus
echo "UUID=$(blkid -s UUID -o value "$dev") /var/lib/prometheus xfs defaults,nofail 0 2" >> /etc/fstab
mount /var/lib/prometheus
mkdir -p /etc/prometheus
chown -R prometheus: /var/lib/prometheus /etc/prometheus

cat > /etc/systemd/system/prometheus.service <<'UNIT'
[Unit]
Description=Prometheus
After=network-online.target

[Service]
User=prometheus
ExecStart=/usr/local/bin/prometheus --config.file=/etc/prometheus/prometheus.yml \
  --storage.tsdb.path=/var/lib/prometheus --web.enable-lifecycle
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
[ -f /etc/prometheus/prometheus.yml ] || printf 'global:\n  scrape_interval: 15s\n' > /etc/prometheus/prometheus.yml
systemctl daemon-reload
systemctl enable --now prometheus
