//! What AWS does that a kinder emulator would hide, each modelled by the emulator (a conformance
//! test here) and met by the operator (an end-to-end test here or beside its kind's tests):
//! the SSM agent's `sh -c FILE` under dash, IAM's propagation delays for trust principals and
//! instance profiles, DescribeParameters filtering after paging, SendCommand refusing a whole
//! call for one unmanaged instance and taking comments of at most 100 characters, invocations
//! that time out on delivery, load balancer attributes answered with AWS's defaults, commands
//! over the document size, commands to a stopped instance delayed until it runs, creates
//! idempotent on their client tokens, a listing that shows a
//! new instance late, a deleted load balancer's network interfaces holding its security
//! group, and AssumeRole refused unless the role exists and trusts the caller.

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::InstanceType;
use aws_sdk_ssm::types::{CommandInvocationStatus, CommandStatus, InstanceInformationStringFilter};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use stackwarden_emulator::Settings;

use crate::harness::{
    default_stack, default_subnets, launch, path_str, run_commands, stackwarden, Aws,
};

const AMI: &str = "ami-12c6146b";

/// Sends `script` to `ids` and waits for the command to end.
async fn run_shell(aws: &Aws, ids: &[String], script: &str) -> aws_sdk_ssm::types::Command {
    let ssm = aws.ssm().await;
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(ids.to_vec()))
        .parameters("commands", vec![script.to_string()])
        .send()
        .await
        .unwrap();
    let id = sent.command().unwrap().command_id().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ssm.list_commands().command_id(&id).send().await.unwrap();
        let c = out.commands()[0].clone();
        let open = matches!(
            c.status(),
            Some(CommandStatus::Pending | CommandStatus::InProgress)
        );
        if !open {
            return c;
        }
        assert!(Instant::now() < deadline, "command {id} still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn invocation(
    aws: &Aws,
    command: &str,
    instance: &str,
) -> aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput {
    aws.ssm()
        .await
        .get_command_invocation()
        .command_id(command)
        .instance_id(instance)
        .send()
        .await
        .unwrap()
}

/// The agent writes the commands to a file and runs `sh -c FILE`: dash on Ubuntu. A bashism
/// fails there, POSIX sh runs, and a shebang is honoured.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_runs_a_script_with_sh_so_a_bashism_fails_as_on_ubuntu() {
    let root = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        shared_sandbox: Some(root.path().to_path_buf()),
        ..Settings::default()
    });
    let ids = launch(&aws, 1, "app").await;
    let bashism = run_shell(&aws, &ids, "set -uo pipefail\necho unreachable").await;
    assert_eq!(bashism.status(), Some(&CommandStatus::Failed));
    let inv = invocation(&aws, bashism.command_id().unwrap(), &ids[0]).await;
    let stderr = inv.standard_error_content().unwrap_or_default();
    assert!(stderr.contains("pipefail"), "{stderr}");
    assert_eq!(inv.standard_output_content(), Some(""));

    let posix = run_shell(&aws, &ids, "set -u\nx=$(printf '%s' ok)\necho \"$x $0\"").await;
    assert_eq!(posix.status(), Some(&CommandStatus::Success));
    let out = invocation(&aws, posix.command_id().unwrap(), &ids[0]).await;
    let stdout = out.standard_output_content().unwrap_or_default();
    assert!(stdout.starts_with("ok "), "{stdout}");
    assert!(!stdout.contains("bash"), "run by sh, not bash: {stdout}");

    let shebang = run_shell(
        &aws,
        &ids,
        "#!/bin/bash\nset -o pipefail\nechoes=(a b)\necho \"${#echoes[@]} under bash\"",
    )
    .await;
    assert_eq!(shebang.status(), Some(&CommandStatus::Success));
    let out = invocation(&aws, shebang.command_id().unwrap(), &ids[0]).await;
    assert_eq!(out.standard_output_content(), Some("2 under bash\n"));
}

/// Auto Scaling refuses a launch template naming a new instance profile with AWS's
/// ValidationError until IAM has propagated it.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_naming_a_new_instance_profile_is_refused_until_it_propagates() {
    let aws = Aws::with(Settings {
        profile_propagation: Duration::from_millis(1500),
        ..Settings::default()
    });
    let iam = aws.iam().await;
    let ec2 = aws.ec2().await;
    iam.create_instance_profile()
        .instance_profile_name("fresh")
        .send()
        .await
        .unwrap();
    let created = Instant::now();
    let template = ec2
        .create_launch_template()
        .launch_template_name("fresh")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(AMI)
                .instance_type(InstanceType::T3Micro)
                .iam_instance_profile(
                    aws_sdk_ec2::types::LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                        .name("fresh")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let id = template
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    let asg = aws.autoscaling().await;
    let create = || {
        asg.create_auto_scaling_group()
            .auto_scaling_group_name("fresh")
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_id(&id)
                    .version("$Latest")
                    .build(),
            )
            .min_size(0)
            .max_size(1)
            .availability_zones("us-east-1a")
            .send()
    };
    let err = create().await.unwrap_err();
    assert_eq!(err.code(), Some("ValidationError"));
    assert_eq!(
        err.message(),
        Some("You must use a valid fully-formed launch template. Value (fresh) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name")
    );
    let groups = asg.describe_auto_scaling_groups().send().await.unwrap();
    assert_eq!(groups.auto_scaling_groups().len(), 0, "nothing was made");
    loop {
        match create().await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Some("ValidationError")),
        }
        assert!(created.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(created.elapsed() >= Duration::from_millis(1500));
    let update = asg
        .update_auto_scaling_group()
        .auto_scaling_group_name("fresh")
        .max_size(2)
        .send()
        .await;
    assert!(update.is_ok(), "{update:?}");
}

/// A trust policy naming a role created a moment ago is `MalformedPolicyDocument: Invalid
/// principal in policy` until IAM has propagated the role.
#[tokio::test(flavor = "multi_thread")]
async fn a_trust_policy_naming_a_new_role_is_malformed_until_it_propagates() {
    let aws = Aws::with(Settings {
        principal_propagation: Duration::from_millis(1500),
        ..Settings::default()
    });
    let iam = aws.iam().await;
    let ec2_trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    let made = iam
        .create_role()
        .role_name("writer")
        .assume_role_policy_document(ec2_trust)
        .send()
        .await
        .unwrap();
    let created = Instant::now();
    let arn = made.role().unwrap().arn().to_string();
    let trust = format!(
        r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":"{arn}"}},"Action":"sts:AssumeRole"}}]}}"#
    );
    let create = || {
        iam.create_role()
            .role_name("reader")
            .assume_role_policy_document(&trust)
            .send()
    };
    let err = create().await.unwrap_err();
    assert_eq!(err.code(), Some("MalformedPolicyDocument"));
    assert_eq!(
        err.message().unwrap_or_default(),
        format!("Invalid principal in policy: \"AWS\":\"{arn}\"")
    );
    let update = iam
        .update_assume_role_policy()
        .role_name("writer")
        .policy_document(&trust)
        .send()
        .await
        .unwrap_err();
    assert_eq!(update.code(), Some("MalformedPolicyDocument"));
    loop {
        match create().await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Some("MalformedPolicyDocument")),
        }
        assert!(created.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(created.elapsed() >= Duration::from_millis(1500));
}

/// A trust policy naming a role or user of the account that does not exist is refused as a
/// young one is, `MalformedPolicyDocument` ("Invalid principal in policy"); the account's root
/// and another account's role are taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_trust_policy_naming_a_role_that_does_not_exist_is_malformed() {
    let aws = Aws::start();
    let iam = aws.iam().await;
    let trust = |principal: &str| {
        format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"AWS":"{principal}"}},"Action":"sts:AssumeRole"}}]}}"#
        )
    };
    for (n, missing) in [
        "arn:aws:iam::123456789012:role/nobody",
        "arn:aws:iam::123456789012:role/team/nobody",
        "arn:aws:iam::123456789012:user/nobody",
    ]
    .into_iter()
    .enumerate()
    {
        let err = iam
            .create_role()
            .role_name(format!("refused-{n}"))
            .assume_role_policy_document(trust(missing))
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("MalformedPolicyDocument"), "{missing}");
        assert_eq!(
            err.message().unwrap_or_default(),
            format!("Invalid principal in policy: \"AWS\":\"{missing}\"")
        );
    }
    for (n, taken) in [
        "arn:aws:iam::123456789012:root",
        "arn:aws:iam::210987654321:role/elsewhere",
    ]
    .into_iter()
    .enumerate()
    {
        iam.create_role()
            .role_name(format!("taken-{n}"))
            .assume_role_policy_document(trust(taken))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{taken}: {e:?}"));
    }
}

/// DescribeParameters pages through all parameters and filters each page: the one a filter
/// names may come after empty pages that carry a NextToken.
#[tokio::test(flavor = "multi_thread")]
async fn describe_parameters_applies_its_filters_after_paging() {
    let aws = Aws::start();
    let ssm = aws.ssm().await;
    for i in 0..12 {
        ssm.put_parameter()
            .name(format!("/other/p{i:02}"))
            .value("x")
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .send()
            .await
            .unwrap();
    }
    ssm.put_parameter()
        .name("/grafana/admin")
        .value("secret")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    let filter = aws_sdk_ssm::types::ParameterStringFilter::builder()
        .key("Name")
        .option("Equals")
        .values("/grafana/admin")
        .build()
        .unwrap();
    let first = ssm
        .describe_parameters()
        .parameter_filters(filter.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(first.parameters().len(), 0, "the first 10 are others");
    let token = first.next_token().expect("a next page").to_string();
    let second = ssm
        .describe_parameters()
        .parameter_filters(filter.clone())
        .next_token(token)
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = second
        .parameters()
        .iter()
        .filter_map(|p| p.name())
        .collect();
    assert_eq!(names, ["/grafana/admin"]);
    assert_eq!(second.next_token(), None, "the last page");
    let all = ssm
        .describe_parameters()
        .max_results(50)
        .send()
        .await
        .unwrap();
    assert_eq!(all.parameters().len(), 13);
}

/// One instance SSM does not manage fails SendCommand as a whole with InvalidInstanceId;
/// DescribeInstanceInformation lists the others; targets by tag skip it.
#[tokio::test(flavor = "multi_thread")]
async fn send_command_naming_an_unmanaged_instance_fails_as_a_whole() {
    let root = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        shared_sandbox: Some(root.path().to_path_buf()),
        ..Settings::default()
    });
    let ids = launch(&aws, 3, "app").await;
    aws.emulator.configure(|s| {
        s.unmanaged.insert(ids[1].clone());
    });
    let ssm = aws.ssm().await;
    let err = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(ids.clone()))
        .parameters(
            "commands",
            vec!["echo hi >> \"$STACKWARDEN_ROOT/ran\"".into()],
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("InvalidInstanceId"));
    assert_eq!(run_commands(&ssm).await.len(), 0, "no command was made");
    assert!(!root.path().join("ran").exists(), "nothing ran anywhere");

    let info = ssm
        .describe_instance_information()
        .filters(
            InstanceInformationStringFilter::builder()
                .key("InstanceIds")
                .set_values(Some(ids.clone()))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let mut listed: Vec<&str> = info
        .instance_information_list()
        .iter()
        .filter_map(|i| i.instance_id())
        .collect();
    listed.sort();
    let mut managed = vec![ids[0].as_str(), ids[2].as_str()];
    managed.sort();
    assert_eq!(listed, managed);

    let by_tag = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .targets(
            aws_sdk_ssm::types::Target::builder()
                .key("tag:Role")
                .values("app")
                .build(),
        )
        .parameters("commands", vec!["true".into()])
        .send()
        .await
        .unwrap();
    assert_eq!(by_tag.command().unwrap().target_count(), 2);
}

/// SendCommand's `Comment` takes at most 100 characters.
#[tokio::test(flavor = "multi_thread")]
async fn a_send_command_comment_over_100_characters_is_refused() {
    let aws = Aws::start();
    let ids = launch(&aws, 1, "app").await;
    let ssm = aws.ssm().await;
    let send = |comment: String| {
        ssm.send_command()
            .document_name("AWS-RunShellScript")
            .set_instance_ids(Some(ids.clone()))
            .comment(comment)
            .parameters("commands", vec!["true".into()])
            .send()
    };
    let err = send("c".repeat(101)).await.unwrap_err();
    assert_eq!(err.code(), Some("ValidationException"));
    assert!(err
        .message()
        .unwrap()
        .contains("length less than or equal to 100"));
    assert!(send("c".repeat(100)).await.is_ok());
}

/// A command whose parameters are over the 64 KB a document may have is refused with
/// `MaxDocumentSizeExceeded`, the one size limit AWS documents for Run Command.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_over_the_document_size_limit_is_refused() {
    let aws = Aws::start();
    let ids = launch(&aws, 1, "app").await;
    let ssm = aws.ssm().await;
    let send = |script: String| {
        ssm.send_command()
            .document_name("AWS-RunShellScript")
            .set_instance_ids(Some(ids.clone()))
            .parameters("commands", vec![script])
            .send()
    };
    let err = send(format!("# {}", "x".repeat(64 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("MaxDocumentSizeExceeded"));
    assert_eq!(
        err.message(),
        Some("The size limit of a document is 64 KB.")
    );
    assert!(send(format!("# {}", "x".repeat(60 * 1024))).await.is_ok());
}

/// RunInstances is idempotent on its client token: a repeat answers the reservation the
/// token made and launches nothing, with each instance in its state now, terminated included;
/// the same token with other parameters is `IdempotentParameterMismatch`.
#[tokio::test(flavor = "multi_thread")]
async fn run_instances_repeating_a_client_token_answers_its_instance_even_terminated() {
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let run = |token: &'static str, kind: InstanceType| {
        ec2.run_instances()
            .client_token(token)
            .image_id(AMI)
            .instance_type(kind)
            .min_count(1)
            .max_count(1)
            .send()
    };
    let first = run("launch-1", InstanceType::T3Micro).await.unwrap();
    let id = first.instances()[0].instance_id().unwrap().to_string();
    let again = run("launch-1", InstanceType::T3Micro).await.unwrap();
    assert_eq!(again.instances().len(), 1);
    assert_eq!(again.instances()[0].instance_id(), Some(id.as_str()));
    assert_eq!(again.reservation_id(), first.reservation_id());
    let all = ec2.describe_instances().send().await.unwrap();
    let count = all
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .count();
    assert_eq!(count, 1, "nothing launched by the repeat");

    ec2.terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap();
    let after = run("launch-1", InstanceType::T3Micro).await.unwrap();
    assert_eq!(after.instances()[0].instance_id(), Some(id.as_str()));
    let state = after.instances()[0]
        .state()
        .unwrap()
        .name()
        .unwrap()
        .as_str();
    assert!(
        matches!(state, "shutting-down" | "terminated"),
        "answered in its state now: {state}"
    );

    let err = run("launch-1", InstanceType::T3Small).await.unwrap_err();
    assert_eq!(err.code(), Some("IdempotentParameterMismatch"));
    assert!(run("launch-2", InstanceType::T3Micro).await.is_ok());
}

/// AMP's CreateWorkspace is idempotent on its client token: a repeat answers the workspace
/// the token made.
#[tokio::test(flavor = "multi_thread")]
async fn amp_create_workspace_repeating_a_client_token_makes_one_workspace() {
    let aws = Aws::start();
    let amp = aws.amp().await;
    let create = || {
        amp.create_workspace()
            .alias("one")
            .client_token("ws-1")
            .send()
    };
    let first = create().await.unwrap();
    let again = create().await.unwrap();
    assert_eq!(again.workspace_id(), first.workspace_id());
    let all = amp.list_workspaces().send().await.unwrap();
    assert_eq!(all.workspaces().len(), 1, "{:?}", all.workspaces());
}

/// DescribeInstances is eventually consistent: an instance launched less than the listing
/// lag ago is not in its answers yet, then is.
#[tokio::test(flavor = "multi_thread")]
async fn describe_instances_shows_a_new_instance_only_after_the_listing_lag() {
    let aws = Aws::with(Settings {
        listing_lag: Duration::from_secs(2),
        ..Settings::default()
    });
    let ids = launch(&aws, 1, "app").await;
    let ec2 = aws.ec2().await;
    let listed = || async {
        let out = ec2.describe_instances().send().await.unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect::<Vec<_>>()
    };
    assert!(
        listed().await.is_empty(),
        "not listed right after the launch"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while listed().await.is_empty() {
        assert!(Instant::now() < deadline, "never listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(listed().await, ids);
}

/// A deleted load balancer's network interfaces outlive it for a while: DeleteSecurityGroup
/// of its group fails with `DependencyViolation` ("resource sg-... has a dependent object")
/// until they are released, then succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_load_balancer_holds_its_security_group_until_its_interfaces_go() {
    let aws = Aws::with(Settings {
        interface_release: Duration::from_secs(2),
        ..Settings::default()
    });
    let ec2 = aws.ec2().await;
    let subnets = default_subnets(&aws, 2).await;
    let group = ec2
        .create_security_group()
        .group_name("alb")
        .description("alb")
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    let elb = aws.elb().await;
    let lb = elb
        .create_load_balancer()
        .name("held")
        .set_subnets(Some(subnets))
        .security_groups(&group)
        .send()
        .await
        .unwrap();
    let arn = lb.load_balancers()[0].load_balancer_arn().unwrap();
    elb.delete_load_balancer()
        .load_balancer_arn(arn)
        .send()
        .await
        .unwrap();
    let err = ec2
        .delete_security_group()
        .group_id(&group)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("DependencyViolation"));
    assert!(
        err.message()
            .unwrap()
            .starts_with(&format!("resource {group} has a dependent object")),
        "{err:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ec2.delete_security_group().group_id(&group).send().await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Some("DependencyViolation"));
                assert!(Instant::now() < deadline, "never released");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// SendCommand takes a stopped instance, as AWS does (its valid states are running, pending,
/// stopping and stopped): the invocation is `Delayed` while the instance is stopped (listed by
/// DescribeInstanceInformation as `ConnectionLost`) and runs once it is started again. A terminated instance fails the call with `InvalidInstanceId`.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_to_a_stopped_instance_is_delayed_until_it_runs() {
    let root = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        shared_sandbox: Some(root.path().to_path_buf()),
        ..Settings::default()
    });
    let ids = launch(&aws, 2, "app").await;
    let ec2 = aws.ec2().await;
    ec2.stop_instances()
        .instance_ids(&ids[0])
        .send()
        .await
        .unwrap();
    let ssm = aws.ssm().await;
    // Still registered with SSM, its agent not heard from.
    let ping = || async {
        let out = ssm.describe_instance_information().send().await.unwrap();
        out.instance_information_list()
            .iter()
            .map(|i| {
                (
                    i.instance_id().unwrap().to_string(),
                    i.ping_status().unwrap().as_str().to_string(),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let stopped = ping().await;
    assert_eq!(stopped.len(), 2, "{stopped:?}");
    assert_eq!(stopped[&ids[0]], "ConnectionLost");
    assert_eq!(stopped[&ids[1]], "Online");
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(ids.clone()))
        .parameters("commands", vec!["echo ran".into()])
        .send()
        .await
        .unwrap();
    let command = sent.command().unwrap().command_id().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = invocation(&aws, &command, &ids[0]).await;
        if out.status() == Some(&CommandInvocationStatus::Delayed) {
            break;
        }
        assert_eq!(out.status(), Some(&CommandInvocationStatus::Pending));
        assert!(Instant::now() < deadline, "never delayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The running instance's invocation goes on while the stopped one is held (it may still
    // be Pending for a moment: the agent picks commands up in no set order).
    let others = loop {
        let out = invocation(&aws, &command, &ids[1]).await;
        if out.status() != Some(&CommandInvocationStatus::Pending) {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the running instance never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        matches!(
            others.status(),
            Some(CommandInvocationStatus::InProgress | CommandInvocationStatus::Success)
        ),
        "the running instance is not held: {:?}",
        others.status()
    );
    let open = ssm
        .list_commands()
        .command_id(&command)
        .send()
        .await
        .unwrap();
    assert_eq!(
        open.commands()[0].status(),
        Some(&CommandStatus::InProgress)
    );

    ec2.start_instances()
        .instance_ids(&ids[0])
        .send()
        .await
        .unwrap();
    assert_eq!(ping().await[&ids[0]], "Online");
    loop {
        let out = invocation(&aws, &command, &ids[0]).await;
        if out.status() == Some(&CommandInvocationStatus::Success) {
            assert_eq!(out.standard_output_content(), Some("ran\n"));
            break;
        }
        assert!(Instant::now() < deadline, "never ran: {:?}", out.status());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    ec2.terminate_instances()
        .instance_ids(&ids[1])
        .send()
        .await
        .unwrap();
    let err = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(ids.clone()))
        .parameters("commands", vec!["true".into()])
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("InvalidInstanceId"));
    assert!(err.message().unwrap().contains(&ids[1]), "{err:?}");
}

/// An invocation the agent never picks up ends `Delivery Timed Out`: not an error against
/// MaxErrors, counted apart, and the command is not a Success.
#[tokio::test(flavor = "multi_thread")]
async fn an_undelivered_invocation_times_out_on_delivery() {
    let root = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        shared_sandbox: Some(root.path().to_path_buf()),
        ..Settings::default()
    });
    let ids = launch(&aws, 2, "app").await;
    aws.emulator.configure(|s| {
        s.undelivered.insert(ids[0].clone());
    });
    let c = run_shell(&aws, &ids, "true").await;
    assert_eq!(c.status(), Some(&CommandStatus::Failed));
    assert_eq!(c.status_details(), Some("Incomplete"));
    assert_eq!(c.delivery_timed_out_count(), 1);
    assert_eq!(c.error_count(), 0);
    assert_eq!(c.completed_count(), 2);
    let lost = invocation(&aws, c.command_id().unwrap(), &ids[0]).await;
    assert_eq!(lost.status(), Some(&CommandInvocationStatus::TimedOut));
    assert_eq!(lost.status_details(), Some("Delivery Timed Out"));
    let ran = invocation(&aws, c.command_id().unwrap(), &ids[1]).await;
    assert_eq!(ran.status(), Some(&CommandInvocationStatus::Success));
}

/// DescribeLoadBalancerAttributes answers the attributes never set with AWS's defaults.
#[tokio::test(flavor = "multi_thread")]
async fn load_balancer_attributes_never_set_are_answered_with_aws_defaults() {
    let aws = Aws::start();
    let subnets = default_subnets(&aws, 2).await;
    let elb = aws.elb().await;
    let lb = elb
        .create_load_balancer()
        .name("defaults")
        .set_subnets(Some(subnets))
        .send()
        .await
        .unwrap();
    let arn = lb.load_balancers()[0]
        .load_balancer_arn()
        .unwrap()
        .to_string();
    let attrs = elb
        .describe_load_balancer_attributes()
        .load_balancer_arn(&arn)
        .send()
        .await
        .unwrap();
    let get = |key: &str| {
        let found: Vec<&str> = attrs
            .attributes()
            .iter()
            .filter(|a| a.key() == Some(key))
            .filter_map(|a| a.value())
            .collect();
        assert_eq!(found.len(), 1, "{key} once: {:?}", attrs.attributes());
        found[0].to_string()
    };
    assert_eq!(get("idle_timeout.timeout_seconds"), "60");
    assert_eq!(get("deletion_protection.enabled"), "false");
    assert_eq!(get("routing.http2.enabled"), "true");
}

/// A role whose trust names another role the same pass creates: IAM refuses the trust until
/// it has propagated the new role, and one `reconcile --once` waits for that and converges.
#[tokio::test(flavor = "multi_thread")]
async fn a_trust_naming_a_role_the_same_run_creates_converges_in_one_cold_run() {
    let aws = Aws::with(Settings {
        principal_propagation: Duration::from_secs(3),
        ..Settings::default()
    });
    let dir = default_stack();
    std::fs::write(
        dir.path().join("reader.toml"),
        "[iam.role.reader]\ndescription = \"Read by the Prometheus host's role\"\ntrust = { aws = [\"${iam.role.prometheus.arn}\"] }\n",
    )
    .unwrap();
    let d = path_str(dir.path());
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(0);
    assert!(
        run.stderr
            .contains("iam.role.reader: waiting: iam:CreateRole")
            && run.stderr.contains("Invalid principal in policy"),
        "{}",
        run.stderr
    );
    let role = aws
        .iam()
        .await
        .get_role()
        .role_name("monitoring-reader")
        .send()
        .await;
    let role = role.unwrap_or_else(|e| panic!("{e:?}\n{}", run.stdout));
    let trust = role.role().unwrap().assume_role_policy_document().unwrap();
    let trust = crate::reconcile::percent_decode(trust);
    assert!(trust.contains(":role/monitoring-prometheus"), "{trust}");
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
}

const NODE_EXPORTER: &str = r#"[host_config.node_exporter_for_the_application_fleet_of_the_payments_team]
targets = { Role = "app" }
files = [{ path = "/etc/default/node_exporter", source = "hosts/node_exporter.env" }]
reload = "echo reloaded >> \"$STACKWARDEN_ROOT/reloads\""
"#;

/// One instance SSM does not manage, among three a host_config targets: the verify reports it
/// unverified and verifies the others; a change of the files reaches the other two in the same
/// run, which fails naming the instance and what its state says; once SSM manages it again a
/// run pushes to it alone. The host_config's name is long enough that a full comment would be
/// over SendCommand's 100 characters.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_ssm_does_not_manage_is_named_and_the_others_get_the_push() {
    let sandboxes = tempfile::tempdir().unwrap();
    let aws = Aws::with(Settings {
        sandbox_dir: Some(sandboxes.path().to_path_buf()),
        ..Settings::default()
    });
    let apps = launch(&aws, 3, "app").await;
    let dir = default_stack();
    std::fs::write(dir.path().join("host_config.toml"), NODE_EXPORTER).unwrap();
    std::fs::create_dir_all(dir.path().join("hosts")).unwrap();
    let env = dir.path().join("hosts/node_exporter.env");
    std::fs::write(&env, "ARGS=--collector.systemd\n").unwrap();
    let d = path_str(dir.path());
    let installed = |id: &str| {
        std::fs::read_to_string(sandboxes.path().join(id).join("etc/default/node_exporter")).ok()
    };
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);
    for id in &apps {
        assert_eq!(installed(id).as_deref(), Some("ARGS=--collector.systemd\n"));
    }

    let unmanaged = apps[1].clone();
    aws.emulator.configure(|s| {
        s.unmanaged.insert(unmanaged.clone());
    });
    let verify = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", "--verify", d]);
    verify.expect(0);
    assert!(
        verify.stderr.contains(&format!(
            "not verified: {unmanaged} (not reachable over SSM"
        )),
        "{}",
        verify.stderr
    );
    assert!(
        verify
            .stderr
            .contains("verify: 3 instances, 0 with files changed"),
        "{}",
        verify.stderr
    );
    let commands = run_commands(&aws.ssm().await).await;
    let last = commands.last().unwrap();
    assert_eq!(last.comment(), Some("stackwarden verify"));
    let mut verified = vec![apps[0].clone(), apps[2].clone()];
    verified.sort();
    assert_eq!(last.instance_ids(), verified.as_slice());

    std::fs::write(&env, "ARGS=--collector.processes\n").unwrap();
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(1);
    assert!(
        run.stdout.contains(&format!(
            "1 instance(s) not reachable over SSM (SendCommand: InvalidInstanceId): {unmanaged} (running with no instance profile"
        )),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    for id in [&apps[0], &apps[2]] {
        assert_eq!(
            installed(id).as_deref(),
            Some("ARGS=--collector.processes\n"),
            "{id}"
        );
    }
    assert_eq!(
        installed(&unmanaged).as_deref(),
        Some("ARGS=--collector.systemd\n"),
        "the unmanaged instance keeps what it had"
    );
    let commands = run_commands(&aws.ssm().await).await;
    for c in &commands {
        let comment = c.comment().unwrap_or_default();
        assert!(comment.chars().count() <= 100, "{comment}");
        if c.instance_ids().contains(&unmanaged) {
            continue; // the first push, before SSM lost it
        }
        assert!(
            comment.starts_with("stackwarden host_config.") || comment == "stackwarden verify",
            "{comment}"
        );
    }

    aws.emulator.configure(|s| {
        s.unmanaged.clear();
    });
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(0);
    assert_eq!(run.count("SendCommand"), 1, "{}", run.stderr);
    let commands = run_commands(&aws.ssm().await).await;
    let last = commands.last().unwrap();
    assert_eq!(last.instance_ids(), std::slice::from_ref(&unmanaged));
    assert_eq!(
        installed(&unmanaged).as_deref(),
        Some("ARGS=--collector.processes\n")
    );
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
}

/// AWS's refusal of an AssumeRole: `AccessDenied` (403) naming the caller and the role.
#[track_caller]
fn assume_refused<T: std::fmt::Debug>(
    out: Result<
        T,
        aws_sdk_sts::error::SdkError<aws_sdk_sts::operation::assume_role::AssumeRoleError>,
    >,
    role: &str,
) {
    let e = out.expect_err("AWS refuses this AssumeRole");
    assert_eq!(e.code(), Some("AccessDenied"), "{e:?}");
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(403));
    let message = e.message().unwrap_or_default();
    assert!(
        message.starts_with("User: arn:aws:")
            && message.ends_with(&format!(
                "is not authorized to perform: sts:AssumeRole on resource: {role}"
            )),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn assume_role_needs_the_role_to_exist_and_trust_the_caller_with_its_external_id() {
    let aws = Aws::start();
    let sts = aws_sdk_sts::Client::new(&aws.sdk().await);
    let assume = |role: &str, external_id: Option<&str>| {
        sts.assume_role()
            .role_arn(role)
            .role_session_name("conformance")
            .set_external_id(external_id.map(str::to_string))
            .send()
    };

    // No such role: moto would hand out credentials all the same.
    let missing = "arn:aws:iam::111111111111:role/missing";
    assume_refused(assume(missing, None).await, missing);

    // A role trusting the caller's account, with an external id condition.
    aws.assumable_role("111111111111", "target", Some("ext-1"))
        .await;
    let target = "arn:aws:iam::111111111111:role/target";
    assume_refused(assume(target, None).await, target);
    assume_refused(assume(target, Some("ext-2")).await, target);
    // The role's name at another path is another role.
    let elsewhere = "arn:aws:iam::111111111111:role/ops/target";
    assume_refused(assume(elsewhere, Some("ext-1")).await, elsewhere);

    // A role trusting another account only.
    let trust = serde_json::json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Principal": {"AWS": "arn:aws:iam::333333333333:root"},
    }]});
    aws.iam_in("222222222222")
        .await
        .create_role()
        .role_name("theirs")
        .assume_role_policy_document(trust.to_string())
        .send()
        .await
        .unwrap();
    let theirs = "arn:aws:iam::222222222222:role/theirs";
    assume_refused(assume(theirs, None).await, theirs);

    // Trusted, with the external id: the credentials act in the role's account.
    let granted = assume(target, Some("ext-1")).await.unwrap();
    let c = granted.credentials().unwrap();
    let assumed = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&aws.endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_iam::config::Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_string()),
            None,
            "assumed",
        ))
        .load()
        .await;
    let me = aws_sdk_sts::Client::new(&assumed)
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    assert_eq!(me.account(), Some("111111111111"));
    assert_eq!(
        me.arn(),
        Some("arn:aws:sts::111111111111:assumed-role/target/conformance")
    );
    let roles = aws_sdk_iam::Client::new(&assumed)
        .list_roles()
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = roles.roles().iter().map(|r| r.role_name()).collect();
    assert_eq!(names, ["target"], "the role's account, and only it");
}
