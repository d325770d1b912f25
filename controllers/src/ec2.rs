//! EC2 helpers every EC2-backed kind shares (hosts, Grafana groups, security groups): tags in
//! EC2's shapes, the subnet (and VPC) to launch into.

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

use crate::controller::Context;
use crate::error::{aws_error, Error, Result};
use crate::tags::Tags;

/// EC2's tags as a map.
pub fn tag_map(tags: &[Tag]) -> Tags {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Tags in EC2's shape.
pub fn ec2_tags(tags: &Tags) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Sets tags on an EC2 object (`CreateTags` adds and overwrites).
pub async fn set_tags(ctx: &Context, id: &str, tags: &Tags) -> Result<()> {
    ctx.ec2
        .create_tags()
        .resources(id)
        .set_tags(Some(ec2_tags(tags)))
        .send()
        .await
        .map_err(aws_error("ec2", "CreateTags"))?;
    Ok(())
}

/// Removes tags from an EC2 object by key.
pub async fn remove_tags(ctx: &Context, id: &str, keys: &[String]) -> Result<()> {
    let tags = keys.iter().map(|k| Tag::builder().key(k).build()).collect();
    ctx.ec2
        .delete_tags()
        .resources(id)
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(aws_error("ec2", "DeleteTags"))?;
    Ok(())
}

/// Tags for a create call, on the object of `kind` it creates (one call: crash-safe).
pub fn tag_spec(kind: ResourceType, tags: &Tags) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(ec2_tags(tags)))
        .build()
}

/// The subnet to launch into and its VPC: the named subnet, or the default VPC's default
/// subnet in the first zone. One call, made only when launching.
pub async fn locate_subnet(ctx: &Context, subnet: Option<&str>) -> Result<(String, String)> {
    let filter = match subnet {
        Some(id) => Filter::builder().name("subnet-id").values(id).build(),
        None => Filter::builder()
            .name("default-for-az")
            .values("true")
            .build(),
    };
    let subnets = ctx
        .ec2
        .describe_subnets()
        .filters(filter)
        .into_paginator()
        .items()
        .send()
        .collect::<std::result::Result<Vec<_>, _>>()
        .await
        .map_err(aws_error("ec2", "DescribeSubnets"))?;
    subnets
        .iter()
        .min_by_key(|s| s.availability_zone().unwrap_or_default().to_string())
        .map(|s| {
            (
                s.subnet_id().unwrap_or_default().to_string(),
                s.vpc_id().unwrap_or_default().to_string(),
            )
        })
        .ok_or_else(|| {
            Error::Invalid(match subnet {
                Some(id) => format!("subnet {id} does not exist"),
                None => "no `subnet` given and the region has no default VPC subnet".into(),
            })
        })
}
