//! Conformance of the project's emulator (tests/emulator): every operation it serves, driven
//! through the real aws-sdk-rust clients, with its errors and pagination; Run Command scripts
//! really running in their sandboxes; injected faults in each protocol's shape; and requests it
//! does not serve reaching moto unchanged.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_amp::primitives::Blob;
use aws_sdk_grafana::types::{
    AccountAccessType, AuthenticationProviderTypes, PermissionType, Role, UpdateAction,
    UpdateInstruction, User, UserType,
};
use aws_sdk_ssm::types::{CommandInvocationStatus, CommandStatus, Target};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use stackwarden_emulator::{Fault, FaultKind, PublicImage, Sandbox, Settings, Unsandboxed};

use crate::harness::Aws;

/// Identity Center ids, in the format the service accepts.
const ADMINS: &str = "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a";
const ALICE: &str = "9067729b3d-1b2c3d4e-0000-4000-8000-000000000001";
const BOB: &str = "9067729b3d-1b2c3d4e-0000-4000-8000-000000000002";
const CAROL: &str = "9067729b3d-1b2c3d4e-0000-4000-8000-000000000003";

const AMI: &str = "ami-12c6146b";

/// Polls `probe` until it returns Some, for at most 20 seconds.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The error code of a failed SDK call.
fn code<T: std::fmt::Debug, E: ProvideErrorMetadata + std::fmt::Debug>(
    result: Result<T, E>,
) -> String {
    let err = result.expect_err("the call should fail");
    err.code()
        .unwrap_or_else(|| panic!("no error code in {err:?}"))
        .to_string()
}

fn user(id: &str, kind: UserType) -> User {
    User::builder().id(id).r#type(kind).build().unwrap()
}

fn instruction(action: UpdateAction, role: Role, users: Vec<User>) -> UpdateInstruction {
    UpdateInstruction::builder()
        .action(action)
        .role(role)
        .set_users(Some(users))
        .build()
        .unwrap()
}

async fn grafana_workspace(g: &aws_sdk_grafana::Client, name: &str) -> String {
    let created = g
        .create_workspace()
        .workspace_name(name)
        .account_access_type(AccountAccessType::CurrentAccount)
        .permission_type(PermissionType::ServiceManaged)
        .authentication_providers(AuthenticationProviderTypes::AwsSso)
        .send()
        .await
        .unwrap();
    created.workspace.unwrap().id
}

async fn wait_grafana_status(g: &aws_sdk_grafana::Client, id: &str, status: &str) {
    eventually(&format!("workspace {id} {status}"), || async {
        let w = g.describe_workspace().workspace_id(id).send().await.ok()?;
        (w.workspace?.status.as_str() == status).then_some(())
    })
    .await
}

#[tokio::test]
async fn grafana_workspace_lifecycle_with_tags_and_idempotent_create() {
    let aws = Aws::start();
    let g = aws.grafana().await;
    let create = || {
        g.create_workspace()
            .workspace_name("monitoring")
            .workspace_description("fleet dashboards")
            .account_access_type(AccountAccessType::CurrentAccount)
            .permission_type(PermissionType::CustomerManaged)
            .workspace_role_arn("arn:aws:iam::123456789012:role/grafana")
            .authentication_providers(AuthenticationProviderTypes::AwsSso)
            .workspace_data_sources(aws_sdk_grafana::types::DataSourceType::Prometheus)
            .tags("stackwarden:stack", "monitoring")
            .client_token("token-1")
            .send()
    };
    let first = create().await.unwrap().workspace.unwrap();
    assert_eq!(first.status.as_str(), "CREATING");
    assert!(first.id.starts_with("g-"), "{}", first.id);
    assert_eq!(
        first.endpoint,
        format!("{}.grafana-workspace.us-east-1.amazonaws.com", first.id)
    );
    let retried = create().await.unwrap().workspace.unwrap();
    assert_eq!(
        retried.id, first.id,
        "a repeated client token creates nothing"
    );

    wait_grafana_status(&g, &first.id, "ACTIVE").await;
    let described = g
        .describe_workspace()
        .workspace_id(&first.id)
        .send()
        .await
        .unwrap()
        .workspace
        .unwrap();
    assert_eq!(
        described.permission_type.unwrap().as_str(),
        "CUSTOMER_MANAGED"
    );
    assert_eq!(
        described.workspace_role_arn.as_deref(),
        Some("arn:aws:iam::123456789012:role/grafana")
    );
    assert_eq!(described.data_sources.len(), 1);
    assert_eq!(
        described.authentication.unwrap().providers,
        vec![AuthenticationProviderTypes::AwsSso]
    );

    let updated = g
        .update_workspace()
        .workspace_id(&first.id)
        .workspace_description("fleet and AMP dashboards")
        .send()
        .await
        .unwrap();
    assert_eq!(updated.workspace.unwrap().status.as_str(), "UPDATING");
    assert_eq!(
        code(
            g.update_workspace()
                .workspace_id(&first.id)
                .workspace_name("again")
                .send()
                .await
        ),
        "ConflictException",
        "an update while UPDATING conflicts"
    );
    wait_grafana_status(&g, &first.id, "ACTIVE").await;

    let arn = format!(
        "arn:aws:grafana:us-east-1:123456789012:/workspaces/{}",
        first.id
    );
    g.tag_resource()
        .resource_arn(&arn)
        .tags("team", "sre")
        .send()
        .await
        .unwrap();
    g.untag_resource()
        .resource_arn(&arn)
        .tag_keys("stackwarden:stack")
        .send()
        .await
        .unwrap();
    let tags = g
        .list_tags_for_resource()
        .resource_arn(&arn)
        .send()
        .await
        .unwrap()
        .tags
        .unwrap();
    assert_eq!(
        tags,
        BTreeMap::from([("team".to_string(), "sre".to_string())])
            .into_iter()
            .collect()
    );

    let deleted = g
        .delete_workspace()
        .workspace_id(&first.id)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.workspace.unwrap().status.as_str(), "DELETING");
    eventually("the workspace gone", || async {
        let r = g.describe_workspace().workspace_id(&first.id).send().await;
        match r {
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                Some(())
            }
            _ => None,
        }
    })
    .await;
}

#[tokio::test]
async fn grafana_errors_and_workspace_pagination() {
    let aws = Aws::start();
    let g = aws.grafana().await;
    let missing = g
        .describe_workspace()
        .workspace_id("g-0000000000")
        .send()
        .await;
    let err = missing.expect_err("no such workspace");
    assert!(err
        .as_service_error()
        .is_some_and(|e| e.is_resource_not_found_exception()));
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 404);

    let bad_name = g
        .create_workspace()
        .workspace_name("has spaces")
        .account_access_type(AccountAccessType::CurrentAccount)
        .permission_type(PermissionType::ServiceManaged)
        .authentication_providers(AuthenticationProviderTypes::AwsSso)
        .send()
        .await;
    assert!(bad_name
        .expect_err("invalid name")
        .as_service_error()
        .is_some_and(|e| e.is_validation_exception()));
    let no_units = g
        .create_workspace()
        .account_access_type(AccountAccessType::Organization)
        .permission_type(PermissionType::ServiceManaged)
        .authentication_providers(AuthenticationProviderTypes::Saml)
        .send()
        .await;
    assert_eq!(code(no_units), "ValidationException");

    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        ids.push(grafana_workspace(&g, name).await);
    }
    let first = g.list_workspaces().max_results(2).send().await.unwrap();
    assert_eq!(first.workspaces.len(), 2);
    assert!(first.next_token.is_some());
    let mut listed: Vec<String> = g
        .list_workspaces()
        .max_results(2)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
    assert_eq!(
        code(g.list_workspaces().next_token("forged").send().await),
        "ValidationException"
    );
    assert_eq!(
        code(
            g.update_permissions()
                .workspace_id(&ids[0])
                .update_instruction_batch(instruction(
                    UpdateAction::Add,
                    Role::Viewer,
                    vec![user(ALICE, UserType::SsoUser)]
                ))
                .send()
                .await
        ),
        "ConflictException",
        "permissions of a workspace still CREATING"
    );
}

#[tokio::test]
async fn grafana_permissions_apply_per_entry_and_list_with_filters_and_pages() {
    let aws = Aws::start();
    let g = aws.grafana().await;
    let id = grafana_workspace(&g, "access").await;
    wait_grafana_status(&g, &id, "ACTIVE").await;

    let answer = g
        .update_permissions()
        .workspace_id(&id)
        .update_instruction_batch(instruction(
            UpdateAction::Add,
            Role::Admin,
            vec![user(ADMINS, UserType::SsoGroup)],
        ))
        .update_instruction_batch(instruction(
            UpdateAction::Add,
            Role::Viewer,
            vec![
                user(ALICE, UserType::SsoUser),
                user(BOB, UserType::SsoUser),
                user("alice", UserType::SsoUser),
            ],
        ))
        .update_instruction_batch(instruction(
            UpdateAction::Revoke,
            Role::Editor,
            vec![user(CAROL, UserType::SsoUser)],
        ))
        .send()
        .await
        .unwrap();
    let refused: Vec<(String, i32)> = answer
        .errors
        .iter()
        .map(|e| {
            let cause = e.caused_by.as_ref().unwrap();
            (cause.users[0].id.clone(), e.code)
        })
        .collect();
    assert_eq!(
        refused,
        vec![("alice".to_string(), 404), (CAROL.to_string(), 400)],
        "the unknown user and the revoke of a role not held fail; the rest applies"
    );

    // Bob moves from VIEWER to EDITOR: a user holds one role.
    g.update_permissions()
        .workspace_id(&id)
        .update_instruction_batch(instruction(
            UpdateAction::Add,
            Role::Editor,
            vec![user(BOB, UserType::SsoUser)],
        ))
        .send()
        .await
        .unwrap();

    let all: Vec<(String, String)> = g
        .list_permissions()
        .workspace_id(&id)
        .max_results(1)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.user.unwrap().id, p.role.as_str().to_string()))
        .collect();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.contains(&(ADMINS.to_string(), "ADMIN".to_string())));
    assert!(all.contains(&(ALICE.to_string(), "VIEWER".to_string())));
    assert!(all.contains(&(BOB.to_string(), "EDITOR".to_string())));

    let groups = g
        .list_permissions()
        .workspace_id(&id)
        .user_type(UserType::SsoGroup)
        .send()
        .await
        .unwrap();
    assert_eq!(groups.permissions.len(), 1);
    let alice = g
        .list_permissions()
        .workspace_id(&id)
        .user_id(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(alice.permissions.len(), 1);
    assert_eq!(alice.permissions[0].role.as_str(), "VIEWER");

    let revoked = g
        .update_permissions()
        .workspace_id(&id)
        .update_instruction_batch(instruction(
            UpdateAction::Revoke,
            Role::Viewer,
            vec![user(ALICE, UserType::SsoUser)],
        ))
        .send()
        .await
        .unwrap();
    assert!(revoked.errors.is_empty());
    let left = g.list_permissions().workspace_id(&id).send().await.unwrap();
    assert_eq!(left.permissions.len(), 2);
}

const ALERTMANAGER_OK: &str = r#"alertmanager_config: |
  route:
    receiver: default
    group_wait: 30s
  receivers:
    - name: default
      sns_configs:
        - topic_arn: arn:aws:sns:us-east-1:123456789012:alerts
"#;

async fn definition_status(
    amp: &aws_sdk_amp::Client,
    ws: &str,
) -> Option<(String, Option<String>)> {
    let d = amp
        .describe_alert_manager_definition()
        .workspace_id(ws)
        .send()
        .await
        .ok()?
        .alert_manager_definition?;
    let status = d.status?;
    Some((
        status.status_code.as_str().to_string(),
        status.status_reason,
    ))
}

async fn wait_definition(amp: &aws_sdk_amp::Client, ws: &str, code: &str) -> Option<String> {
    eventually(&format!("alertmanager definition {code}"), || async {
        let (c, reason) = definition_status(amp, ws).await?;
        (c == code).then_some(reason)
    })
    .await
}

#[tokio::test]
async fn alertmanager_definitions_settle_fail_with_reasons_and_go_with_their_workspace() {
    let aws = Aws::start();
    let amp = aws.amp().await;
    let ws = amp
        .create_workspace()
        .alias("alerts")
        .send()
        .await
        .unwrap()
        .workspace_id;

    let missing = amp
        .create_alert_manager_definition()
        .workspace_id("ws-00000000-0000-0000-0000-000000000000")
        .data(Blob::new(ALERTMANAGER_OK))
        .send()
        .await;
    assert!(missing
        .expect_err("no such workspace")
        .as_service_error()
        .is_some_and(|e| e.is_resource_not_found_exception()));
    assert_eq!(
        code(
            amp.describe_alert_manager_definition()
                .workspace_id(&ws)
                .send()
                .await
        ),
        "ResourceNotFoundException"
    );

    let created = amp
        .create_alert_manager_definition()
        .workspace_id(&ws)
        .data(Blob::new(ALERTMANAGER_OK))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().status_code.as_str(), "CREATING");
    assert_eq!(
        code(
            amp.create_alert_manager_definition()
                .workspace_id(&ws)
                .data(Blob::new(ALERTMANAGER_OK))
                .send()
                .await
        ),
        "ConflictException"
    );
    wait_definition(&amp, &ws, "ACTIVE").await;

    let slack = ALERTMANAGER_OK.replace(
        "sns_configs:\n        - topic_arn: arn:aws:sns:us-east-1:123456789012:alerts",
        "slack_configs:\n        - channel: '#ops'",
    );
    let put = amp
        .put_alert_manager_definition()
        .workspace_id(&ws)
        .data(Blob::new(slack))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status.unwrap().status_code.as_str(), "UPDATING");
    let reason = wait_definition(&amp, &ws, "UPDATE_FAILED").await.unwrap();
    assert!(
        reason.contains("slack_configs is not supported"),
        "{reason}"
    );
    let kept = amp
        .describe_alert_manager_definition()
        .workspace_id(&ws)
        .send()
        .await
        .unwrap()
        .alert_manager_definition
        .unwrap();
    assert_eq!(
        kept.data.as_ref(),
        ALERTMANAGER_OK.as_bytes(),
        "a failed update keeps the definition in force"
    );

    let undefined = ALERTMANAGER_OK.replace("receiver: default", "receiver: pager");
    amp.put_alert_manager_definition()
        .workspace_id(&ws)
        .data(Blob::new(undefined))
        .send()
        .await
        .unwrap();
    let reason = wait_definition(&amp, &ws, "UPDATE_FAILED").await.unwrap();
    assert_eq!(reason, "undefined receiver \"pager\" used in route");

    amp.delete_alert_manager_definition()
        .workspace_id(&ws)
        .send()
        .await
        .unwrap();
    eventually("the definition gone", || async {
        definition_status(&amp, &ws).await.is_none().then_some(())
    })
    .await;

    let broken = amp
        .create_alert_manager_definition()
        .workspace_id(&ws)
        .data(Blob::new("route: {}"))
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status.unwrap().status_code.as_str(), "CREATING");
    let reason = wait_definition(&amp, &ws, "CREATION_FAILED").await.unwrap();
    assert!(reason.contains("route"), "{reason}");

    amp.delete_workspace()
        .workspace_id(&ws)
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(
            amp.describe_alert_manager_definition()
                .workspace_id(&ws)
                .send()
                .await
        ),
        "ResourceNotFoundException",
        "the definition goes with its workspace"
    );
}

/// Launches `count` running instances in moto with the given tags.
async fn instances(aws: &Aws, count: i32, tags: &[(&str, &str)]) -> Vec<String> {
    let ec2 = aws.ec2().await;
    let mut spec = aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(aws_sdk_ec2::types::ResourceType::Instance);
    for (k, v) in tags {
        spec = spec.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
    }
    let mut run = ec2
        .run_instances()
        .image_id(AMI)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(count)
        .max_count(count);
    if !tags.is_empty() {
        run = run.tag_specifications(spec.build());
    }
    let out = run.send().await.unwrap();
    out.instances()
        .iter()
        .map(|i| i.instance_id().unwrap().to_string())
        .collect()
}

/// A launch template of the test AMI, for Auto Scaling groups.
async fn launch_template(
    ec2: &aws_sdk_ec2::Client,
    name: &str,
) -> aws_sdk_ec2::types::LaunchTemplate {
    ec2.create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(AMI)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .launch_template
        .unwrap()
}

async fn wait_command(ssm: &aws_sdk_ssm::Client, id: &str) -> aws_sdk_ssm::types::Command {
    eventually(&format!("command {id} done"), || async {
        let out = ssm.list_commands().command_id(id).send().await.ok()?;
        let c = out.commands?.into_iter().next()?;
        let open = matches!(
            c.status,
            Some(CommandStatus::Pending | CommandStatus::InProgress | CommandStatus::Cancelling)
        );
        (!open).then_some(c)
    })
    .await
}

async fn run_shell(
    ssm: &aws_sdk_ssm::Client,
    instances: &[String],
    script: &str,
) -> aws_sdk_ssm::types::Command {
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(instances.to_vec()))
        .parameters("commands", vec![script.to_string()])
        .send()
        .await
        .unwrap()
        .command
        .unwrap();
    wait_command(ssm, sent.command_id().unwrap()).await
}

#[tokio::test]
async fn run_command_runs_each_script_in_its_instance_sandbox() {
    let aws = Aws::start();
    let ssm = aws.ssm().await;
    let ids = instances(&aws, 2, &[("Role", "prometheus")]).await;
    let roots: Vec<tempfile::TempDir> = ids.iter().map(|_| tempfile::tempdir().unwrap()).collect();
    for (id, root) in ids.iter().zip(&roots) {
        aws.emulator.set_sandbox(
            id,
            Sandbox {
                root: root.path().to_path_buf(),
                env: [(
                    "PROMETHEUS_URL".to_string(),
                    "http://127.0.0.1:9".to_string(),
                )]
                .into(),
            },
        );
    }
    let command = run_shell(
        &ssm,
        &ids,
        "mkdir -p \"$STACKWARDEN_ROOT/etc/prometheus\"\necho scrape > \"$STACKWARDEN_ROOT/etc/prometheus/prometheus.yml\"\necho \"pushed to $PROMETHEUS_URL from $(pwd)\"",
    )
    .await;
    assert_eq!(command.status, Some(CommandStatus::Success));
    assert_eq!(command.target_count, 2);
    assert_eq!(command.completed_count, 2);
    assert_eq!(command.error_count, 0);
    for (id, root) in ids.iter().zip(&roots) {
        let written =
            std::fs::read_to_string(root.path().join("etc/prometheus/prometheus.yml")).unwrap();
        assert_eq!(written, "scrape\n");
        let inv = ssm
            .get_command_invocation()
            .command_id(command.command_id().unwrap())
            .instance_id(id)
            .send()
            .await
            .unwrap();
        assert_eq!(inv.status, Some(CommandInvocationStatus::Success));
        assert_eq!(inv.response_code, 0);
        assert_eq!(
            inv.standard_output_content.unwrap(),
            format!(
                "pushed to http://127.0.0.1:9 from {}\n",
                root.path().display()
            )
        );
        assert!(!inv.execution_end_date_time.unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_sandboxed_script_calls_aws_as_its_instance_with_the_real_cli() {
    // Whatever region the machine running the tests has is not the instance's: a script names
    // its region.
    let aws = Aws::start();
    let ssm = aws.ssm().await;
    ssm.put_parameter()
        .name("/app/token")
        .value("first")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .unwrap();
    ssm.put_parameter()
        .name("/app/token")
        .value("second")
        .overwrite(true)
        .send()
        .await
        .unwrap();
    let ids = instances(&aws, 1, &[]).await;
    let root = tempfile::tempdir().unwrap();
    aws.emulator.set_sandbox(
        &ids[0],
        Sandbox {
            root: root.path().to_path_buf(),
            env: BTreeMap::new(),
        },
    );
    let command = run_shell(
        &ssm,
        &ids,
        "echo \"region=${AWS_REGION:-none} metadata=$AWS_EC2_METADATA_DISABLED\"\naws ssm get-parameter --region us-east-1 --name /app/token:1 --with-decryption --query Parameter.Value --output text",
    )
    .await;
    let inv = ssm
        .get_command_invocation()
        .command_id(command.command_id().unwrap())
        .instance_id(&ids[0])
        .send()
        .await
        .unwrap();
    assert_eq!(
        inv.status,
        Some(CommandInvocationStatus::Success),
        "{:?}",
        inv.standard_error_content
    );
    assert_eq!(
        inv.standard_output_content.unwrap(),
        "region=none metadata=true\nfirst\n"
    );
    let fetches: Vec<_> = aws
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.operation == "GetParameter")
        .collect();
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    assert_eq!(
        fetches[0].caller,
        stackwarden_emulator::instance_access_key(&ids[0])
    );
    assert_eq!(fetches[0].status, 200);
}

/// A principal held to an IAM policy: each call is the authorizations AWS makes for it (the
/// action on each resource, with request tags, resource tags, tag-on-create and PassRole),
/// evaluated with the policy's conditions; what is not allowed is refused with AWS's error.
#[tokio::test]
async fn calls_are_held_to_an_enforced_policy_as_iam_evaluates_it() {
    let policy = serde_json::json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["ec2:Describe*"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["ec2:RunInstances"], "Resource": "*",
         "Condition": {"Null": {"aws:RequestTag/stackwarden:stack": "false"}}},
        {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
         "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
        {"Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "*",
         "Condition": {"Null": {"aws:ResourceTag/stackwarden:stack": "false"}}},
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": "arn:aws:iam::*:role/allowed-*",
         "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
        {"Effect": "Allow", "Action": "iam:PutRolePolicy", "Resource": "*",
         "Condition": {"Null": {"aws:ResourceTag/stackwarden:stack": "false"}}},
        {"Effect": "Allow", "Action": "iam:TagRole", "Resource": "*",
         "Condition": {"Null": {"aws:RequestTag/stackwarden:stack": "false"}}},
    ]});
    let aws = Aws::with(Settings {
        enforce: Some(stackwarden_emulator::Enforce {
            access_key: "AKIAHELD".into(),
            policy,
        }),
        ..Settings::default()
    });
    let iam = aws.iam().await;
    for (role, profile) in [("allowed-prometheus", "allowed"), ("other-role", "other")] {
        iam.create_role()
            .role_name(role)
            .assume_role_policy_document(r#"{"Version":"2012-10-17","Statement":[]}"#)
            .send()
            .await
            .unwrap();
        iam.create_instance_profile()
            .instance_profile_name(profile)
            .send()
            .await
            .unwrap();
        iam.add_role_to_instance_profile()
            .instance_profile_name(profile)
            .role_name(role)
            .send()
            .await
            .unwrap();
    }
    let untagged = instances(&aws, 1, &[]).await;
    let held = aws_sdk_ec2::Client::new(&aws.sdk_as("us-east-1", "AKIAHELD").await);
    let run = |tags: &[(&str, &str)], profile: Option<&str>| {
        let mut call = held
            .run_instances()
            .image_id("ami-12c6146b")
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1);
        if !tags.is_empty() {
            let mut spec = aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance);
            for (k, v) in tags {
                spec = spec.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
            }
            call = call.tag_specifications(spec.build());
        }
        if let Some(p) = profile {
            call = call.iam_instance_profile(
                aws_sdk_ec2::types::IamInstanceProfileSpecification::builder()
                    .name(p)
                    .build(),
            );
        }
        call.send()
    };
    // Without the tag the condition asks for in the request: refused, as EC2 refuses.
    let refused = run(&[("Name", "x")], None).await.expect_err("untagged");
    assert_eq!(refused.code(), Some("UnauthorizedOperation"));
    assert!(
        refused
            .message()
            .unwrap()
            .contains("not authorized to perform: ec2:RunInstances on resource: arn:aws:ec2:us-east-1:123456789012:instance/*"),
        "{refused:?}"
    );
    // Tagged, but passing a role the policy does not let it pass.
    let refused = run(&[("stackwarden:stack", "s")], Some("other"))
        .await
        .expect_err("role");
    assert!(
        refused
            .message()
            .unwrap()
            .contains("iam:PassRole on resource: arn:aws:iam::123456789012:role/other-role"),
        "{refused:?}"
    );
    let launched = run(&[("stackwarden:stack", "s")], Some("allowed"))
        .await
        .unwrap();
    let mine = launched.instances()[0].instance_id().unwrap().to_string();
    // Changes only to what carries the tag.
    assert_eq!(
        code(
            held.terminate_instances()
                .instance_ids(&untagged[0])
                .send()
                .await
        ),
        "UnauthorizedOperation"
    );
    held.terminate_instances()
        .instance_ids(&mine)
        .send()
        .await
        .unwrap();
    // IAM: a role changes only once it carries the tag, which the principal may put on it.
    let held_iam = aws_sdk_iam::Client::new(&aws.sdk_as("us-east-1", "AKIAHELD").await);
    let put = || {
        held_iam
            .put_role_policy()
            .role_name("other-role")
            .policy_name("read")
            .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#)
            .send()
    };
    assert_eq!(code(put().await), "AccessDenied");
    held_iam
        .tag_role()
        .role_name("other-role")
        .tags(
            aws_sdk_iam::types::Tag::builder()
                .key("stackwarden:stack")
                .value("s")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    put().await.unwrap();
    // Another principal is not held to it.
    aws.ec2()
        .await
        .terminate_instances()
        .instance_ids(&untagged[0])
        .send()
        .await
        .unwrap();
    let calls = aws.emulator.calls();
    let refusals = calls
        .iter()
        .filter(|c| c.caller == "AKIAHELD" && c.status == 403)
        .count();
    assert_eq!(refusals, 4);
}

#[tokio::test]
async fn a_failing_script_is_a_failed_invocation_carrying_its_stderr() {
    let aws = Aws::start();
    let ssm = aws.ssm().await;
    let ids = instances(&aws, 1, &[]).await;
    let root = tempfile::tempdir().unwrap();
    aws.emulator.set_sandbox(
        &ids[0],
        Sandbox {
            root: root.path().to_path_buf(),
            env: BTreeMap::new(),
        },
    );
    let command = run_shell(
        &ssm,
        &ids,
        "echo checking\necho 'promtool: prometheus.yml: parsing YAML file failed' >&2\nexit 3",
    )
    .await;
    assert_eq!(command.status, Some(CommandStatus::Failed));
    assert_eq!(command.status_details.as_deref(), Some("Failed"));
    assert_eq!(command.error_count, 1);
    let inv = ssm
        .get_command_invocation()
        .command_id(command.command_id().unwrap())
        .instance_id(&ids[0])
        .send()
        .await
        .unwrap();
    assert_eq!(inv.status, Some(CommandInvocationStatus::Failed));
    assert_eq!(inv.response_code, 3);
    assert_eq!(inv.standard_output_content.as_deref(), Some("checking\n"));
    assert_eq!(
        inv.standard_error_content.as_deref(),
        Some("promtool: prometheus.yml: parsing YAML file failed\n")
    );
}

#[tokio::test]
async fn tag_targets_honour_max_concurrency_and_max_errors() {
    let aws = Aws::start();
    let sandboxes = tempfile::tempdir().unwrap();
    aws.emulator
        .configure(|s| s.sandbox_dir = Some(sandboxes.path().to_path_buf()));
    let ssm = aws.ssm().await;
    let fleet = instances(&aws, 3, &[("Role", "node")]).await;
    instances(&aws, 1, &[("Role", "other")]).await;
    let target = Target::builder().key("tag:Role").values("node").build();

    // One at a time: the runs do not overlap.
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .targets(target.clone())
        .max_concurrency("1")
        .parameters(
            "commands",
            vec!["date +%s%N; sleep 0.2; date +%s%N".to_string()],
        )
        .send()
        .await
        .unwrap()
        .command
        .unwrap();
    let id = sent.command_id().unwrap().to_string();
    let done = wait_command(&ssm, &id).await;
    assert_eq!(done.status, Some(CommandStatus::Success));
    assert_eq!(done.target_count, 3, "only the tagged instances");
    let mut spans: Vec<(u128, u128)> = Vec::new();
    for inv in fleet.iter() {
        let out = ssm
            .get_command_invocation()
            .command_id(&id)
            .instance_id(inv)
            .send()
            .await
            .unwrap()
            .standard_output_content
            .unwrap();
        let t: Vec<u128> = out.lines().map(|l| l.parse().unwrap()).collect();
        spans.push((t[0], t[1]));
        assert!(sandboxes.path().join(inv).is_dir(), "automatic sandbox");
    }
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "runs overlapped with MaxConcurrency 1: {spans:?}"
    );

    // MaxErrors 0: after the first failure the rest are not sent.
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .targets(target)
        .max_concurrency("1")
        .max_errors("0")
        .parameters("commands", vec!["exit 1".to_string()])
        .send()
        .await
        .unwrap()
        .command
        .unwrap();
    let done = wait_command(&ssm, sent.command_id().unwrap()).await;
    assert_eq!(done.status, Some(CommandStatus::Failed));
    assert_eq!(done.error_count, 1);
    assert_eq!(done.completed_count, 3);
    let invocations = ssm
        .list_command_invocations()
        .command_id(sent.command_id().unwrap())
        .send()
        .await
        .unwrap()
        .command_invocations
        .unwrap();
    let mut details: Vec<String> = invocations
        .iter()
        .map(|i| i.status_details.clone().unwrap())
        .collect();
    details.sort();
    assert_eq!(details, ["Failed", "Terminated", "Terminated"]);
}

#[tokio::test]
async fn command_invocations_page_with_details_and_commands_cancel_and_time_out() {
    let aws = Aws::start();
    let sandboxes = tempfile::tempdir().unwrap();
    aws.emulator
        .configure(|s| s.sandbox_dir = Some(sandboxes.path().to_path_buf()));
    let ssm = aws.ssm().await;
    let ids = instances(&aws, 3, &[]).await;
    let command = run_shell(&ssm, &ids, "echo out; echo err >&2").await;
    let id = command.command_id().unwrap();
    let page = ssm
        .list_command_invocations()
        .command_id(id)
        .max_results(2)
        .details(true)
        .send()
        .await
        .unwrap();
    assert_eq!(page.command_invocations().len(), 2);
    assert!(page.next_token().is_some());
    let all: Vec<_> = ssm
        .list_command_invocations()
        .command_id(id)
        .max_results(2)
        .details(true)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    for inv in &all {
        let plugin = &inv.command_plugins()[0];
        assert_eq!(plugin.name(), Some("aws:runShellScript"));
        assert_eq!(plugin.response_code, 0);
        assert_eq!(
            plugin.output(),
            Some("out\n\n----------ERROR-------\nerr\n")
        );
    }
    assert_eq!(
        code(
            ssm.list_command_invocations()
                .command_id(id)
                .next_token("forged")
                .send()
                .await
        ),
        "InvalidNextToken"
    );
    let completed = ssm
        .list_commands()
        .filters(
            aws_sdk_ssm::types::CommandFilter::builder()
                .key(aws_sdk_ssm::types::CommandFilterKey::ExecutionStage)
                .value("Complete")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(completed.commands().len(), 1);

    // Cancel kills a running script.
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .instance_ids(&ids[0])
        .parameters("commands", vec!["sleep 30".to_string()])
        .send()
        .await
        .unwrap()
        .command
        .unwrap();
    let cid = sent.command_id().unwrap();
    eventually("the script running", || async {
        let inv = ssm
            .get_command_invocation()
            .command_id(cid)
            .instance_id(&ids[0])
            .send()
            .await
            .ok()?;
        (inv.status == Some(CommandInvocationStatus::InProgress)).then_some(())
    })
    .await;
    let started = Instant::now();
    ssm.cancel_command().command_id(cid).send().await.unwrap();
    let done = wait_command(&ssm, cid).await;
    assert_eq!(done.status, Some(CommandStatus::Cancelled));
    assert!(started.elapsed() < Duration::from_secs(10));

    // The document's executionTimeout ends a script that runs too long.
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .instance_ids(&ids[1])
        .parameters("commands", vec!["sleep 30".to_string()])
        .parameters("executionTimeout", vec!["1".to_string()])
        .send()
        .await
        .unwrap()
        .command
        .unwrap();
    let done = wait_command(&ssm, sent.command_id().unwrap()).await;
    assert_eq!(done.status, Some(CommandStatus::TimedOut));
    let inv = ssm
        .get_command_invocation()
        .command_id(sent.command_id().unwrap())
        .instance_id(&ids[1])
        .send()
        .await
        .unwrap();
    assert_eq!(inv.status_details.as_deref(), Some("Execution Timed Out"));
}

#[tokio::test]
async fn run_command_errors_and_unsandboxed_instances() {
    let aws = Aws::start();
    let ssm = aws.ssm().await;
    let ids = instances(&aws, 1, &[]).await;
    let send = |document: &str, instances: Vec<String>, script: String| {
        ssm.send_command()
            .document_name(document)
            .set_instance_ids(Some(instances))
            .parameters("commands", vec![script])
            .send()
    };
    let unknown = send(
        "AWS-RunShellScript",
        vec!["i-0123456789abcdef0".into()],
        "true".into(),
    )
    .await;
    assert!(unknown
        .expect_err("no such instance")
        .as_service_error()
        .is_some_and(|e| e.is_invalid_instance_id()));
    assert_eq!(
        code(send("AWS-RunPowerShellScript", ids.clone(), "true".into()).await),
        "InvalidDocument"
    );
    assert_eq!(
        code(send("AWS-RunShellScript", ids.clone(), "#".repeat(70_000)).await),
        "MaxDocumentSizeExceeded"
    );
    assert_eq!(
        code(
            send(
                "AWS-RunShellScript",
                vec![ids[0].clone(), ids[0].clone()],
                "true".into()
            )
            .await
        ),
        "DuplicateInstanceId"
    );

    // No sandbox: succeed without running (the default), or fail when so configured.
    let command = run_shell(&ssm, &ids, "exit 7").await;
    assert_eq!(command.status, Some(CommandStatus::Success));
    aws.emulator
        .configure(|s| s.unsandboxed = Unsandboxed::Fail);
    let command = run_shell(&ssm, &ids, "true").await;
    assert_eq!(command.status, Some(CommandStatus::Failed));
    let cid = command.command_id().unwrap();
    let inv = ssm
        .get_command_invocation()
        .command_id(cid)
        .instance_id(&ids[0])
        .send()
        .await
        .unwrap();
    assert!(inv.standard_error_content().unwrap().contains("no sandbox"));

    let other = instances(&aws, 1, &[]).await;
    assert!(ssm
        .get_command_invocation()
        .command_id(cid)
        .instance_id(&other[0])
        .send()
        .await
        .expect_err("not sent there")
        .as_service_error()
        .is_some_and(|e| e.is_invocation_does_not_exist()));
    assert!(ssm
        .get_command_invocation()
        .command_id("00000000-0000-4000-8000-000000000000")
        .instance_id(&ids[0])
        .send()
        .await
        .expect_err("no such command")
        .as_service_error()
        .is_some_and(|e| e.is_invalid_command_id()));

    // What the emulator does not serve reaches moto.
    ssm.put_parameter()
        .name("/stackwarden/test")
        .value("v")
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let got = ssm
        .get_parameter()
        .name("/stackwarden/test")
        .send()
        .await
        .unwrap();
    assert_eq!(got.parameter.unwrap().value.as_deref(), Some("v"));
}

#[tokio::test]
async fn instance_refresh_runs_once_at_a_time_succeeds_and_replaces_instances() {
    let aws = Aws::with(Settings {
        refresh_polls: 3,
        ..Settings::default()
    });
    let ec2 = aws.ec2().await;
    let asg = aws.autoscaling().await;
    let template = launch_template(&ec2, "grafana").await;
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("grafana")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(template.launch_template_id().unwrap())
                .version("$Latest")
                .build(),
        )
        .min_size(2)
        .max_size(2)
        .desired_capacity(2)
        .availability_zones("us-east-1a")
        .send()
        .await
        .unwrap();
    let group_instances = || async {
        let groups = asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names("grafana")
            .send()
            .await
            .unwrap();
        let mut ids: Vec<String> = groups.auto_scaling_groups()[0]
            .instances()
            .iter()
            .map(|i| i.instance_id().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let before = group_instances().await;
    assert_eq!(before.len(), 2);

    assert_eq!(
        code(
            asg.start_instance_refresh()
                .auto_scaling_group_name("nope")
                .send()
                .await
        ),
        "ValidationError"
    );
    let refresh_id = asg
        .start_instance_refresh()
        .auto_scaling_group_name("grafana")
        .preferences(
            aws_sdk_autoscaling::types::RefreshPreferences::builder()
                .min_healthy_percentage(50)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .instance_refresh_id
        .unwrap();
    let again = asg
        .start_instance_refresh()
        .auto_scaling_group_name("grafana")
        .send()
        .await;
    assert!(again
        .expect_err("one refresh at a time")
        .as_service_error()
        .is_some_and(|e| e.is_instance_refresh_in_progress_fault()));

    let mut seen = Vec::new();
    for _ in 0..3 {
        let out = asg
            .describe_instance_refreshes()
            .auto_scaling_group_name("grafana")
            .send()
            .await
            .unwrap();
        let r = &out.instance_refreshes()[0];
        assert_eq!(r.instance_refresh_id(), Some(refresh_id.as_str()));
        assert_eq!(r.preferences().unwrap().min_healthy_percentage(), Some(50));
        seen.push((
            r.status().unwrap().as_str().to_string(),
            r.percentage_complete().unwrap(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("InProgress".to_string(), 33),
            ("InProgress".to_string(), 66),
            ("Successful".to_string(), 100)
        ]
    );
    let after = eventually("replacement instances", || async {
        let now = group_instances().await;
        (now.len() == 2 && now.iter().all(|i| !before.contains(i))).then_some(now)
    })
    .await;
    assert_eq!(after.len(), 2);

    let second = asg
        .start_instance_refresh()
        .auto_scaling_group_name("grafana")
        .send()
        .await
        .unwrap()
        .instance_refresh_id
        .unwrap();
    let cancelled = asg
        .cancel_instance_refresh()
        .auto_scaling_group_name("grafana")
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.instance_refresh_id(), Some(second.as_str()));
    assert!(asg
        .cancel_instance_refresh()
        .auto_scaling_group_name("grafana")
        .send()
        .await
        .expect_err("nothing to cancel")
        .as_service_error()
        .is_some_and(|e| e.is_active_instance_refresh_not_found_fault()));
    let listed = asg
        .describe_instance_refreshes()
        .auto_scaling_group_name("grafana")
        .max_records(1)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.instance_refreshes().len(), 1);
    assert_eq!(
        listed.instance_refreshes()[0].status().unwrap().as_str(),
        "Cancelled",
        "newest first"
    );
    let rest = asg
        .describe_instance_refreshes()
        .auto_scaling_group_name("grafana")
        .next_token(listed.next_token().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        rest.instance_refreshes()[0].status().unwrap().as_str(),
        "Successful"
    );
}

/// A refresh with a desired configuration (a new launch template version): while it runs the
/// group's launch template cannot be changed (AWS's `ValidationError`); when it succeeds the
/// group is pinned to the desired version and its instances replaced from it; when it fails,
/// or rolls back, it carries the `StatusReason` of the setting, no instance is replaced and
/// the group keeps its version; a cancelled one ends `Cancelled`, nothing replaced either.
#[tokio::test]
async fn an_instance_refresh_ends_as_set_with_its_status_reason_and_blocks_a_repin_meanwhile() {
    use aws_sdk_autoscaling::types::{DesiredConfiguration, LaunchTemplateSpecification};
    use stackwarden_emulator::RefreshOutcome;

    let aws = Aws::with(Settings {
        refresh_polls: 2,
        refresh_outcome: RefreshOutcome::Failed {
            reason: "Instances failed to pass ELB health checks".into(),
        },
        ..Settings::default()
    });
    let ec2 = aws.ec2().await;
    let asg = aws.autoscaling().await;
    let template = launch_template(&ec2, "grafana").await;
    let id = template.launch_template_id().unwrap().to_string();
    ec2.create_launch_template_version()
        .launch_template_id(&id)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(AMI)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Small)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let version = |v: &str| {
        LaunchTemplateSpecification::builder()
            .launch_template_id(&id)
            .version(v)
            .build()
    };
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("grafana")
        .launch_template(version("1"))
        .min_size(2)
        .max_size(2)
        .desired_capacity(2)
        .availability_zones("us-east-1a")
        .send()
        .await
        .unwrap();
    let group = || async {
        let groups = asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names("grafana")
            .send()
            .await
            .unwrap();
        let g = groups.auto_scaling_groups()[0].clone();
        let mut ids: Vec<String> = g
            .instances()
            .iter()
            .map(|i| i.instance_id().unwrap().to_string())
            .collect();
        ids.sort();
        (
            g.launch_template()
                .and_then(|t| t.version())
                .unwrap_or_default()
                .to_string(),
            ids,
        )
    };
    let start = || async {
        asg.start_instance_refresh()
            .auto_scaling_group_name("grafana")
            .desired_configuration(
                DesiredConfiguration::builder()
                    .launch_template(version("2"))
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .instance_refresh_id
            .unwrap()
    };
    let ends = || async {
        loop {
            let out = asg
                .describe_instance_refreshes()
                .auto_scaling_group_name("grafana")
                .max_records(1)
                .send()
                .await
                .unwrap();
            let r = out.instance_refreshes()[0].clone();
            if !matches!(r.status().unwrap().as_str(), "Pending" | "InProgress") {
                return r;
            }
        }
    };
    let (pinned, before) = group().await;
    assert_eq!((pinned.as_str(), before.len()), ("1", 2));

    // Failed: the reason as StatusReason, nothing replaced, the group on its version.
    let failed = start().await;
    let repin = asg
        .update_auto_scaling_group()
        .auto_scaling_group_name("grafana")
        .launch_template(version("2"))
        .send()
        .await;
    let err = repin.expect_err("no repin while the refresh runs");
    assert_eq!(err.code(), Some("ValidationError"));
    assert_eq!(
        err.message(),
        Some("An active instance refresh with a desired configuration exists. All configuration options derived from the desired configuration are not available for update while the instance refresh is active.")
    );
    // Sizes are not the desired configuration's: they change meanwhile.
    asg.update_auto_scaling_group()
        .auto_scaling_group_name("grafana")
        .max_size(3)
        .send()
        .await
        .unwrap();
    let r = ends().await;
    assert_eq!(r.instance_refresh_id(), Some(failed.as_str()));
    assert_eq!(r.status().unwrap().as_str(), "Failed");
    assert_eq!(
        r.status_reason(),
        Some("Instances failed to pass ELB health checks")
    );
    assert!(r.end_time().is_some());
    assert_eq!(group().await, ("1".to_string(), before.clone()));

    // Rolled back: the same, with its own status.
    aws.emulator.configure(|s| {
        s.refresh_outcome = RefreshOutcome::RollbackSuccessful {
            reason: "Rollback triggered by alarm".into(),
        }
    });
    start().await;
    let r = ends().await;
    assert_eq!(
        (r.status().unwrap().as_str(), r.status_reason()),
        ("RollbackSuccessful", Some("Rollback triggered by alarm"))
    );
    assert_eq!(group().await, ("1".to_string(), before.clone()));

    // Cancelled: nothing replaced.
    let cancelled = start().await;
    asg.cancel_instance_refresh()
        .auto_scaling_group_name("grafana")
        .send()
        .await
        .unwrap();
    let r = ends().await;
    assert_eq!(r.instance_refresh_id(), Some(cancelled.as_str()));
    assert_eq!(r.status().unwrap().as_str(), "Cancelled");
    assert_eq!(group().await, ("1".to_string(), before.clone()));

    // Successful: pinned to the desired version, every instance replaced; the group's launch
    // template can be changed again.
    aws.emulator
        .configure(|s| s.refresh_outcome = RefreshOutcome::Successful);
    start().await;
    let r = ends().await;
    assert_eq!(
        (r.status().unwrap().as_str(), r.status_reason()),
        ("Successful", None)
    );
    let (pinned, after) = eventually("replacement instances", || async {
        let (pinned, now) = group().await;
        (now.len() == 2 && now.iter().all(|i| !before.contains(i))).then_some((pinned, now))
    })
    .await;
    assert_eq!((pinned.as_str(), after.len()), ("2", 2));
    asg.update_auto_scaling_group()
        .auto_scaling_group_name("grafana")
        .launch_template(version("1"))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn faults_take_each_protocols_shape_and_stop_after_their_count() {
    let aws = Aws::start();
    for (service, operation) in [
        ("ec2", "DescribeInstances"),
        ("iam", "ListRoles"),
        ("ssm", "ListCommands"),
        ("grafana", "ListWorkspaces"),
    ] {
        aws.emulator
            .inject(Fault::on(service, operation, FaultKind::Throttle).times(1));
    }
    aws.emulator.inject(
        Fault::on(
            "autoscaling",
            "DescribeAutoScalingGroups",
            FaultKind::ServerError { status: 503 },
        )
        .times(1),
    );
    aws.emulator
        .inject(Fault::on("aps", "ListWorkspaces", FaultKind::Reset).times(1));

    let ec2 = aws.ec2().await;
    let iam = aws.iam().await;
    let ssm = aws.ssm().await;
    let grafana = aws.grafana().await;
    let asg = aws.autoscaling().await;
    let amp = aws.amp().await;

    let err = ec2
        .describe_instances()
        .send()
        .await
        .expect_err("throttled");
    assert_eq!(err.code(), Some("RequestLimitExceeded"));
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 503);
    assert_eq!(code(iam.list_roles().send().await), "Throttling");
    assert_eq!(
        code(ssm.list_commands().send().await),
        "ThrottlingException"
    );
    let err = grafana
        .list_workspaces()
        .send()
        .await
        .expect_err("throttled");
    assert!(err
        .as_service_error()
        .is_some_and(|e| e.is_throttling_exception()));
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 429);
    let err = asg
        .describe_auto_scaling_groups()
        .send()
        .await
        .expect_err("unavailable");
    assert_eq!(err.code(), Some("ServiceUnavailable"));
    assert_eq!(err.raw_response().unwrap().status().as_u16(), 503);
    let err = amp.list_workspaces().send().await.expect_err("reset");
    assert!(
        matches!(
            err,
            aws_sdk_amp::error::SdkError::ResponseError(_)
                | aws_sdk_amp::error::SdkError::DispatchFailure(_)
        ),
        "a dropped connection: {err:?}"
    );

    // Each fault fired once; the next calls pass.
    ec2.describe_instances().send().await.unwrap();
    iam.list_roles().send().await.unwrap();
    ssm.list_commands().send().await.unwrap();
    grafana.list_workspaces().send().await.unwrap();
    asg.describe_auto_scaling_groups().send().await.unwrap();
    amp.list_workspaces().send().await.unwrap();

    let calls = aws.emulator.calls();
    assert_eq!(calls.iter().filter(|c| c.fault).count(), 6);
    assert!(calls
        .iter()
        .any(|c| c.service == "grafana" && c.operation == "ListWorkspaces" && c.status == 429));
    assert!(calls
        .iter()
        .any(|c| c.service == "aps" && c.operation == "ListWorkspaces" && c.status == 200));
}

/// One HTTP/1.1 request to the emulator's control API: (status, body).
fn control(aws: &Aws, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = aws.endpoint.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn the_control_api_sets_sandboxes_settings_and_faults_and_lists_calls() {
    let aws = Aws::start();
    let ssm = aws.ssm().await;
    let ids = instances(&aws, 1, &[]).await;
    let root = tempfile::tempdir().unwrap();
    let sandbox = serde_json::json!({"root": root.path(), "env": {"GREETING": "hello"}});
    let (status, _) = control(
        &aws,
        "PUT",
        &format!("/_emulator/sandboxes/{}", ids[0]),
        &sandbox.to_string(),
    );
    assert_eq!(status, 204);
    let command = run_shell(
        &ssm,
        &ids,
        "echo $GREETING > \"$STACKWARDEN_ROOT/greeting\"",
    )
    .await;
    assert_eq!(command.status, Some(CommandStatus::Success));
    assert_eq!(
        std::fs::read_to_string(root.path().join("greeting")).unwrap(),
        "hello\n"
    );

    let (status, settings) = control(
        &aws,
        "PUT",
        "/_emulator/settings",
        r#"{"refresh_polls": 7}"#,
    );
    assert_eq!(status, 200);
    let settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    assert_eq!(settings["refresh_polls"], 7);
    assert_eq!(
        settings["transition_delay"], 200,
        "fields not given are kept"
    );
    let (status, _) = control(&aws, "PUT", "/_emulator/settings", r#"{"nope": 1}"#);
    assert_eq!(status, 400);

    let fault = r#"{"service": "ssm", "operation": "ListCommands", "kind": {"type": "server_error", "status": 500}, "count": 1}"#;
    assert_eq!(control(&aws, "POST", "/_emulator/faults", fault).0, 201);
    assert_eq!(
        code(ssm.list_commands().send().await),
        "InternalServerError"
    );
    ssm.list_commands().send().await.unwrap();
    assert_eq!(control(&aws, "DELETE", "/_emulator/faults", "").0, 204);
    assert_eq!(control(&aws, "GET", "/_emulator/faults", "").1, "[]");

    let (status, calls) = control(&aws, "GET", "/_emulator/calls", "");
    assert_eq!(status, 200);
    let calls: Vec<serde_json::Value> = serde_json::from_str(&calls).unwrap();
    let seen: Vec<(&str, &str)> = calls
        .iter()
        .map(|c| {
            (
                c["service"].as_str().unwrap(),
                c["operation"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen[0], ("ec2", "RunInstances"));
    assert!(seen.contains(&("ssm", "SendCommand")));
    assert!(calls
        .iter()
        .any(|c| c["operation"] == "ListCommands" && c["status"] == 500 && c["fault"] == true));
}

#[tokio::test]
async fn an_emulator_can_front_a_moto_that_is_already_running() {
    let first = Aws::start();
    let second = stackwarden_emulator::Emulator::start(stackwarden_emulator::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: stackwarden_emulator::Backend::Url(first.emulator.moto_endpoint().to_string()),
        settings: Settings::default(),
    })
    .unwrap();
    let iam = first.iam().await;
    iam.create_role()
        .role_name("made-through-the-first")
        .assume_role_policy_document("{}")
        .send()
        .await
        .unwrap();
    let through_second = aws_sdk_iam::Client::from_conf(
        aws_sdk_iam::config::Builder::from(&first.sdk().await)
            .endpoint_url(second.endpoint())
            .build(),
    );
    let role = through_second
        .get_role()
        .role_name("made-through-the-first")
        .send()
        .await
        .unwrap();
    assert_eq!(role.role().unwrap().role_name(), "made-through-the-first");
    assert_eq!(second.moto_endpoint(), first.emulator.moto_endpoint());
}

/// An Auto Scaling group launches from any version of its launch template, as on AWS: one
/// made by `CreateLaunchTemplateVersion` with user data included (moto keeps that version's
/// user data unparsed and answers 500 when the group scales out from it; the emulator's moto
/// is corrected).
#[tokio::test(flavor = "multi_thread")]
async fn a_group_scales_out_from_a_new_template_version_with_user_data() {
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let asg = aws.autoscaling().await;
    let template = launch_template(&ec2, "grafana").await;
    let id = template.launch_template_id().unwrap();
    asg.create_auto_scaling_group()
        .auto_scaling_group_name("grafana")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(id)
                .version("$Latest")
                .build(),
        )
        .min_size(1)
        .max_size(3)
        .desired_capacity(1)
        .availability_zones("us-east-1a")
        .send()
        .await
        .unwrap();
    let version = ec2
        .create_launch_template_version()
        .launch_template_id(id)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(AMI)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .user_data("IyEvYmluL3NoCmVjaG8gaGVsbG8K")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        version.launch_template_version().unwrap().version_number(),
        Some(2)
    );
    asg.update_auto_scaling_group()
        .auto_scaling_group_name("grafana")
        .desired_capacity(2)
        .send()
        .await
        .unwrap();
    let group = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("grafana")
        .send()
        .await
        .unwrap();
    assert_eq!(group.auto_scaling_groups()[0].instances().len(), 2);
    let described = ec2
        .describe_launch_template_versions()
        .launch_template_id(id)
        .versions("2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.launch_template_versions()[0]
            .launch_template_data()
            .unwrap()
            .user_data(),
        Some("IyEvYmluL3NoCmVjaG8gaGVsbG8K")
    );
}

/// Where moto is lax, AWS's answers: a second CreateAutoScalingGroup of a name is
/// `AlreadyExists` (moto replaces the group, instances and all), and the group is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_create_of_an_auto_scaling_group_is_already_exists_and_changes_nothing() {
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let asg = aws.autoscaling().await;
    let template = launch_template(&ec2, "grafana").await;
    let create = |size: i32| {
        asg.create_auto_scaling_group()
            .auto_scaling_group_name("grafana")
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_id(template.launch_template_id().unwrap())
                    .version("$Latest")
                    .build(),
            )
            .min_size(size)
            .max_size(size)
            .desired_capacity(size)
            .availability_zones("us-east-1a")
            .send()
    };
    create(2).await.unwrap();
    let group = || async {
        asg.describe_auto_scaling_groups()
            .auto_scaling_group_names("grafana")
            .send()
            .await
            .unwrap()
            .auto_scaling_groups()[0]
            .clone()
    };
    let before = group().await;
    assert_eq!(before.instances().len(), 2);
    let err = create(3).await.unwrap_err();
    assert!(
        err.as_service_error()
            .is_some_and(|e| e.is_already_exists_fault()),
        "{err:?}"
    );
    assert_eq!(err.code(), Some("AlreadyExists"));
    let after = group().await;
    assert_eq!(after.max_size(), Some(2));
    let ids = |g: &aws_sdk_autoscaling::types::AutoScalingGroup| -> Vec<String> {
        g.instances()
            .iter()
            .map(|i| i.instance_id().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(ids(&after), ids(&before));
}

/// Every create stackwarden makes, on a name that exists, answered as AWS answers it (moto
/// makes a second load balancer of a name and replaces a rule groups namespace): the error
/// the operator counts as "a name owned by someone else", and the existing object untouched.
/// A load balancer created again with the very same settings is AWS's idempotent case: the
/// same load balancer, no second one.
#[tokio::test(flavor = "multi_thread")]
async fn creates_of_names_that_exist_fail_as_on_aws() {
    let aws = Aws::start();
    let (ec2, elb, iam, amp) = (
        aws.ec2().await,
        aws.elb().await,
        aws.iam().await,
        aws.amp().await,
    );
    let subnets: Vec<String> = ec2
        .describe_subnets()
        .send()
        .await
        .unwrap()
        .subnets()
        .iter()
        .take(2)
        .map(|s| s.subnet_id().unwrap().to_string())
        .collect();
    let vpc = ec2.describe_vpcs().send().await.unwrap().vpcs()[0]
        .vpc_id()
        .unwrap()
        .to_string();

    // Security group: InvalidGroup.Duplicate.
    let group = || {
        ec2.create_security_group()
            .group_name("web")
            .description("web")
            .vpc_id(&vpc)
            .send()
    };
    let sg = group().await.unwrap().group_id().unwrap().to_string();
    assert_eq!(
        group().await.unwrap_err().code(),
        Some("InvalidGroup.Duplicate")
    );

    // Launch template: InvalidLaunchTemplateName.AlreadyExistsException.
    launch_template(&ec2, "grafana").await;
    let again = ec2
        .create_launch_template()
        .launch_template_name("grafana")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(AMI)
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        again.code(),
        Some("InvalidLaunchTemplateName.AlreadyExistsException")
    );

    // Load balancer: the same settings answer the same load balancer; others are
    // DuplicateLoadBalancerName. Either way there is one load balancer of the name.
    let balancer = |groups: Vec<String>| {
        elb.create_load_balancer()
            .name("grafana")
            .set_subnets(Some(subnets.clone()))
            .set_security_groups(Some(groups))
            .send()
    };
    let first = balancer(vec![sg.clone()]).await.unwrap();
    let arn = first.load_balancers()[0].load_balancer_arn().unwrap();
    let same = balancer(vec![sg.clone()]).await.unwrap();
    assert_eq!(same.load_balancers().len(), 1);
    assert_eq!(same.load_balancers()[0].load_balancer_arn(), Some(arn));
    let other = balancer(Vec::new()).await.unwrap_err();
    assert!(
        other
            .as_service_error()
            .is_some_and(|e| e.is_duplicate_load_balancer_name_exception()),
        "{other:?}"
    );
    let listed = elb
        .describe_load_balancers()
        .names("grafana")
        .send()
        .await
        .unwrap();
    assert_eq!(listed.load_balancers().len(), 1);
    // Made without a scheme or a type: internet-facing and application, as AWS defaults them.
    let made = &listed.load_balancers()[0];
    assert_eq!(made.scheme().map(|s| s.as_str()), Some("internet-facing"));
    assert_eq!(made.r#type().map(|t| t.as_str()), Some("application"));

    // Target group with other settings: DuplicateTargetGroupName.
    let target_group = |port: i32| {
        elb.create_target_group()
            .name("grafana")
            .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
            .port(port)
            .vpc_id(&vpc)
            .send()
    };
    target_group(3000).await.unwrap();
    let dup = target_group(3001).await.unwrap_err();
    assert!(
        dup.as_service_error()
            .is_some_and(|e| e.is_duplicate_target_group_name_exception()),
        "{dup:?}"
    );

    // IAM: EntityAlreadyExists for roles, policies and instance profiles.
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    for _ in 0..2 {
        let results = [
            iam.create_role()
                .role_name("prometheus")
                .assume_role_policy_document(trust)
                .send()
                .await
                .err()
                .and_then(|e| e.code().map(String::from)),
            iam.create_policy()
                .policy_name("remote-write")
                .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"aps:RemoteWrite","Resource":"*"}]}"#)
                .send()
                .await
                .err()
                .and_then(|e| e.code().map(String::from)),
            iam.create_instance_profile()
                .instance_profile_name("prometheus")
                .send()
                .await
                .err()
                .and_then(|e| e.code().map(String::from)),
        ];
        assert!(
            results.iter().all(Option::is_none)
                || results
                    .iter()
                    .all(|r| r.as_deref() == Some("EntityAlreadyExists")),
            "{results:?}"
        );
    }
    let roles = iam.list_roles().send().await.unwrap();
    assert_eq!(roles.roles().len(), 1);

    // Rule groups namespace: ConflictException, and the first one's rules kept.
    let ws = amp.create_workspace().send().await.unwrap();
    let ws = ws.workspace_id();
    let namespace = |rules: &'static str| {
        amp.create_rule_groups_namespace()
            .workspace_id(ws)
            .name("node")
            .data(Blob::new(rules))
            .send()
    };
    let rules = "groups:\n- name: a\n  rules:\n  - record: r\n    expr: up\n";
    namespace(rules).await.unwrap();
    let conflict = namespace("groups: []\n").await.unwrap_err();
    assert!(
        conflict
            .as_service_error()
            .is_some_and(|e| e.is_conflict_exception()),
        "{conflict:?}"
    );
    let kept = amp
        .describe_rule_groups_namespace()
        .workspace_id(ws)
        .name("node")
        .send()
        .await
        .unwrap();
    assert_eq!(
        kept.rule_groups_namespace().unwrap().data().as_ref(),
        rules.as_bytes()
    );
}

/// IAM keeps a trust policy in its own form: an account id given as an `AWS` principal is
/// stored as the account's root ARN, by CreateRole and UpdateAssumeRolePolicy alike (moto keeps
/// what it was given); other principals are kept as written.
#[tokio::test(flavor = "multi_thread")]
async fn an_account_id_principal_is_stored_as_the_accounts_root_arn() {
    let aws = Aws::start();
    let iam = aws.iam().await;
    let trust = |principal: &str| {
        format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"sts:AssumeRole","Principal":{{"AWS":{principal},"Service":"ec2.amazonaws.com"}}}}]}}"#
        )
    };
    let stored = || async {
        let role = iam.get_role().role_name("r").send().await.unwrap();
        let doc = role
            .role()
            .unwrap()
            .assume_role_policy_document()
            .unwrap()
            .to_string();
        stackwarden_controllers::policy::decode(&doc).unwrap()
    };
    iam.create_role()
        .role_name("r")
        .assume_role_policy_document(trust(r#""123456789012""#))
        .send()
        .await
        .unwrap();
    let doc = stored().await;
    let principal = &doc["Statement"][0]["Principal"];
    assert_eq!(principal["AWS"], "arn:aws:iam::123456789012:root");
    assert_eq!(principal["Service"], "ec2.amazonaws.com");

    // A role of the account a trust names must exist, as IAM checks.
    iam.create_role()
        .role_name("other")
        .assume_role_policy_document(trust(r#""123456789012""#))
        .send()
        .await
        .unwrap();
    iam.update_assume_role_policy()
        .role_name("r")
        .policy_document(trust(
            r#"["210987654321", "arn:aws:iam::123456789012:role/other"]"#,
        ))
        .send()
        .await
        .unwrap();
    let doc = stored().await;
    assert_eq!(
        doc["Statement"][0]["Principal"]["AWS"],
        serde_json::json!([
            "arn:aws:iam::210987654321:root",
            "arn:aws:iam::123456789012:role/other"
        ])
    );
}

/// A security group still in use cannot be deleted (`DependencyViolation`), as on AWS: while an
/// instance not yet terminated is in it, while a load balancer is, while another group's rule
/// names it; once none does, it is deleted. moto deletes it at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_security_group_in_use_is_a_dependency_violation_until_nothing_uses_it() {
    let aws = Aws::start();
    let (ec2, elb) = (aws.ec2().await, aws.elb().await);
    let vpc = ec2.describe_vpcs().send().await.unwrap().vpcs()[0]
        .vpc_id()
        .unwrap()
        .to_string();
    let group = |name: &'static str| {
        let (ec2, vpc) = (ec2.clone(), vpc.clone());
        async move {
            ec2.create_security_group()
                .group_name(name)
                .description(name)
                .vpc_id(vpc)
                .send()
                .await
                .unwrap()
                .group_id()
                .unwrap()
                .to_string()
        }
    };
    let (used, admitting, balanced) = (
        group("used").await,
        group("admitting").await,
        group("lb").await,
    );
    let delete = |id: String| {
        let ec2 = ec2.clone();
        async move { ec2.delete_security_group().group_id(id).send().await }
    };
    let violation = |r: Result<_, aws_sdk_ec2::error::SdkError<_, _>>| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Some("DependencyViolation"), "{e:?}");
    };

    // An instance in it.
    let run = ec2
        .run_instances()
        .image_id(AMI)
        .min_count(1)
        .max_count(1)
        .security_group_ids(&used)
        .send()
        .await
        .unwrap();
    let instance = run.instances()[0].instance_id().unwrap().to_string();
    violation(delete(used.clone()).await);
    ec2.terminate_instances()
        .instance_ids(&instance)
        .send()
        .await
        .unwrap();

    // Another group's rule naming it.
    let rule = aws_sdk_ec2::types::IpPermission::builder()
        .ip_protocol("tcp")
        .from_port(9090)
        .to_port(9090)
        .user_id_group_pairs(
            aws_sdk_ec2::types::UserIdGroupPair::builder()
                .group_id(&used)
                .build(),
        )
        .build();
    ec2.authorize_security_group_ingress()
        .group_id(&admitting)
        .ip_permissions(rule.clone())
        .send()
        .await
        .unwrap();
    violation(delete(used.clone()).await);
    ec2.revoke_security_group_ingress()
        .group_id(&admitting)
        .ip_permissions(rule)
        .send()
        .await
        .unwrap();
    delete(used).await.unwrap();

    // A load balancer in it.
    let subnets: Vec<String> = ec2
        .describe_subnets()
        .send()
        .await
        .unwrap()
        .subnets()
        .iter()
        .take(2)
        .map(|s| s.subnet_id().unwrap().to_string())
        .collect();
    let lb = elb
        .create_load_balancer()
        .name("grafana")
        .set_subnets(Some(subnets))
        .security_groups(&balanced)
        .send()
        .await
        .unwrap();
    violation(delete(balanced.clone()).await);
    elb.delete_load_balancer()
        .load_balancer_arn(lb.load_balancers()[0].load_balancer_arn().unwrap())
        .send()
        .await
        .unwrap();
    delete(balanced).await.unwrap();
    delete(admitting).await.unwrap();
}

/// IAM is eventually consistent: RunInstances refuses an instance profile created moments ago
/// with `InvalidParameterValue` ("Invalid IAM Instance Profile name"), then takes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_instance_profile_is_refused_by_run_instances_until_it_propagates() {
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
    let run = || {
        ec2.run_instances()
            .image_id(AMI)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .iam_instance_profile(
                aws_sdk_ec2::types::IamInstanceProfileSpecification::builder()
                    .name("fresh")
                    .build(),
            )
            .send()
    };
    let err = run().await.unwrap_err();
    assert_eq!(err.code(), Some("InvalidParameterValue"));
    assert!(
        err.message()
            .unwrap_or_default()
            .contains("Invalid IAM Instance Profile name"),
        "{err:?}"
    );
    let launched = eventually("the profile to propagate", || async { run().await.ok() }).await;
    assert!(created.elapsed() >= Duration::from_millis(1500));
    assert_eq!(launched.instances().len(), 1);
}

/// A just-launched instance's SSM agent has not registered: SendCommand naming it is
/// `InvalidInstanceId` until it has.
#[tokio::test(flavor = "multi_thread")]
async fn send_command_to_an_instance_whose_agent_has_not_registered_is_invalid_instance_id() {
    let aws = Aws::with(Settings {
        ssm_registration: Duration::from_millis(1500),
        ..Settings::default()
    });
    let ssm = aws.ssm().await;
    let ids = instances(&aws, 1, &[]).await;
    let launched = Instant::now();
    let send = || {
        ssm.send_command()
            .document_name("AWS-RunShellScript")
            .instance_ids(&ids[0])
            .parameters("commands", vec!["true".to_string()])
            .send()
    };
    assert_eq!(code(send().await), "InvalidInstanceId");
    let sent = eventually("the agent to register", || async { send().await.ok() }).await;
    assert!(launched.elapsed() >= Duration::from_millis(1500));
    assert!(sent.command().is_some());
}

/// GetAccountAuthorizationDetails pages as AWS pages it: at most `MaxItems` entries a page
/// (100 by default) across its lists, `IsTruncated` and a `Marker` until the last page; moto
/// answers everything at once.
#[tokio::test(flavor = "multi_thread")]
async fn account_authorization_details_page_at_a_hundred_entries_by_default() {
    let aws = Aws::start();
    let iam = aws.iam().await;
    let trust = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
    for i in 0..120 {
        iam.create_role()
            .role_name(format!("r{i:03}"))
            .assume_role_policy_document(trust)
            .send()
            .await
            .unwrap();
    }
    let document = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:ListBucket","Resource":"*"}]}"#;
    for i in 0..3 {
        iam.create_policy()
            .policy_name(format!("p{i}"))
            .policy_document(document)
            .send()
            .await
            .unwrap();
    }
    let details = || {
        iam.get_account_authorization_details()
            .filter(aws_sdk_iam::types::EntityType::Role)
            .filter(aws_sdk_iam::types::EntityType::LocalManagedPolicy)
    };
    let first = details().send().await.unwrap();
    assert_eq!(first.role_detail_list().len() + first.policies().len(), 100);
    assert!(first.is_truncated());
    let marker = first
        .marker()
        .expect("a marker while truncated")
        .to_string();
    let second = details().marker(&marker).send().await.unwrap();
    assert_eq!(
        second.role_detail_list().len() + second.policies().len(),
        23
    );
    assert!(!second.is_truncated());
    assert_eq!(second.marker(), None);

    // The SDK's paginator walks the pages; MaxItems sets their size.
    let mut pages = details().max_items(50).into_paginator().send();
    let (mut sizes, mut roles, mut policies) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(page) = pages.next().await {
        let page = page.unwrap();
        sizes.push(page.role_detail_list().len() + page.policies().len());
        roles.extend(
            page.role_detail_list()
                .iter()
                .map(|r| r.role_name().unwrap().to_string()),
        );
        // By ARN: moto leaves PolicyName out of these entries.
        policies.extend(
            page.policies()
                .iter()
                .map(|p| p.arn().unwrap().rsplit('/').next().unwrap().to_string()),
        );
    }
    assert_eq!(sizes, [50, 50, 23]);
    assert_eq!(roles.len(), 120);
    roles.sort();
    roles.dedup();
    assert_eq!(roles.len(), 120, "no role twice");
    // moto lists them in no set order.
    policies.sort();
    assert_eq!(policies, ["p0", "p1", "p2"]);
}

/// A launch template's tags as they are now: AWS answers `CreateTags` and `DeleteTags` on its
/// `lt-` id in `DescribeLaunchTemplates`, and its `tag:` filters find it by them (moto answers
/// the tags it was created with).
#[tokio::test(flavor = "multi_thread")]
async fn a_launch_templates_tags_are_described_as_they_are_now() {
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let id = launch_template(&ec2, "grafana")
        .await
        .launch_template_id()
        .unwrap()
        .to_string();
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    ec2.create_tags()
        .resources(&id)
        .tags(tag("team", "sre"))
        .tags(tag("owner", "a & b"))
        .send()
        .await
        .unwrap();
    ec2.delete_tags()
        .resources(&id)
        .tags(aws_sdk_ec2::types::Tag::builder().key("owner").build())
        .send()
        .await
        .unwrap();
    let by_tag = ec2
        .describe_launch_templates()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:team")
                .values("sre")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(by_tag.launch_templates().len(), 1);
    let template = &by_tag.launch_templates()[0];
    assert_eq!(template.launch_template_id(), Some(id.as_str()));
    let tags: Vec<(&str, &str)> = template
        .tags()
        .iter()
        .map(|t| (t.key().unwrap(), t.value().unwrap()))
        .collect();
    assert_eq!(tags, [("team", "sre")]);
    // Every template of a page gets its own tags.
    launch_template(&ec2, "other").await;
    let all = ec2.describe_launch_templates().send().await.unwrap();
    assert_eq!(all.launch_templates().len(), 2);
    for t in all.launch_templates() {
        let want = usize::from(t.launch_template_id() == Some(id.as_str()));
        assert_eq!(t.tags().len(), want, "{t:?}");
    }
}

/// `CreateVolume` is idempotent on its client token, as on AWS: the call repeated with the
/// token (an SDK retry after a lost answer) answers the same volume and makes no second one; a
/// new token makes a new volume.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_create_repeating_its_client_token_makes_no_second_volume() {
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let create = |token: &'static str| {
        ec2.create_volume()
            .availability_zone("us-east-1a")
            .size(10)
            .client_token(token)
            .send()
    };
    let first = create("t-1").await.unwrap();
    let again = create("t-1").await.unwrap();
    assert_eq!(first.volume_id(), again.volume_id());
    let volumes = ec2.describe_volumes().send().await.unwrap();
    assert_eq!(volumes.volumes().len(), 1, "{:?}", volumes.volumes());
    let other = create("t-2").await.unwrap();
    assert_ne!(other.volume_id(), first.volume_id());
    let volumes = ec2.describe_volumes().send().await.unwrap();
    assert_eq!(volumes.volumes().len(), 2);
}

/// AWS refuses a second volume at an instance's device (`InvalidParameterValue`, "Attachment
/// point ... is already in use") and a volume attached twice (`VolumeInUse`); moto replaces
/// the device mapping, leaving two volumes attached at one device.
#[tokio::test]
async fn a_device_in_use_and_a_volume_attached_elsewhere_are_refused_as_on_aws() {
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let launch = || async {
        let run = ec2
            .run_instances()
            .image_id(AMI)
            .min_count(1)
            .max_count(1)
            .placement(
                aws_sdk_ec2::types::Placement::builder()
                    .availability_zone("us-east-1a")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        run.instances()[0].instance_id().unwrap().to_string()
    };
    let volume = || async {
        let v = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(10)
            .send()
            .await
            .unwrap();
        v.volume_id().unwrap().to_string()
    };
    let attach = |volume: String, instance: String| {
        ec2.attach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .device("/dev/sdf")
            .send()
    };
    let (one, two) = (launch().await, launch().await);
    let (first, second) = (volume().await, volume().await);
    attach(first.clone(), one.clone()).await.unwrap();

    let e = attach(second.clone(), one.clone()).await.unwrap_err();
    assert_eq!(e.code(), Some("InvalidParameterValue"), "{e:?}");
    assert!(
        e.message().unwrap_or_default().contains("already in use"),
        "{e:?}"
    );
    let e = attach(first.clone(), two.clone()).await.unwrap_err();
    assert_eq!(e.code(), Some("VolumeInUse"), "{e:?}");

    // Nothing changed: the first volume alone at the first instance's device, the second free.
    let volumes = ec2
        .describe_volumes()
        .volume_ids(&first)
        .volume_ids(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(volumes.volumes().len(), 2);
    for v in volumes.volumes() {
        let at: Vec<_> = v
            .attachments()
            .iter()
            .map(|a| (a.instance_id().unwrap(), a.device().unwrap()))
            .collect();
        if v.volume_id() == Some(first.as_str()) {
            assert_eq!(at, [(one.as_str(), "/dev/sdf")]);
        } else {
            assert!(at.is_empty(), "{at:?}");
        }
    }

    // Once detached, the device takes another volume.
    ec2.detach_volume()
        .volume_id(&first)
        .instance_id(&one)
        .send()
        .await
        .unwrap();
    attach(second, one).await.unwrap();
}

/// A security group rule naming a prefix list that does not exist is refused
/// (`InvalidPrefixListID.NotFound`), ingress and egress, as on AWS, and nothing is stored; one
/// naming a managed prefix list that exists is kept and described. moto stores either.
#[tokio::test(flavor = "multi_thread")]
async fn a_rule_naming_a_prefix_list_that_does_not_exist_is_refused() {
    use aws_sdk_ec2::types::{AddPrefixListEntry, IpPermission, PrefixListId};
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let group = ec2
        .create_security_group()
        .group_name("pl")
        .description("pl")
        .vpc_id(
            ec2.describe_vpcs().send().await.unwrap().vpcs()[0]
                .vpc_id()
                .unwrap(),
        )
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    let from = |list: &str| {
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(443)
            .to_port(443)
            .prefix_list_ids(PrefixListId::builder().prefix_list_id(list).build())
            .build()
    };
    let missing = "pl-0123456789abcdef0";
    let e = ec2
        .authorize_security_group_ingress()
        .group_id(&group)
        .ip_permissions(from(missing))
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("InvalidPrefixListID.NotFound"), "{e:?}");
    assert_eq!(
        e.message(),
        Some("The prefix list ID 'pl-0123456789abcdef0' does not exist")
    );
    let egress = ec2
        .authorize_security_group_egress()
        .group_id(&group)
        .ip_permissions(from(missing))
        .send()
        .await;
    assert_eq!(code(egress), "InvalidPrefixListID.NotFound");

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
    ec2.authorize_security_group_ingress()
        .group_id(&group)
        .ip_permissions(from(&list))
        .send()
        .await
        .unwrap();
    let described = ec2
        .describe_security_groups()
        .group_ids(&group)
        .send()
        .await
        .unwrap();
    let lists: Vec<&str> = described.security_groups()[0]
        .ip_permissions()
        .iter()
        .flat_map(|p| p.prefix_list_ids())
        .filter_map(|l| l.prefix_list_id())
        .collect();
    assert_eq!(lists, [list.as_str()], "only the rule naming a real list");
    let egress_lists = described.security_groups()[0]
        .ip_permissions_egress()
        .iter()
        .flat_map(|p| p.prefix_list_ids())
        .count();
    assert_eq!(egress_lists, 0);
}

/// EC2 keeps an IPv6 range in one spelling, whatever was sent: `::0/0` is read back as `::/0`,
/// `2001:0DB8::/32` as `2001:db8::/32`, and a revoke in any spelling finds the
/// rule. moto keeps the spelling it was sent.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_ranges_are_kept_in_the_one_spelling_ec2_writes() {
    use aws_sdk_ec2::types::{IpPermission, Ipv6Range};
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let group = ec2
        .create_security_group()
        .group_name("v6")
        .description("v6")
        .vpc_id(
            ec2.describe_vpcs().send().await.unwrap().vpcs()[0]
                .vpc_id()
                .unwrap(),
        )
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    let from = |cidr: &str| {
        IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(22)
            .to_port(22)
            .ipv6_ranges(Ipv6Range::builder().cidr_ipv6(cidr).build())
            .build()
    };
    for cidr in ["::0/0", "2001:0DB8::/32"] {
        ec2.authorize_security_group_ingress()
            .group_id(&group)
            .ip_permissions(from(cidr))
            .send()
            .await
            .unwrap();
    }
    let ranges = || async {
        let out = ec2
            .describe_security_groups()
            .group_ids(&group)
            .send()
            .await
            .unwrap();
        let mut ranges: Vec<String> = out.security_groups()[0]
            .ip_permissions()
            .iter()
            .flat_map(|p| p.ipv6_ranges())
            .filter_map(|r| r.cidr_ipv6().map(str::to_string))
            .collect();
        ranges.sort();
        ranges
    };
    assert_eq!(ranges().await, ["2001:db8::/32", "::/0"]);
    let duplicate = ec2
        .authorize_security_group_ingress()
        .group_id(&group)
        .ip_permissions(from("0::0/0"))
        .send()
        .await;
    assert_eq!(code(duplicate), "InvalidPermission.Duplicate");
    for cidr in ["::/0", "2001:db8:0:0::/32"] {
        ec2.revoke_security_group_ingress()
            .group_id(&group)
            .ip_permissions(from(cidr))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(ranges().await, Vec::<String>::new());
}

/// Canonical's account, the publisher of Ubuntu's AMIs.
const CANONICAL: &str = "099720109477";

fn ubuntu(name: &str, created: &str, deprecated: bool) -> PublicImage {
    PublicImage {
        deprecated,
        ..PublicImage::new(CANONICAL, name, created)
    }
}

/// DescribeImages lists public images as AWS does: deprecated ones only when asked (or named
/// by id), pages whose filters apply after the page is taken (so pages come short), no
/// `MaxResults` with `ImageIds`, `*` and `?` in filter values, moto's own images beside the
/// published ones, and a filter it does not know refused.
#[tokio::test(flavor = "multi_thread")]
async fn images_list_as_aws_lists_them_deprecated_left_out_and_filtered_after_paging() {
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let jammy = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-";
    let mut current = Vec::new();
    for day in 1..=4 {
        current.push(aws.emulator.publish_image(ubuntu(
            &format!("{jammy}2024050{day}"),
            &format!("2024-05-0{day}T00:00:00.000Z"),
            false,
        )));
    }
    let deprecated = aws.emulator.publish_image(ubuntu(
        &format!("{jammy}20240509"),
        "2024-05-09T00:00:00.000Z",
        true,
    ));
    aws.emulator.publish_image(ubuntu(
        "ubuntu/images/hvm-ssd/ubuntu-focal-20.04-amd64-server-20240501",
        "2024-05-01T00:00:00.000Z",
        false,
    ));
    // Through the control API, as scripts publish: another publisher, the same name.
    let (status, body) = control(
        &aws,
        "POST",
        "/_emulator/images",
        &format!(
            r#"{{"owner": "111122223333", "name": "{jammy}20240601", "creation_date": "2024-06-01T00:00:00.000Z"}}"#
        ),
    );
    assert_eq!(status, 201, "{body}");
    let copy: serde_json::Value = serde_json::from_str(&body).unwrap();
    let copy = copy["image_id"].as_str().unwrap().to_string();

    let name = |pattern: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name("name")
            .values(pattern)
            .build()
    };
    let listing = || {
        ec2.describe_images()
            .owners(CANONICAL)
            .filters(name(&format!("{jammy}*")))
    };
    // Canonical's images are listed two a page (the deprecated one left out: four of jammy,
    // one of focal, those moto has of Canonical's), and the name filter then applies to each
    // page: four in all, with a page short of two before the last.
    let mut token = None;
    let (mut sizes, mut ids) = (Vec::new(), Vec::new());
    loop {
        let page = listing()
            .max_results(2)
            .set_next_token(token.take())
            .send()
            .await
            .unwrap();
        sizes.push(page.images().len());
        ids.extend(
            page.images()
                .iter()
                .map(|i| i.image_id().unwrap().to_string()),
        );
        match page.next_token() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(sizes.iter().sum::<usize>(), 4, "{sizes:?}");
    assert!(
        sizes[..sizes.len() - 1].iter().any(|&n| n < 2),
        "a short page with more to follow: {sizes:?}"
    );
    ids.sort();
    let mut expected = current.clone();
    expected.sort();
    assert_eq!(ids, expected);

    // What the SDK's paginator gathers is the same; asked for, the deprecated image is listed.
    let all: Vec<_> = listing()
        .into_paginator()
        .page_size(2)
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
    let with_deprecated = listing().include_deprecated(true).send().await.unwrap();
    assert_eq!(with_deprecated.images().len(), 5);
    let old = with_deprecated
        .images()
        .iter()
        .find(|i| i.image_id() == Some(deprecated.as_str()))
        .unwrap();
    assert!(old.deprecation_time().is_some());
    assert_eq!(old.root_device_name(), Some("/dev/sda1"));
    assert_eq!(old.creation_date(), Some("2024-05-09T00:00:00.000Z"));
    assert_eq!(
        old.block_device_mappings()[0]
            .ebs()
            .and_then(|e| e.volume_size()),
        Some(8)
    );

    // By id: the deprecated image, a published one beside one of moto's, and nothing unknown.
    let by_id = ec2
        .describe_images()
        .image_ids(&deprecated)
        .image_ids(AMI)
        .send()
        .await
        .unwrap();
    let mut found: Vec<&str> = by_id.images().iter().filter_map(|i| i.image_id()).collect();
    found.sort();
    let mut want = vec![deprecated.as_str(), AMI];
    want.sort();
    assert_eq!(found, want);
    assert_eq!(
        code(
            ec2.describe_images()
                .image_ids("ami-0000000000000dead")
                .send()
                .await
        ),
        "InvalidAMIID.NotFound"
    );
    assert_eq!(
        code(
            ec2.describe_images()
                .image_ids(&deprecated)
                .max_results(5)
                .send()
                .await
        ),
        "InvalidParameterCombination"
    );

    // Owners choose whose images; `?` matches zero or one character.
    let other = ec2
        .describe_images()
        .owners("111122223333")
        .filters(name(&format!("{jammy}2024060?1")))
        .send()
        .await
        .unwrap();
    let other: Vec<&str> = other.images().iter().filter_map(|i| i.image_id()).collect();
    assert_eq!(other, [copy.as_str()]);

    let unknown = aws_sdk_ec2::types::Filter::builder()
        .name("platform-details")
        .values("Linux/UNIX")
        .build();
    let e = ec2
        .describe_images()
        .owners(CANONICAL)
        .filters(unknown)
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("InvalidParameterValue"));
    assert!(
        e.message().unwrap_or_default().contains("platform-details"),
        "{e:?}"
    );
}

/// RunInstances checks its image as EC2 does (moto launches anything): an image that does not
/// exist is `InvalidAMIID.NotFound`; a volume for the image's root device smaller than its
/// snapshot is `InvalidBlockDeviceMapping`, one that holds it launches, published images and
/// moto's own alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_launch_needs_an_image_that_exists_and_a_root_volume_that_holds_its_snapshot() {
    use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, InstanceType};
    let aws = Aws::start();
    let ec2 = aws.ec2().await;
    let jammy = aws.emulator.publish_image(PublicImage {
        root_size_gib: 10,
        ..PublicImage::new(
            CANONICAL,
            "ubuntu/images/jammy-1",
            "2024-05-01T00:00:00.000Z",
        )
    });
    let launch = |image: &str, device: &str, size: i32| {
        ec2.run_instances()
            .image_id(image)
            .instance_type(InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(device)
                    .ebs(EbsBlockDevice::builder().volume_size(size).build())
                    .build(),
            )
            .send()
    };
    assert_eq!(
        code(launch("ami-0000000000000dead", "/dev/sda1", 20).await),
        "InvalidAMIID.NotFound"
    );
    let small = launch(&jammy, "/dev/sda1", 8).await.unwrap_err();
    assert_eq!(small.code(), Some("InvalidBlockDeviceMapping"));
    assert!(
        small
            .message()
            .unwrap_or_default()
            .contains("Volume of size 8GB is smaller than  snapshot"),
        "{small:?}"
    );
    // Another device than the root is a data volume: no snapshot to hold.
    launch(&jammy, "/dev/sdf", 8).await.unwrap();
    launch(&jammy, "/dev/sda1", 10).await.unwrap();
    launch(AMI, "/dev/sda1", 30).await.unwrap();
    let launched = aws
        .emulator
        .calls()
        .iter()
        .filter(|c| c.operation == "RunInstances" && c.status == 200)
        .count();
    assert_eq!(launched, 3);
}
