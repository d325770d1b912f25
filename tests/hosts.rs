//! Hosts against the emulator (moto's EC2 and EBS, the emulator's Run Command) with a real
//! Prometheus in the host's sandbox: launched from empty with its volume and security group,
//! config changes pushed without replacing anything, a config promtool rejects leaving the old
//! one live, and out-of-band drift corrected.

use aws_sdk_ec2::types::Filter;
use stackwarden_emulator::{PublicImage, Settings};

use stackwarden_controllers::change::digest;

use crate::harness::{default_stack, edit, path_str, stackwarden, stackwarden_with, Aws};
use crate::prometheus::Prometheus;

const HOSTS: &str = r#"# The Prometheus host
[host.prometheus]
ami = "resolve:ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
instance_type = "t3.medium"
instance_profile = "${iam.instance_profile.prometheus.name}"
user_data = "userdata/prometheus.sh"
security_group = { ingress = [{ port = 9090, cidrs = ["10.0.0.0/16"] }] }
volumes = [{ device = "/dev/sdf", size_gib = 50 }]

[host.prometheus.prometheus]
scrape_interval = "30s"
rule_files = ["rules/node.yml"]
scrape = [{ job = "node", ec2_port = 9100, ec2_tags = { Role = "app" } }]
remote_write = { url = "${amp.workspace.main.remote_write_url}" }
"#;

/// The emulator, a Prometheus in the one sandbox every instance runs its commands in, and the
/// default stack with a Prometheus host.
struct Fixture {
    aws: Aws,
    prometheus: Prometheus,
    dir: tempfile::TempDir,
    _root: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(Settings::default())
    }

    /// With these emulator settings (the sandbox and Prometheus are the fixture's).
    fn with(settings: Settings) -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let prometheus = Prometheus::start(root.path());
        let aws = Aws::with(Settings {
            shared_sandbox: Some(root.path().to_path_buf()),
            ..settings
        });
        let dir = default_stack();
        let hosts = HOSTS.replace(
            "scrape_interval = \"30s\"\n",
            &format!("scrape_interval = \"30s\"\nurl = \"{}\"\n", prometheus.url),
        );
        std::fs::write(dir.path().join("hosts.toml"), hosts).unwrap();
        std::fs::create_dir_all(dir.path().join("userdata")).unwrap();
        std::fs::write(
            dir.path().join("userdata/prometheus.sh"),
            "#!/bin/bash\ndnf install -y prometheus\n",
        )
        .unwrap();
        Fixture {
            aws,
            prometheus,
            dir,
            _root: root,
        }
    }

    fn d(&self) -> &str {
        path_str(self.dir.path())
    }

    fn reconcile(&self) -> crate::harness::Run {
        stackwarden(Some(&self.aws.endpoint), &["reconcile", "--once", self.d()])
    }

    /// One `reconcile --once` that repairs one part: exactly these writes of the kinds that
    /// make or replace something, none of the others; the instance and the group keep their
    /// ids.
    async fn repair(&self, writes: &[(&str, u64)]) {
        let before = (self.instances().await, self.group_id().await);
        let run = self.reconcile();
        run.expect(0);
        for operation in [
            "RunInstances",
            "TerminateInstances",
            "StopInstances",
            "CreateSecurityGroup",
            "CreateVolume",
            "AttachVolume",
            "AuthorizeSecurityGroupIngress",
            "RevokeSecurityGroupIngress",
            "ModifyInstanceAttribute",
            "SendCommand",
        ] {
            let want = writes
                .iter()
                .find(|(o, _)| *o == operation)
                .map_or(0, |(_, n)| *n);
            assert_eq!(run.count(operation), want, "{operation}:\n{}", run.stderr);
        }
        assert_eq!(
            (self.instances().await, self.group_id().await),
            before,
            "the same instance and security group"
        );
    }

    /// The host's security group.
    async fn group_id(&self) -> String {
        let out = self
            .aws
            .ec2()
            .await
            .describe_security_groups()
            .filters(
                Filter::builder()
                    .name("tag:stackwarden:id")
                    .values("host.prometheus.security_group")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(out.security_groups().len(), 1);
        out.security_groups()[0].group_id().unwrap().to_string()
    }

    fn plan(&self) -> crate::harness::Run {
        stackwarden(Some(&self.aws.endpoint), &["plan", self.d()])
    }

    /// (instance id, state) of the stack's live instances.
    async fn instances(&self) -> Vec<(String, String)> {
        let mut all = self.every_instance().await;
        all.retain(|(_, s)| s != "terminated");
        all
    }

    /// (instance id, state) of every instance the host ever had that EC2 still lists,
    /// terminated ones included.
    async fn every_instance(&self) -> Vec<(String, String)> {
        let ec2 = self.aws.ec2().await;
        let out = ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:stackwarden:id")
                    .values("host.prometheus")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap().to_string(),
                    i.state().unwrap().name().unwrap().as_str().to_string(),
                )
            })
            .collect()
    }

    async fn volume(&self) -> aws_sdk_ec2::types::Volume {
        let ec2 = self.aws.ec2().await;
        let out = ec2
            .describe_volumes()
            .filters(
                Filter::builder()
                    .name("tag:stackwarden:id")
                    .values("host.prometheus.volume.sdf")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            out.volumes().len(),
            1,
            "one data volume, its node's: {:?}",
            out.volumes()
        );
        out.volumes()[0].clone()
    }
}

fn ssm_calls(run: &crate::harness::Run) -> usize {
    run.stderr
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("SSM"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_is_launched_and_config_changes_reach_it_without_replacing_anything() {
    let f = Fixture::new();
    let pid = f.prometheus.pid();
    let cold = f.reconcile();
    cold.expect(0);
    assert!(
        ssm_calls(&cold) > 0,
        "the push is counted:\n{}",
        cold.stderr
    );

    let instances = f.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    let (instance, state) = &instances[0];
    assert_eq!(state, "running");
    let ssm = f.aws.ssm().await;
    let ami = ssm
        .get_parameter()
        .name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
        .send()
        .await
        .unwrap()
        .parameter
        .unwrap()
        .value
        .unwrap();
    let ec2 = f.aws.ec2().await;
    let described = ec2
        .describe_instances()
        .instance_ids(instance)
        .send()
        .await
        .unwrap();
    let launched = &described.reservations()[0].instances()[0];
    assert_eq!(
        launched.image_id(),
        Some(ami.as_str()),
        "resolve:ssm: resolved"
    );
    assert_eq!(
        launched
            .metadata_options()
            .and_then(|m| m.http_tokens())
            .map(|t| t.as_str()),
        Some("required"),
        "IMDSv2"
    );
    assert_eq!(
        root_volume(&ec2, launched).await,
        ("/dev/xvda".to_string(), 20, true),
        "the encrypted root volume at Amazon Linux's root device"
    );
    let volume = f.volume().await;
    assert_eq!(volume.size(), Some(50));
    assert_eq!(
        volume.attachments()[0].instance_id(),
        Some(instance.as_str())
    );
    let config = f.prometheus.running_config();
    assert!(config.contains("job_name: node"), "{config}");
    assert!(config.contains("/api/v1/remote_write"), "{config}");
    assert!(config.contains("scrape_interval: 30s"), "{config}");

    let plan = f.plan();
    plan.expect(0);
    assert!(
        !plan.stderr.contains("DescribeSubnets"),
        "subnets are looked up only when launching:\n{}",
        plan.stderr
    );
    assert_eq!(
        ssm_calls(&plan),
        0,
        "a converged pass sends no SSM call:\n{}",
        plan.stderr
    );

    // A config change is pushed to the same instance and the same Prometheus process.
    edit(
        f.dir.path(),
        "hosts.toml",
        "scrape_interval = \"30s\"",
        "scrape_interval = \"20s\"",
    );
    let plan = f.plan();
    plan.expect(2);
    assert!(
        plan.stdout.contains("prometheus: sha256:"),
        "{}",
        plan.stdout
    );
    f.reconcile().expect(0);
    assert!(f
        .prometheus
        .running_config()
        .contains("scrape_interval: 20s"));
    assert_eq!(f.prometheus.pid(), pid);
    assert_eq!(&f.instances().await[0].0, instance, "no new instance");

    // User data changes never replace the instance; plan says so in plain words, only once
    // the file differs from what the instance booted with.
    assert!(
        !plan.stdout.contains("user data"),
        "unchanged user data: nothing said\n{}",
        plan.stdout
    );
    std::fs::write(
        f.dir.path().join("userdata/prometheus.sh"),
        "#!/bin/bash\necho v2\n",
    )
    .unwrap();
    let plan = f.plan();
    plan.expect(0);
    assert!(
        plan.stdout.contains(&format!(
            "user data changed ({} → {}): it runs at first boot only, so {instance} keeps what it booted with",
            digest("#!/bin/bash\ndnf install -y prometheus\n"),
            digest("#!/bin/bash\necho v2\n")
        )),
        "{}",
        plan.stdout
    );
    let run = f.reconcile();
    run.expect(0);
    assert_eq!(run.count("RunInstances"), 0);
    assert_eq!(&f.instances().await[0].0, instance);
    f.plan().expect(0);
}

/// The device, size and encryption of an instance's root volume: its only block device but
/// its data volumes.
async fn root_volume(
    ec2: &aws_sdk_ec2::Client,
    instance: &aws_sdk_ec2::types::Instance,
) -> (String, i32, bool) {
    let roots: Vec<_> = instance
        .block_device_mappings()
        .iter()
        .filter(|m| {
            let device = m.device_name().unwrap_or_default();
            let letter = device
                .strip_prefix("/dev/sd")
                .or_else(|| device.strip_prefix("/dev/xvd"));
            !matches!(letter, Some(l) if l.len() == 1 && ("f"..="p").contains(&l))
        })
        .collect();
    assert_eq!(
        roots.len(),
        1,
        "one root device: {:?}",
        instance.block_device_mappings()
    );
    let id = roots[0].ebs().and_then(|e| e.volume_id()).unwrap();
    let volume = ec2.describe_volumes().volume_ids(id).send().await.unwrap();
    let volume = &volume.volumes()[0];
    (
        roots[0].device_name().unwrap().to_string(),
        volume.size().unwrap(),
        volume.encrypted().unwrap(),
    )
}

const CANONICAL: &str = "099720109477";
const JAMMY: &str = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-";

fn published(owner: &str, name: &str, created: &str, deprecated: bool) -> PublicImage {
    PublicImage {
        deprecated,
        ..PublicImage::new(owner, name, created)
    }
}

/// The seed's `data "aws_ami"`: the most recent of Canonical's jammy images, as Terraform picks
/// it: not a deprecated one, not another owner's of the same name, not an arm64 one; its root
/// volume at Ubuntu's `/dev/sda1`. A newer image later never replaces the instance.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_from_an_ami_name_pattern_runs_the_newest_image_with_its_root_at_its_device() {
    let aws = Aws::start();
    let publish = |owner: &str, name: String, created: &str, deprecated: bool| {
        aws.emulator
            .publish_image(published(owner, &name, created, deprecated))
    };
    let mut newest = String::new();
    for day in 1..=3 {
        newest = publish(
            CANONICAL,
            format!("{JAMMY}2024050{day}"),
            &format!("2024-05-0{day}T00:00:00.000Z"),
            false,
        );
    }
    publish(
        CANONICAL,
        format!("{JAMMY}20240504"),
        "2024-05-04T00:00:00.000Z",
        true,
    );
    publish(
        "111122223333",
        format!("{JAMMY}20240505"),
        "2024-05-05T00:00:00.000Z",
        false,
    );
    publish(
        CANONICAL,
        "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-arm64-server-20240506".into(),
        "2024-05-06T00:00:00.000Z",
        false,
    );
    let dir = default_stack();
    std::fs::write(
        dir.path().join("hosts.toml"),
        format!(
            "[host.prometheus]\nami = {{ owner = \"{CANONICAL}\", name = \"{JAMMY}*\" }}\ninstance_type = \"t3.medium\"\nroot_volume_size_gib = 30\n"
        ),
    )
    .unwrap();
    let d = path_str(dir.path());
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(2);
    for shown in [
        format!("the most recent image of {CANONICAL} named {JAMMY}*"),
        "30 GiB encrypted".to_string(),
    ] {
        assert!(plan.stdout.contains(&shown), "{shown} in\n{}", plan.stdout);
    }
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);

    let ec2 = aws.ec2().await;
    let tagged = Filter::builder()
        .name("tag:stackwarden:id")
        .values("host.prometheus")
        .build();
    let out = ec2
        .describe_instances()
        .filters(tagged.clone())
        .send()
        .await
        .unwrap();
    let instances: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].image_id(), Some(newest.as_str()));
    assert_eq!(
        root_volume(&ec2, instances[0]).await,
        ("/dev/sda1".to_string(), 30, true)
    );
    let instance = instances[0].instance_id().unwrap().to_string();

    publish(
        CANONICAL,
        format!("{JAMMY}20240601"),
        "2024-06-01T00:00:00.000Z",
        false,
    );
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
    let out = ec2
        .describe_instances()
        .filters(tagged)
        .send()
        .await
        .unwrap();
    let ids: Vec<&str> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id())
        .collect();
    assert_eq!(ids, [instance.as_str()]);
}

/// A pattern nothing matches is that host's error, and nothing is launched.
#[tokio::test(flavor = "multi_thread")]
async fn an_ami_pattern_matching_no_image_fails_its_host_alone() {
    let aws = Aws::start();
    aws.emulator.publish_image(published(
        CANONICAL,
        &format!("{JAMMY}20240509"),
        "2024-05-09T00:00:00.000Z",
        true,
    ));
    let dir = default_stack();
    std::fs::write(
        dir.path().join("hosts.toml"),
        format!("[host.prometheus]\nami = {{ owner = \"{CANONICAL}\", name = \"{JAMMY}*\" }}\ninstance_type = \"t3.medium\"\n"),
    )
    .unwrap();
    let run = stackwarden(
        Some(&aws.endpoint),
        &["reconcile", "--once", path_str(dir.path())],
    );
    run.expect(1);
    assert!(
        run.stderr.contains(&format!(
            "no available image of {CANONICAL} is named like {JAMMY}*"
        )),
        "{}",
        run.stderr
    );
    assert_eq!(run.count("RunInstances"), 0, "{}", run.stderr);
    assert!(
        run.count("CreateRole") > 0,
        "the rest of the stack is applied:\n{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_promtool_rejects_fails_the_pass_and_the_old_one_stays_live() {
    let f = Fixture::new();
    f.reconcile().expect(0);
    let live =
        std::fs::read_to_string(f._root.path().join("etc/prometheus/prometheus.yml")).unwrap();

    // A raw config with a key Prometheus does not know: only promtool, on the host, can tell.
    // It loads the host's rule file, as a raw config must.
    std::fs::write(
        f.dir.path().join("prometheus.yml"),
        "global:\n  scrape_interval: 15s\nrule_files:\n  - rules/node.yml\nscrape_configs:\n  - job_name: api\n    bogus_key: 1\n",
    )
    .unwrap();
    edit(
        f.dir.path(),
        "hosts.toml",
        "scrape_interval = \"30s\"",
        "config = \"prometheus.yml\"",
    );
    let run = f.reconcile();
    run.expect(1);
    assert!(
        run.stdout.contains("bogus_key") || run.stderr.contains("bogus_key"),
        "promtool's message names the problem:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(f._root.path().join("etc/prometheus/prometheus.yml")).unwrap(),
        live
    );
    assert!(f.prometheus.running_config().contains("job_name: node"));
    assert!(!f.prometheus.running_config().contains("job_name: api"));
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_band_drift_is_corrected_by_one_reconcile_each() {
    let f = Fixture::new();
    f.reconcile().expect(0);
    let ec2 = f.aws.ec2().await;
    let (first, _) = f.instances().await.remove(0);

    // Stopped: started.
    ec2.stop_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap();
    f.plan().expect(2);
    f.reconcile().expect(0);
    assert_eq!(
        f.instances().await,
        vec![(first.clone(), "running".to_string())]
    );

    // A rule opened out of band: revoked.
    let group = ec2
        .describe_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .security_groups()[0]
        .group_id()
        .unwrap()
        .to_string();
    ec2.authorize_security_group_ingress()
        .group_id(&group)
        .ip_protocol("tcp")
        .from_port(22)
        .to_port(22)
        .cidr_ip("0.0.0.0/0")
        .send()
        .await
        .unwrap();
    f.plan().expect(2);
    f.repair(&[("RevokeSecurityGroupIngress", 1)]).await;
    let rules = ec2
        .describe_security_groups()
        .group_ids(&group)
        .send()
        .await
        .unwrap();
    let ports: Vec<i32> = rules.security_groups()[0]
        .ip_permissions()
        .iter()
        .filter_map(|p| p.from_port())
        .collect();
    assert_eq!(ports, [9090]);

    // Moved into another security group out of band: put back into its own, in place.
    let default = ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values("default")
                .build(),
        )
        .send()
        .await
        .unwrap()
        .security_groups()[0]
        .group_id()
        .unwrap()
        .to_string();
    ec2.modify_instance_attribute()
        .instance_id(&first)
        .groups(&default)
        .send()
        .await
        .unwrap();
    f.plan().expect(2);
    f.repair(&[("ModifyInstanceAttribute", 1)]).await;
    let groups: Vec<String> = ec2
        .describe_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .security_groups()
        .iter()
        .map(|g| g.group_id().unwrap().to_string())
        .collect();
    assert_eq!(groups, std::slice::from_ref(&group));
    assert_eq!(
        f.instances().await,
        vec![(first.clone(), "running".to_string())]
    );

    // Volume detached: attached again.
    let volume = f.volume().await.volume_id().unwrap().to_string();
    ec2.detach_volume()
        .volume_id(&volume)
        .instance_id(&first)
        .device("/dev/sdf")
        .send()
        .await
        .unwrap();
    f.plan().expect(2);
    f.repair(&[("AttachVolume", 1)]).await;
    let kept = f.volume().await;
    assert_eq!(kept.volume_id(), Some(volume.as_str()), "the same volume");
    assert_eq!(kept.attachments()[0].instance_id(), Some(first.as_str()));

    // Instance type and volume size changed in the desired state: in place.
    edit(
        f.dir.path(),
        "hosts.toml",
        "instance_type = \"t3.medium\"",
        "instance_type = \"t3.large\"",
    );
    edit(f.dir.path(), "hosts.toml", "size_gib = 50", "size_gib = 80");
    f.reconcile().expect(0);
    let described = ec2
        .describe_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap();
    let i = &described.reservations()[0].instances()[0];
    assert_eq!(i.instance_type().map(|t| t.as_str()), Some("t3.large"));
    assert_eq!(i.state().unwrap().name().unwrap().as_str(), "running");
    assert_eq!(f.volume().await.size(), Some(80));
    f.plan().expect(0);

    // Terminated: replaced, the data volume kept and attached to the replacement.
    ec2.terminate_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap();
    f.plan().expect(2);
    f.reconcile().expect(0);
    let now = f.instances().await;
    assert_eq!(now.len(), 1);
    assert_ne!(now[0].0, first);
    let kept = f.volume().await;
    assert_eq!(
        kept.volume_id(),
        Some(volume.as_str()),
        "the same volume, data kept"
    );
    assert_eq!(kept.attachments()[0].instance_id(), Some(now[0].0.as_str()));
    f.plan().expect(0);
}

/// The host group's ingress as EC2 describes it: (protocol, from port, source) for every
/// source of every permission, IPv4 and IPv6 ranges, prefix lists and groups alike.
async fn ingress(ec2: &aws_sdk_ec2::Client, group: &str) -> Vec<(String, i32, String)> {
    let out = ec2
        .describe_security_groups()
        .group_ids(group)
        .send()
        .await
        .unwrap();
    let mut rules = Vec::new();
    for p in out.security_groups()[0].ip_permissions() {
        let rule = |source: Option<&str>| {
            (
                p.ip_protocol().unwrap().to_string(),
                p.from_port().unwrap(),
                source.unwrap().to_string(),
            )
        };
        rules.extend(p.ip_ranges().iter().map(|r| rule(r.cidr_ip())));
        rules.extend(p.ipv6_ranges().iter().map(|r| rule(r.cidr_ipv6())));
        rules.extend(p.prefix_list_ids().iter().map(|l| rule(l.prefix_list_id())));
        rules.extend(p.user_id_group_pairs().iter().map(|g| rule(g.group_id())));
    }
    rules.sort();
    rules
}

/// IPv6 ranges and prefix lists are rules like any other: opened out of band, they are drift
/// that `plan` shows and one revoke takes back, leaving the desired rule; desired, they are
/// authorized in EC2's spelling and then in sync; a prefix list that does not exist fails the
/// pass with EC2's refusal.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_ranges_and_prefix_lists_are_kept_exactly_as_desired() {
    use aws_sdk_ec2::types::{AddPrefixListEntry, IpPermission, Ipv6Range, PrefixListId};
    let f = Fixture::new();
    f.reconcile().expect(0);
    let ec2 = f.aws.ec2().await;
    let group = f.group_id().await;
    let list = ec2
        .create_managed_prefix_list()
        .prefix_list_name("office")
        .address_family("IPv4")
        .max_entries(5)
        .entries(AddPrefixListEntry::builder().cidr("192.0.2.0/24").build())
        .send()
        .await
        .unwrap()
        .prefix_list()
        .unwrap()
        .prefix_list_id()
        .unwrap()
        .to_string();
    let managed = ("tcp".to_string(), 9090, "10.0.0.0/16".to_string());
    assert_eq!(ingress(&ec2, &group).await, std::slice::from_ref(&managed));

    // Opened out of band to the whole IPv6 internet and to a prefix list: drift, revoked.
    let port = |p: i32| {
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(p)
            .to_port(p)
    };
    ec2.authorize_security_group_ingress()
        .group_id(&group)
        .ip_permissions(
            port(22)
                .ipv6_ranges(Ipv6Range::builder().cidr_ipv6("::/0").build())
                .build(),
        )
        .ip_permissions(
            port(9090)
                .prefix_list_ids(PrefixListId::builder().prefix_list_id(&list).build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(ingress(&ec2, &group).await.len(), 3);
    let plan = f.plan();
    plan.expect(2);
    for rule in ["tcp/22 from ::/0", &format!("tcp/9090 from {list}")] {
        assert!(plan.stdout.contains(rule), "{rule} in\n{}", plan.stdout);
    }
    f.repair(&[("RevokeSecurityGroupIngress", 1)]).await;
    assert_eq!(ingress(&ec2, &group).await, std::slice::from_ref(&managed));
    f.plan().expect(0);

    // Desired: authorized once, in EC2's spelling, then in sync.
    edit(
        f.dir.path(),
        "hosts.toml",
        "security_group = { ingress = [{ port = 9090, cidrs = [\"10.0.0.0/16\"] }] }",
        &format!(
            "security_group = {{ ingress = [{{ port = 9090, cidrs = [\"10.0.0.0/16\"] }},\n  {{ port = 9100, ipv6_cidrs = [\"2001:DB8::/32\"], prefix_lists = [\"{list}\"] }}] }}"
        ),
    );
    f.plan().expect(2);
    f.repair(&[("AuthorizeSecurityGroupIngress", 1)]).await;
    let mut want = vec![
        managed.clone(),
        ("tcp".to_string(), 9100, "2001:db8::/32".to_string()),
        ("tcp".to_string(), 9100, list.clone()),
    ];
    want.sort();
    assert_eq!(ingress(&ec2, &group).await, want);
    f.plan().expect(0);
    f.repair(&[]).await;

    // A prefix list that does not exist: the pass fails with EC2's refusal, nothing changes.
    edit(f.dir.path(), "hosts.toml", &list, "pl-0123456789abcdef0");
    let run = f.reconcile();
    run.expect(1);
    assert!(
        run.stderr.contains("InvalidPrefixListID.NotFound"),
        "{}",
        run.stderr
    );
    // Revoked first (a changed source never doubles access), then refused, and not tried again
    // in this run: EC2's answer will not change until the desired state does.
    assert_eq!(run.count("RevokeSecurityGroupIngress"), 1);
    assert_eq!(run.count("AuthorizeSecurityGroupIngress"), 1);
    assert_eq!(
        ingress(&ec2, &group).await,
        [
            managed,
            ("tcp".to_string(), 9100, "2001:db8::/32".to_string())
        ]
    );
}

#[test]
fn bad_host_input_is_rejected_without_aws_calls() {
    let dir = default_stack();
    std::fs::write(
        dir.path().join("hosts.toml"),
        "[host.x]\nami = \"ami-1\"\ninstance_type = \"large\"\nvolumes = [{ device = \"/dev/sda1\", size_gib = 10 }]\n",
    )
    .unwrap();
    let run = stackwarden(None, &["validate", path_str(dir.path())]);
    run.expect(1);
    assert!(
        run.stderr
            .contains("instance_type `large` is not an EC2 instance type"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("volume device `/dev/sda1` is not a data device name"),
        "{}",
        run.stderr
    );
    assert_eq!(run.calls().0, 0);

    // A Prometheus host writing to a workspace the desired state does not have.
    let dir = default_stack();
    std::fs::write(
        dir.path().join("hosts.toml"),
        HOSTS.replace("amp.workspace.main", "amp.workspace.metrics"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("userdata")).unwrap();
    std::fs::write(dir.path().join("userdata/prometheus.sh"), "#!/bin/bash\n").unwrap();
    let run = stackwarden(None, &["plan", path_str(dir.path())]);
    run.expect(1);
    assert!(
        run.stderr.contains("hosts.toml:") && run.stderr.contains("amp.workspace.metrics"),
        "{}",
        run.stderr
    );
    assert_eq!(run.calls().0, 0);
}

/// AWS's eventual consistency on a cold run: RunInstances refuses the instance profile made
/// seconds before, and SSM does not know the new instance yet. Both are waiting, not errors:
/// one `reconcile --once` launches one instance once the profile has propagated and pushes the
/// config once the agent has registered.
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_run_waits_for_a_new_instance_profile_and_a_new_instance_to_propagate() {
    let f = Fixture::with(Settings {
        profile_propagation: std::time::Duration::from_secs(3),
        ssm_registration: std::time::Duration::from_secs(3),
        ..Settings::default()
    });
    let cold = f.reconcile();
    cold.expect(0);
    assert!(
        cold.stderr
            .contains("host.prometheus: waiting: ec2:RunInstances")
            && cold.stderr.contains("Invalid IAM Instance Profile name"),
        "{}",
        cold.stderr
    );
    assert!(
        cold.stderr.contains(
            "host.prometheus.prometheus: waiting: 1 instance(s) not reachable over SSM (SendCommand: InvalidInstanceId)"
        ) && cold.stderr.contains("its SSM agent is most likely still registering"),
        "{}",
        cold.stderr
    );
    let instances = f.instances().await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    f.plan().expect(0);
}

/// A propagation wait is bounded: an instance profile RunInstances keeps refusing as it
/// refuses a new one (here one that never propagates; on AWS, a name that exists nowhere) is
/// waited for `STACKWARDEN_PROPAGATION_TIMEOUT`, then is an error naming the refusal, and the
/// run exits 1 without launching anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_that_outlasts_propagation_is_an_error() {
    let f = Fixture::with(Settings {
        profile_propagation: std::time::Duration::from_secs(3600),
        ..Settings::default()
    });
    let run = stackwarden_with(
        Some(&f.aws.endpoint),
        &["reconcile", "--once", f.d()],
        &[("STACKWARDEN_PROPAGATION_TIMEOUT", "3s")],
    );
    run.expect(1);
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("refused for "))
        .unwrap_or_else(|| panic!("{}\n{}", run.stdout, run.stderr));
    assert!(
        line.contains("host.prometheus")
            && line.contains("ec2:RunInstances")
            && line.contains("Invalid IAM Instance Profile name")
            && line.contains(
                "longer than AWS takes to propagate a new object: check that what it names exists"
            ),
        "{line}"
    );
    assert!(
        run.count("RunInstances") >= 2,
        "waited first: {:?}",
        run.counts()
    );
    assert!(f.instances().await.is_empty());
}

/// EC2's listings are eventually consistent: DescribeInstances leaves a new instance out for
/// seconds after RunInstances. The passes of one `reconcile --once` that launch again meanwhile
/// carry the first launch's client token, and EC2 answers the first instance: one instance is
/// ever launched, none terminated. After a termination by hand the same token answers the
/// terminated instance, and the replacement is launched with another.
#[tokio::test(flavor = "multi_thread")]
async fn a_launch_repeated_while_the_listing_lags_answers_the_first_instance_and_a_stale_token_is_stepped_past(
) {
    let f = Fixture::with(Settings {
        listing_lag: std::time::Duration::from_secs(5),
        ..Settings::default()
    });
    let cold = f.reconcile();
    cold.expect(0);
    assert!(
        cold.count("RunInstances") >= 2,
        "a pass ran while the instance was not listed yet: {:?}",
        cold.counts()
    );
    assert_eq!(cold.count("TerminateInstances"), 0, "{:?}", cold.counts());
    let ever = f.every_instance().await;
    assert_eq!(ever.len(), 1, "one instance ever launched: {ever:?}");
    assert_eq!(ever[0].1, "running");
    f.plan().expect(0);

    // Terminated by hand: the replacement's request is the first launch's, and so is its
    // token, which EC2 answers with the terminated instance. A second call, with a token of
    // its own, launches the replacement (listed at once now, so one pass launches).
    f.aws
        .emulator
        .configure(|s| s.listing_lag = std::time::Duration::ZERO);
    let first = ever[0].0.clone();
    f.aws
        .ec2()
        .await
        .terminate_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap();
    let replaced = f.reconcile();
    replaced.expect(0);
    assert_eq!(replaced.count("RunInstances"), 2, "{:?}", replaced.counts());
    let now = f.instances().await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0].0, first);
    assert_eq!(now[0].1, "running");
}

/// A Prometheus host made by Terraform, as the seed repository makes it (an instance in a
/// security group of its own with 9090 open, a data volume at `/dev/sdf`, tags of its own),
/// taken over by id: one `reconcile --once` launches, creates, terminates and moves nothing;
/// the instance, volume and group keep their ids and the instance its group; each now carries
/// the stack's tags, the instance its own tags too; the group's rules become the desired
/// ones; and `plan` is clean after.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_made_by_terraform_is_taken_over_without_recreating_anything() {
    use aws_sdk_ec2::types::{
        InstanceType, IpPermission, IpRange, ResourceType, Tag, TagSpecification, VolumeType,
    };
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let group = ec2
        .create_security_group()
        .group_name("prometheus-sg")
        .description("Prometheus server (Terraform)")
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    ec2.authorize_security_group_ingress()
        .group_id(&group)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(9090)
                .to_port(9090)
                .ip_ranges(IpRange::builder().cidr_ip("10.0.0.0/16").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let launched = ec2
        .run_instances()
        .image_id("ami-12c6146b")
        .instance_type(InstanceType::T3Medium)
        .min_count(1)
        .max_count(1)
        .security_group_ids(&group)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(
                    Tag::builder()
                        .key("Name")
                        .value("prometheus-server")
                        .build(),
                )
                .tags(Tag::builder().key("ManagedBy").value("terraform").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let instance = launched.instances()[0].instance_id().unwrap().to_string();
    let zone = launched.instances()[0]
        .placement()
        .unwrap()
        .availability_zone()
        .unwrap()
        .to_string();
    let volume = ec2
        .create_volume()
        .availability_zone(zone)
        .size(100)
        .volume_type(VolumeType::Gp3)
        .send()
        .await
        .unwrap()
        .volume_id()
        .unwrap()
        .to_string();
    ec2.attach_volume()
        .volume_id(&volume)
        .instance_id(&instance)
        .device("/dev/sdf")
        .send()
        .await
        .unwrap();

    let dir = default_stack();
    std::fs::write(
        dir.path().join("hosts.toml"),
        format!(
            r#"[host.prometheus]
adopt = "{instance}"
ami = "ami-12c6146b"
instance_type = "t3.medium"
security_group = {{ adopt = "{group}", ingress = [{{ port = 9090, cidrs = ["10.0.0.0/16"] }}, {{ port = 9100, cidrs = ["10.0.0.0/16"] }}] }}
volumes = [{{ device = "/dev/sdf", size_gib = 100 }}]
"#
        ),
    )
    .unwrap();
    let d = path_str(dir.path());
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(2);
    assert!(
        plan.stdout
            .contains(&format!("adopting existing instance {instance}")),
        "{}",
        plan.stdout
    );
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(0);
    for op in [
        "RunInstances",
        "CreateVolume",
        "CreateSecurityGroup",
        "TerminateInstances",
        "StopInstances",
        "ModifyInstanceAttribute",
        "DetachVolume",
        "AttachVolume",
    ] {
        assert_eq!(run.count(op), 0, "{op}: {}", run.stderr);
    }
    assert_eq!(
        run.count("AuthorizeSecurityGroupIngress"),
        1,
        "the 9100 rule"
    );

    let out = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let all: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .collect();
    assert_eq!(all.len(), 1, "still one instance");
    let i = all[0];
    assert_eq!(i.instance_id(), Some(instance.as_str()));
    let groups: Vec<&str> = i
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id())
        .collect();
    assert_eq!(groups, [group.as_str()]);
    let tag = |tags: &[Tag], key: &str| {
        tags.iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_string)
    };
    assert_eq!(
        tag(i.tags(), "stackwarden:stack").as_deref(),
        Some("monitoring")
    );
    assert_eq!(tag(i.tags(), "ManagedBy").as_deref(), Some("terraform"));

    let volumes = ec2.describe_volumes().send().await.unwrap();
    let root = i.root_device_name();
    let data: Vec<_> = volumes
        .volumes()
        .iter()
        .filter(|v| v.attachments().iter().all(|a| a.device() != root))
        .collect();
    assert_eq!(data.len(), 1, "still one data volume: {data:?}");
    let v = data[0];
    assert_eq!(v.volume_id(), Some(volume.as_str()));
    assert_eq!(v.attachments()[0].instance_id(), Some(instance.as_str()));
    assert_eq!(
        tag(v.tags(), "stackwarden:device").as_deref(),
        Some("/dev/sdf")
    );
    assert_eq!(
        tag(v.tags(), "stackwarden:stack").as_deref(),
        Some("monitoring")
    );

    let sgs = ec2
        .describe_security_groups()
        .group_ids(&group)
        .send()
        .await
        .unwrap();
    let g = &sgs.security_groups()[0];
    assert_eq!(
        tag(g.tags(), "stackwarden:stack").as_deref(),
        Some("monitoring")
    );
    let mut ports: Vec<i32> = g
        .ip_permissions()
        .iter()
        .filter_map(|p| p.from_port())
        .collect();
    ports.sort();
    assert_eq!(ports, [9090, 9100]);
    let named: Vec<_> = ec2
        .describe_security_groups()
        .send()
        .await
        .unwrap()
        .security_groups()
        .iter()
        .filter(|g| g.group_name() != Some("default"))
        .map(|g| g.group_id().unwrap().to_string())
        .collect();
    assert_eq!(
        named,
        std::slice::from_ref(&group),
        "no group made beside it"
    );

    // Adopted, each is found by its tags like any host's: no read by id any more.
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(0);
    for op in [
        "DescribeInstances",
        "DescribeVolumes",
        "DescribeSecurityGroups",
    ] {
        assert_eq!(plan.count(op), 1, "{op}: {}", plan.stderr);
    }
}
