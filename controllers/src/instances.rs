//! The one read of EC2 instances per observation, shared by every kind that needs instances:
//! hosts (their own, and the ones they adopt), their Prometheus configs, Grafana groups' instances
//! and the instances `host_config`s target.
//!
//! One `DescribeInstances` (paginated) serves them all: without a `host_config`, of the
//! instances carrying the stack's tag; with some, of the instances carrying the stack's tag or
//! any tag key a `host_config` selects by (a filter on tag keys is the one way to ask for both
//! at once), each kind then keeping what it selects. Instances a host adopts are read by id, and
//! only until they carry the stack's tag. Which tag keys and adopted instances: each resource's
//! spec says ([`crate::desired::KindSpec::instance_tag_keys`],
//! [`crate::desired::KindSpec::adopts_an_instance`]), so no kind is named here.

use std::collections::BTreeSet;
use std::sync::Arc;

use aws_sdk_ec2::types::Filter;

use crate::controller::Context;
use crate::desired::{DesiredState, TAG_STACK};
use crate::ec2::tag_map;
use crate::error::{aws_error, Result};
use crate::tags::Tags;

/// The states of an instance that is not gone.
const LIVE: [&str; 4] = ["pending", "running", "stopping", "stopped"];

#[derive(Debug, Clone, Default)]
/// One live instance, as every kind reads it.
pub struct ObservedInstance {
    pub id: String,
    pub state: String,
    pub instance_type: String,
    pub image_id: String,
    pub zone: String,
    pub private_ip: String,
    pub public_ip: String,
    pub private_dns: String,
    /// The security groups it is in.
    pub security_groups: Vec<String>,
    pub tags: Tags,
}

fn observed_instance(i: &aws_sdk_ec2::types::Instance) -> ObservedInstance {
    ObservedInstance {
        id: i.instance_id().unwrap_or_default().into(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        image_id: i.image_id().unwrap_or_default().into(),
        zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .into(),
        private_ip: i.private_ip_address().unwrap_or_default().into(),
        public_ip: i.public_ip_address().unwrap_or_default().into(),
        private_dns: i.private_dns_name().unwrap_or_default().into(),
        security_groups: i
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .map(String::from)
            .collect(),
        tags: tag_map(i.tags()),
    }
}

impl ObservedInstance {
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// The live instances the desired state needs, read once per observation.
pub async fn instances(
    ctx: &Context,
    desired: &DesiredState,
) -> Result<Arc<Vec<ObservedInstance>>> {
    ctx.shared("ec2:DescribeInstances", || async {
        let target_keys: BTreeSet<&str> = desired
            .resources
            .values()
            .flat_map(|r| r.spec.instance_tag_keys())
            .collect();
        let selection = if target_keys.is_empty() {
            Filter::builder()
                .name(format!("tag:{TAG_STACK}"))
                .values(desired.stack_name())
                .build()
        } else {
            Filter::builder()
                .name("tag-key")
                .set_values(Some(
                    std::iter::once(TAG_STACK)
                        .chain(target_keys)
                        .map(String::from)
                        .collect(),
                ))
                .build()
        };
        let live = Filter::builder()
            .name("instance-state-name")
            .set_values(Some(LIVE.map(String::from).to_vec()))
            .build();
        let mut found = Vec::new();
        let mut pages = ctx
            .ec2
            .describe_instances()
            .filters(selection)
            .filters(live.clone())
            .max_results(1000)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(aws_error("ec2", "DescribeInstances"))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                found.push(observed_instance(i));
            }
        }
        let unadopted: Vec<String> = desired
            .resources
            .values()
            .filter(|r| r.spec.adopts_an_instance())
            .filter_map(|r| r.adopt.clone())
            .filter(|id| !found.iter().any(|i: &ObservedInstance| &i.id == id))
            .collect();
        if !unadopted.is_empty() {
            let out = ctx
                .ec2
                .describe_instances()
                .filters(
                    Filter::builder()
                        .name("instance-id")
                        .set_values(Some(unadopted))
                        .build(),
                )
                .filters(live)
                .into_paginator()
                .items()
                .send()
                .collect::<std::result::Result<Vec<_>, _>>()
                .await
                .map_err(aws_error("ec2", "DescribeInstances"))?;
            found.extend(
                out.iter()
                    .flat_map(|r| r.instances())
                    .map(observed_instance),
            );
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    })
    .await
}
