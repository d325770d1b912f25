//! The domain of stackwarden: one module per resource kind, each owning its part of the
//! desired-state schema and its observe / diff / apply, plus what they share: the
//! [`Controller`](controller::Controller) trait, [`Change`](change::Change), references,
//! ownership tags and error classification.
//!
//! Nothing here reads the desired directory or decides when to run: that is the runtime's job
//! (the `stackwarden` binary).

pub mod alertmanager;
pub mod amg;
pub mod amp;
pub mod change;
pub mod controller;
pub mod dashboard;
pub mod desired;
pub mod diag;
pub mod ec2;
pub mod error;
pub mod grafana;
pub mod host;
pub mod host_config;
pub mod iam;
pub mod managed;
pub mod model;
pub mod policy;
pub mod push;
pub mod rules;
pub mod security_group;
pub mod tags;
pub mod verify;

pub use change::{Action, Change, FieldChange};
pub use controller::{Context, Controller, DynController, Waits};
pub use desired::{DesiredState, Resource, Spec};
pub use error::{Error, ErrorClass, Result};
pub use model::{Kind, Refs, ResourceId};

/// Every controller this version has. Kinds are applied in the order of their references;
/// removals run in the reverse of this order (what uses an object goes before it).
pub fn controllers() -> Vec<Box<dyn DynController>> {
    vec![
        Box::new(managed::Managed(iam::Policy)),
        Box::new(managed::Managed(iam::Role)),
        Box::new(managed::Managed(iam::InstanceProfile)),
        Box::new(managed::Managed(amp::Workspace)),
        Box::new(managed::Managed(amp::RuleGroups)),
        Box::new(managed::Managed(amp::Alertmanager)),
        Box::new(managed::Managed(amp::Logging)),
        Box::new(managed::Managed(amg::Workspace)),
        Box::new(managed::Managed(amg::Permissions)),
        // Before what uses them: removals run in reverse, so a removed table's instances and
        // load balancer go first, then the rules (a group another group's rule names cannot be
        // deleted), then the groups.
        Box::new(managed::Managed(security_group::SecurityGroup::<
            security_group::OfHost,
        >::default())),
        Box::new(managed::Managed(security_group::SecurityGroup::<
            security_group::OfGrafana,
        >::default())),
        Box::new(managed::Managed(security_group::Ingress::<
            security_group::OfHost,
        >::default())),
        Box::new(managed::Managed(security_group::Ingress::<
            security_group::OfGrafana,
        >::default())),
        // Before the host: removals run in reverse, so a removed host's instance is terminated
        // before its volumes are deleted.
        Box::new(managed::Managed(host::volume::Volume)),
        Box::new(host::HostController),
        Box::new(grafana::GrafanaController),
        Box::new(host_config::HostConfigController),
    ]
}

#[cfg(test)]
pub(crate) mod testing;
