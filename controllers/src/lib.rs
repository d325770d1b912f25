//! The domain of stackwarden: one module per resource kind, each owning its part of the
//! desired-state schema and its observe / diff / apply, plus what they share: the
//! [`Controller`](controller::Controller) trait, [`Change`](change::Change), references,
//! ownership tags and error classification.
//!
//! Nothing here reads the desired directory or decides when to run: that is the runtime's job
//! (the `stackwarden` binary).

pub mod alertmanager;
pub mod amg;
pub mod ami;
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
pub mod instances;
pub mod kind;
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

/// Every kind this version has: the one place a kind is registered, each declared by its own
/// module ([`kind::KindDef`]). Kinds are applied in the order of their references, ties in
/// this order; removals run in the reverse of it, so what uses an object goes before it:
/// security groups before their rules (a group another group's rule names cannot be deleted),
/// a host's volumes before the host (its instance is terminated before they are deleted); a
/// host's Prometheus config after its instance; a Grafana group's listeners before its load
/// balancer, and that before the target group it forwards to; a Grafana group's provisioning after the group.
pub static KINDS: &[Kind] = &[
    iam::POLICY,
    iam::ROLE,
    iam::INSTANCE_PROFILE,
    amp::WORKSPACE,
    amp::RULE_GROUPS,
    amp::ALERTMANAGER,
    amp::LOGGING,
    amg::WORKSPACE,
    amg::PERMISSIONS,
    host::SECURITY_GROUP,
    grafana::SECURITY_GROUP,
    host::INGRESS,
    grafana::INGRESS,
    host::VOLUME,
    host::HOST,
    host::PROMETHEUS,
    grafana::TARGET_GROUP,
    grafana::BALANCER,
    grafana::LISTENER,
    grafana::LAUNCH_TEMPLATE,
    grafana::GRAFANA,
    grafana::PROVISIONING,
    host_config::HOST_CONFIG,
];

#[cfg(test)]
pub(crate) mod testing;
