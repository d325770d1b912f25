//! Fixture builders for the pure diff tests: desired states made in memory, no files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use toml::Spanned;

use crate::desired::{DeletionPolicy, DesiredState, Resource, Spec, StackSpec};
use crate::diag::{Origin, SourceFile};
use crate::model::{Kind, ResourceId};

pub const STACK: &str = "s";

pub fn resource(kind: Kind, name: &str, spec: Spec) -> Resource {
    Resource {
        id: ResourceId::new(kind, name),
        origin: Origin {
            file: SourceFile::new("t.toml".into(), "t.toml".into(), String::new()),
            span: 0..0,
        },
        adopt: None,
        observe_only: false,
        spec,
        depends_on: BTreeSet::new(),
    }
}

pub fn desired(resources: Vec<Resource>) -> DesiredState {
    DesiredState {
        dir: PathBuf::from("."),
        stack: StackSpec {
            name: Spanned::new(0..0, STACK.to_string()),
            region: Some("us-east-1".into()),
            tags: Some(Spanned::new(
                0..0,
                BTreeMap::from([("team".into(), "sre".into())]),
            )),
            deletion_policy: DeletionPolicy::Orphan,
            assume_role: None,
            external_id: None,
        },
        stack_file: None,
        resources: resources.into_iter().map(|r| (r.id.clone(), r)).collect(),
        content_hash: "test".into(),
    }
}

/// The tags stackwarden puts on a resource of the fixture stack.
pub fn owned_tags(id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("team".into(), "sre".into()),
        (crate::desired::TAG_STACK.into(), STACK.into()),
        (crate::desired::TAG_ID.into(), id.into()),
    ])
}

/// Runs a pushed script as the SSM agent runs AWS-RunShellScript on Ubuntu and Debian: the
/// commands in a file, `sh -c FILE`, with dash as `sh`. A bashism fails here as it would on
/// the host. `root` becomes `$STACKWARDEN_ROOT`.
pub fn run_as_agent(script: &str, root: &std::path::Path) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("_script.sh");
    std::fs::write(&file, script).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::process::Command::new("dash")
        .arg("-c")
        .arg(&file)
        .env("STACKWARDEN_ROOT", root)
        .output()
        .expect("dash runs the pushed scripts as on Ubuntu: install the Debian package dash")
}
