#!/bin/bash
# First boot: Loki 2.9 as a systemd service, its data on the volume stackwarden attaches
# (/dev/sdf). Its config is pushed by stackwarden to /etc/loki/config.yml.
set -euo pipefail
dnf install -y unzip
arch=$(uname -m | sed 's/x86_64/amd64/; s/aarch64/arm64/')
version=2.9.3
curl -fsSLo /tmp/loki.zip "https://github.com/grafana/loki/releases/download/v${version}/loki-linux-${arch}.zip"
unzip -o /tmp/loki.zip -d /tmp && install -m 0755 "/tmp/loki-linux-${arch}" /usr/local/bin/loki
useradd --system --no-create-home --shell /sbin/nologin loki || true

for _ in $(seq 60); do
  dev=$(lsblk -ndo PATH,SERIAL | awk '$2 ~ /^vol/ {print $1}' | grep -v "$(findmnt -no SOURCE /)" | head -1)
  [ -n "$dev" ] && break
  sleep 5
done
blkid "$dev" || mkfs.xfs "$dev"
mkdir -p /var/lib/loki /etc/loki
echo "UUID=$(blkid -s UUID -o value "$dev") /var/lib/loki xfs defaults,nofail 0 2" >> /etc/fstab
mount /var/lib/loki
chown -R loki: /var/lib/loki

cat > /etc/systemd/system/loki.service <<'UNIT'
[Unit]
Description=Loki
After=network-online.target

[Service]
User=loki
ExecStart=/usr/local/bin/loki -config.file=/etc/loki/config.yml
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable loki
