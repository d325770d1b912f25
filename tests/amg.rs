//! Managed Grafana against the emulator: a workspace and its role associations from empty, role
//! drift made out of band corrected with the minimal permission batch, adoption of an existing
//! workspace without writing to it, and a workspace still CREATING waited on across passes.

use std::collections::BTreeMap;

use aws_sdk_grafana::types::{
    AccountAccessType, AuthenticationProviderTypes, PermissionType, Role, UpdateAction,
    UpdateInstruction, User, UserType,
};
use stackwarden_emulator::Settings;

use crate::harness::{default_stack, path_str, stackwarden, stackwarden_with, Aws};

const ADMINS: &str = "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0a";
const VIEWERS: &str = "9067729b3d-94f1e0c8-1d5b-4a0d-8e53-3c6d9d2c6f0b";
const ALICE: &str = "9067729b3d-1b2c3d4e-0000-4000-8000-000000000001";
const MALLORY: &str = "9067729b3d-1b2c3d4e-0000-4000-8000-000000000009";

fn grafana_toml(header: &str) -> String {
    format!(
        r#"# Managed Grafana with Identity Center access
{header}
data_sources = ["PROMETHEUS", "CLOUDWATCH"]
role_arn = "${{iam.role.grafana.arn}}"
permission_type = "CUSTOMER_MANAGED"

[amg.workspace.grafana.roles]
admin = {{ groups = ["{ADMINS}"] }}
viewer = {{ groups = ["{VIEWERS}"], users = ["{ALICE}"] }}
"#
    )
}

/// Member id → role, as the service lists them.
async fn permissions(aws: &Aws, workspace: &str) -> BTreeMap<String, String> {
    let g = aws.grafana().await;
    g.list_permissions()
        .workspace_id(workspace)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.user.unwrap().id, p.role.as_str().to_string()))
        .collect()
}

fn expected() -> BTreeMap<String, String> {
    BTreeMap::from([
        (ADMINS.to_string(), "ADMIN".to_string()),
        (VIEWERS.to_string(), "VIEWER".to_string()),
        (ALICE.to_string(), "VIEWER".to_string()),
    ])
}

async fn owned_workspace(aws: &Aws) -> aws_sdk_grafana::types::WorkspaceSummary {
    let g = aws.grafana().await;
    let list = g.list_workspaces().send().await.unwrap();
    let mut owned: Vec<_> = list
        .workspaces
        .into_iter()
        .filter(|w| {
            w.tags.as_ref().is_some_and(|t| {
                t.get("stackwarden:id").map(String::as_str) == Some("amg.workspace.grafana")
            })
        })
        .collect();
    assert_eq!(owned.len(), 1, "exactly one owned workspace: {owned:?}");
    owned.remove(0)
}

fn instruction(action: UpdateAction, role: Role, id: &str, kind: UserType) -> UpdateInstruction {
    UpdateInstruction::builder()
        .action(action)
        .role(role)
        .users(User::builder().id(id).r#type(kind).build().unwrap())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn workspace_and_roles_from_empty_then_out_of_band_role_drift_is_corrected() {
    let aws = Aws::start();
    let dir = default_stack();
    std::fs::write(
        dir.path().join("amg.toml"),
        grafana_toml("[amg.workspace.grafana]"),
    )
    .unwrap();
    let d = path_str(dir.path());

    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(2);
    assert!(
        plan.stdout.contains("amg.workspace.grafana"),
        "{}",
        plan.stdout
    );
    assert!(!plan.stderr.contains("no controller"), "{}", plan.stderr);
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);

    let w = owned_workspace(&aws).await;
    assert_eq!(w.status.as_str(), "ACTIVE");
    assert_eq!(w.name.as_deref(), Some("monitoring-grafana"));
    let described = aws
        .grafana()
        .await
        .describe_workspace()
        .workspace_id(&w.id)
        .send()
        .await
        .unwrap()
        .workspace
        .unwrap();
    assert!(
        described
            .workspace_role_arn
            .as_deref()
            .is_some_and(|a| a.ends_with(":role/monitoring-grafana")),
        "the role ARN is resolved from IAM: {:?}",
        described.workspace_role_arn
    );
    assert_eq!(permissions(&aws, &w.id).await, expected());
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);

    // Out of band: a user added, a group's role changed, a group removed.
    let g = aws.grafana().await;
    g.update_permissions()
        .workspace_id(&w.id)
        .update_instruction_batch(instruction(
            UpdateAction::Add,
            Role::Editor,
            MALLORY,
            UserType::SsoUser,
        ))
        .update_instruction_batch(instruction(
            UpdateAction::Add,
            Role::Admin,
            VIEWERS,
            UserType::SsoGroup,
        ))
        .update_instruction_batch(instruction(
            UpdateAction::Revoke,
            Role::Admin,
            ADMINS,
            UserType::SsoGroup,
        ))
        .send()
        .await
        .unwrap();
    let plan = stackwarden(Some(&aws.endpoint), &["plan", d]);
    plan.expect(2);
    assert!(plan.stdout.contains("roles"), "{}", plan.stdout);
    let run = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    run.expect(0);
    assert!(
        run.stderr.contains("1  grafana UpdatePermissions"),
        "one batch corrects all three:\n{}",
        run.stderr
    );
    assert_eq!(permissions(&aws, &w.id).await, expected());
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_workspace_is_adopted_without_writing_to_it() {
    let aws = Aws::start();
    let g = aws.grafana().await;
    let existing = g
        .create_workspace()
        .workspace_name("shared")
        .account_access_type(AccountAccessType::CurrentAccount)
        .permission_type(PermissionType::ServiceManaged)
        .authentication_providers(AuthenticationProviderTypes::AwsSso)
        .send()
        .await
        .unwrap()
        .workspace
        .unwrap()
        .id;
    let dir = default_stack();
    std::fs::write(
        dir.path().join("amg.toml"),
        format!(
            "[amg.workspace.grafana]\nadopt = \"{existing}\"\n\n[amg.workspace.grafana.roles]\nadmin = {{ groups = [\"{ADMINS}\"] }}\nviewer = {{ groups = [\"{VIEWERS}\"], users = [\"{ALICE}\"] }}\n"
        ),
    )
    .unwrap();
    let d = path_str(dir.path());
    // The workspace may still be CREATING: the pass waits for it.
    stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]).expect(0);
    stackwarden(Some(&aws.endpoint), &["plan", d]).expect(0);

    assert_eq!(permissions(&aws, &existing).await, expected());
    let writes: Vec<String> = aws
        .emulator
        .calls()
        .into_iter()
        .filter(|c| {
            c.service == "grafana"
                && !c.operation.starts_with("List")
                && !c.operation.starts_with("Describe")
        })
        .map(|c| c.operation)
        .collect();
    assert_eq!(
        writes,
        ["CreateWorkspace", "UpdatePermissions"],
        "the test's own create, then only the role associations"
    );
    let w = g
        .describe_workspace()
        .workspace_id(&existing)
        .send()
        .await
        .unwrap()
        .workspace
        .unwrap();
    assert_eq!(w.name.as_deref(), Some("shared"));
    assert!(w.tags.unwrap_or_default().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workspace_still_creating_is_waited_on_across_passes() {
    let aws = Aws::with(Settings {
        transition_delay: std::time::Duration::from_secs(4),
        ..Settings::default()
    });
    let dir = default_stack();
    // No reference to IAM, so the workspace is created in the first pass.
    let toml = grafana_toml("[amg.workspace.grafana]")
        .replace("role_arn = \"${iam.role.grafana.arn}\"\n", "");
    std::fs::write(dir.path().join("amg.toml"), toml).unwrap();
    let d = path_str(dir.path());
    let short = [("STACKWARDEN_WAIT_TIMEOUT", "1s")];
    let first = stackwarden_with(Some(&aws.endpoint), &["reconcile", "--once", d], &short);
    first.expect(1);
    assert!(
        first.stderr.contains("grafana CreateWorkspace"),
        "{}",
        first.stderr
    );
    assert!(
        first.stderr.contains("Managed Grafana workspace g-") && first.stderr.contains("still"),
        "{}",
        first.stderr
    );
    let second = stackwarden_with(Some(&aws.endpoint), &["reconcile", "--once", d], &short);
    assert!(
        !second.stderr.contains("grafana CreateWorkspace"),
        "a second workspace was created:\n{}",
        second.stderr
    );
    // With the default wait timeout, one run waits for ACTIVE (saying so), then grants.
    let third = stackwarden(Some(&aws.endpoint), &["reconcile", "--once", d]);
    third.expect(0);
    assert!(
        third
            .stderr
            .contains("amg.workspace.grafana: waiting: Managed Grafana workspace g-"),
        "{}",
        third.stderr
    );
    assert_eq!(third.count("UpdatePermissions"), 1, "{}", third.stderr);
    let w = owned_workspace(&aws).await;
    assert_eq!(permissions(&aws, &w.id).await, expected());
}
