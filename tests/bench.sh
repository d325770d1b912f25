#!/usr/bin/env bash
# Benchmarks: prints the figures of the README's table. Builds the release binaries, starts the
# emulator (and its moto) on a free loopback port, then measures with the operator's own call
# counter (--stats) and /usr/bin/time -v:
#   - a cold converge of the default stack, and a converged plan of it;
#   - the same cold converge (as another stack) while the emulator throttles 30% of all calls
#     and answers 5% with 500 or 503;
#   - the daemon on the converged default stack for 1,000 passes: resident memory along the way,
#     CPU time and AWS calls per pass, and from those the calls per hour at the default resync;
#   - a host_config push to 1,000 running instances, and the converged pass after it;
#   - a synthetic desired state of 5,000 IAM roles, reconciled, then planned: the plan's pure
#     diff time (logged by `plan` as `diff computed`), apart from its AWS reads;
#   - commit-to-first-write latency under the daemon while an alertmanager definition takes 3
#     minutes to be checked;
#   - the seed 000 example (host, volume, Grafana group behind HTTPS), cold and converged.
# Usage: tests/bench.sh [HOSTS]   (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/install.sh
hosts="${1:-1000}"

cargo build --quiet --release --bin stackwarden
cargo build --quiet --release -p stackwarden-emulator
bin=target/release/stackwarden
work=$(mktemp -d /tmp/stackwarden-bench.XXXXXX)
trap 'kill $EMULATOR_PID 2>/dev/null; rm -rf "$work"' EXIT
coproc EMULATOR { exec target/release/stackwarden-emulator --listen 127.0.0.1:0 \
  --moto-server .venv/bin/moto_server 2>"$work/emulator.log"; }
read -r line <&"${EMULATOR[0]}"
export AWS_ENDPOINT_URL="${line#endpoint=}" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true STACKWARDEN_POLL_INTERVAL=200ms RUST_LOG=error

# run NAME ARGS...: runs the operator, keeps its statistics and time's report.
run() {
  local name=$1; shift
  /usr/bin/time -v -o "$work/$name.time" "$bin" "$@" --stats >"$work/$name.out" 2>"$work/$name.err" || true
}
calls() { grep -m1 '^AWS API calls' "$work/$1.err" | sed 's/AWS API calls: //'; }
op() { awk -v op="$2" '$3 == op { n += $1 } END { print n + 0 }' "$work/$1.err"; }
service() { awk -v s="$2" '$2 == s { n += $1 } END { print n + 0 }' "$work/$1.err"; }
wall() { sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$work/$1.time"; }
rss() { awk '/Maximum resident set size/ { printf "%.0f MiB", $6 / 1024 }' "$work/$1.time"; }

cp -r desired "$work/stack"
run cold reconcile --once "$work/stack"
run converged plan "$work/stack"

# The same cold converge under faults: another stack name, so nothing of the first is reused.
cp -r desired "$work/faulted"
sed -i 's/^name = "monitoring"/name = "faulted"/' "$work/faulted/stack.toml"
fault() { curl -sf -X POST -H 'content-type: application/json' "$AWS_ENDPOINT_URL/_emulator/faults" -d "$1" >/dev/null; }
fault '{"kind": {"type": "throttle"}, "rate": 0.3}'
fault '{"kind": {"type": "server_error", "status": 500}, "rate": 0.0357}'
fault '{"kind": {"type": "server_error", "status": 503}, "rate": 0.037}'
run faulted reconcile --once "$work/faulted"
curl -sf -X DELETE "$AWS_ENDPOINT_URL/_emulator/faults" >/dev/null
faulted_calls=$(curl -sf "$AWS_ENDPOINT_URL/_emulator/calls" |
  .venv/bin/python -c 'import json, sys; print(sum(1 for c in json.load(sys.stdin) if c["fault"]))')

# Commit-to-first-write latency while a slow object waits: another copy of the default stack
# under a daemon, its alertmanager definition taking 3 minutes to be checked; once the first pass
# is done, a role's description is changed, and the time until UpdateRole reaches the emulator
# is measured (the emulator's call log polled every 10 ms).
cp -r desired "$work/slow"
sed -i 's/^name = "monitoring"/name = "slow"/' "$work/slow/stack.toml"
curl -sf -X PUT -H 'content-type: application/json' "$AWS_ENDPOINT_URL/_emulator/settings" \
  -d '{"transition_delay": 180000}' >/dev/null
RUST_LOG=info "$bin" reconcile --listen 127.0.0.1:0 --log-format json "$work/slow" >/dev/null 2>"$work/slow.err" &
slow_pid=$!
trap 'kill $slow_pid $EMULATOR_PID 2>/dev/null; rm -rf "$work"' EXIT
.venv/bin/python - "$work/slow.err" "$work/slow/iam.toml" >"$work/slow.txt" <<'PY'
import json, os, sys, time, urllib.request
import boto3
log, iam_toml = sys.argv[1], sys.argv[2]
endpoint = os.environ["AWS_ENDPOINT_URL"]
deadline = time.time() + 120
while "pass done" not in open(log).read():
    assert time.time() < deadline, "the daemon finished no pass"
    time.sleep(0.05)
def updates():
    calls = json.load(urllib.request.urlopen(f"{endpoint}/_emulator/calls"))
    return sum(1 for c in calls if c["operation"] == "UpdateRole")
before = updates()
text = open(iam_toml).read()
changed = text.replace('description = "Prometheus host:', 'description = "The Prometheus host:', 1)
assert changed != text
start = time.monotonic()
with open(iam_toml, "w") as f:
    f.write(changed)
while updates() == before:
    assert time.monotonic() - start < 60, "the change never reached AWS"
    time.sleep(0.01)
latency = time.monotonic() - start
amp = boto3.client("amp", endpoint_url=endpoint, region_name="us-east-1")
statuses = []
for ws in amp.list_workspaces()["workspaces"]:
    if ws.get("tags", {}).get("stackwarden:stack") == "slow":
        d = amp.describe_alert_manager_definition(workspaceId=ws["workspaceId"])
        statuses.append(d["alertManagerDefinition"]["status"]["statusCode"])
print(f"latency_ms={latency * 1000:.0f}")
print(f"definition={'/'.join(statuses)}")
PY
kill -TERM "$slow_pid"; wait "$slow_pid" || true
curl -sf -X PUT -H 'content-type: application/json' "$AWS_ENDPOINT_URL/_emulator/settings" \
  -d '{"transition_delay": 0}' >/dev/null
slow() { sed -n "s/^$1=//p" "$work/slow.txt"; }

# The seed 000 example: a Prometheus host with its EBS volume, Alertmanager, and a Grafana group
# behind an HTTPS load balancer, with what the example asks a user to fill in.
cp -r examples/ec2-prometheus-grafana-alb "$work/seed000"
.venv/bin/python - "$work/seed000/grafana.toml" <<'PY'
import os, sys, boto3
kw = dict(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
ec2, iam, ssm = (boto3.client(s, **kw) for s in ("ec2", "iam", "ssm"))
subnets = sorted(s["SubnetId"] for s in ec2.describe_subnets(
    Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"])
cert = iam.upload_server_certificate(ServerCertificateName="grafana-bench",
    CertificateBody="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    PrivateKey="-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
ssm.put_parameter(Name="/monitoring/grafana-admin", Value="correct horse battery staple",
    Type="SecureString", Overwrite=True)
text = open(sys.argv[1]).read()
for group in ("a", "b"):
    for i in (1, 2):
        text = text.replace(f"subnet-0{group * 15}{i}", subnets[i - 1])
text = text.replace(
    "arn:aws:acm:us-east-1:123456789012:certificate/0c1d2e3f-4a5b-6c7d-8e9f-0a1b2c3d4e5f",
    cert["ServerCertificateMetadata"]["Arn"])
open(sys.argv[1], "w").write(text)
PY
run seed000cold reconcile --once "$work/seed000"
run seed000 plan "$work/seed000"

# The daemon, converged, resyncing as fast as it can (10 ms, no rate limit) for 1,000 passes.
RUST_LOG=info "$bin" reconcile --resync 10ms --rate-limit '*=100000' --listen 127.0.0.1:0 \
  --log-format json "$work/stack" >/dev/null 2>"$work/daemon.err" &
daemon_pid=$!
trap 'kill $daemon_pid $EMULATOR_PID 2>/dev/null; rm -rf "$work"' EXIT
.venv/bin/python - "$daemon_pid" "$work/daemon.err" >"$work/daemon.txt" <<'PY'
import json, os, sys, time, urllib.request
pid, log = int(sys.argv[1]), sys.argv[2]
address = None
deadline = time.time() + 60
while address is None:
    assert time.time() < deadline, "the daemon logged no address"
    time.sleep(0.05)
    for line in open(log):
        try:
            address = json.loads(line)["fields"].get("address") or address
        except ValueError:
            pass
def passes():
    return json.load(urllib.request.urlopen(f"http://{address}/status"))["passes"]
def calls():
    text = urllib.request.urlopen(f"http://{address}/metrics").read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith("stackwarden_aws_calls_total{"))
def rss_mib():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) / 1024
def cpu_seconds():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
samples = {}
for target in (100, 500, 1000):
    deadline = time.time() + 1800
    while passes() < target:
        assert time.time() < deadline, "the daemon stopped making passes"
        time.sleep(0.1)
    samples[target] = (passes(), rss_mib(), cpu_seconds(), calls())
(p0, _, c0, a0), (p1, _, c1, a1) = samples[100], samples[1000]
per_pass = (a1 - a0) / (p1 - p0)
print("rss=" + " / ".join(f"{samples[t][1]:.1f}" for t in (100, 500, 1000)))
print(f"cpu_ms={(c1 - c0) / (p1 - p0) * 1000:.1f}")
print(f"calls_per_pass={per_pass:.1f}")
print(f"calls_per_hour={per_pass * 3600 / 60:.0f}")
PY
kill -TERM "$daemon_pid"; wait "$daemon_pid" || true
daemon() { sed -n "s/^$1=//p" "$work/daemon.txt"; }

.venv/bin/python - "$hosts" <<'PY'
import os, sys, boto3
ec2 = boto3.client("ec2", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
left = int(sys.argv[1])
while left:
    n = min(left, 250)
    ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=n, MaxCount=n,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Role", "Value": "app"}]}])
    left -= n
PY
mkdir -p "$work/stack/hosts"
echo 'ARGS=--collector.systemd' > "$work/stack/hosts/node_exporter.env"
cat > "$work/stack/fleet.toml" <<'TOML'
[host_config.node_exporter]
targets = { Role = "app" }
files = [{ path = "/etc/default/node_exporter", source = "hosts/node_exporter.env" }]
reload = "true"
max_concurrency = "100%"
TOML
run push reconcile --once "$work/stack"
run fleet plan "$work/stack"

# 5,000 resources: created once (no rate limit), then one converged plan.
mkdir -p "$work/big"
{ printf '[stack]\nname = "big"\n'
  for i in $(seq 1 5000); do
    printf '[iam.role.r%d]\ntrust = { services = ["ec2.amazonaws.com"] }\n' "$i"
  done; } > "$work/big/stack.toml"
run bigcold reconcile --once --rate-limit '*=100000' --concurrency 16 "$work/big"
RUST_LOG=stackwarden=info run bigplan plan "$work/big"
diff_ms() { sed 's/\x1b\[[0-9;]*m//g' "$work/bigplan.err" | sed -n 's/.*diff computed.*micros=\([0-9]*\).*/\1/p' | awk '{ printf "%.1f ms", $1 / 1000 }'; }

echo
echo "| measurement | AWS API calls | wall time | max RSS |"
echo "|---|---|---|---|"
echo "| cold reconcile --once, default stack | $(calls cold) | $(wall cold) | $(rss cold) |"
echo "| converged plan, default stack | $(calls converged) | $(wall converged) | $(rss converged) |"
echo "| cold reconcile --once, default stack, 30% throttled and 5% server errors | $(calls faulted); $faulted_calls answered by a fault | $(wall faulted) (exit $(sed -n 's/.*Exit status: //p' "$work/faulted.time")) | $(rss faulted) |"
echo "| daemon, converged default stack, passes 100 / 500 / 1,000 | $(daemon calls_per_pass) per pass (reads); $(daemon calls_per_hour) per hour at the default 60 s resync | $(daemon cpu_ms) ms CPU per pass | $(daemon rss) MiB |"
echo "| host_config push to $hosts instances | $(calls push); SendCommand $(op push SendCommand), status reads $(( $(op push ListCommands) + $(op push ListCommandInvocations) )) | $(wall push) | $(rss push) |"
echo "| converged plan, 5,000 IAM roles | $(calls bigplan) | $(wall bigplan); diff alone $(diff_ms) | $(rss bigplan) |"
echo "| commit to first write, while the alertmanager definition is checked for 3 minutes (still $(slow definition)) | | $(slow latency_ms) ms | |"
echo "| cold reconcile --once, seed 000 example (exit $(sed -n 's/.*Exit status: //p' "$work/seed000cold.time")) | $(calls seed000cold) | $(wall seed000cold) | $(rss seed000cold) |"
echo "| converged plan, seed 000 example | $(calls seed000) | $(wall seed000) | $(rss seed000) |"
echo "| converged plan with $hosts fleet hosts | $(calls fleet); SSM $(service fleet SSM) | $(wall fleet) | $(rss fleet) |"
echo
echo "Converged plan of the default stack, calls by operation:"
sed -n '/^AWS API calls/,$ { /^  /p }' "$work/converged.err"
echo
echo "Converged plan of the seed 000 example, calls by operation:"
sed -n '/^AWS API calls/,$ { /^  /p }' "$work/seed000.err"
