//! The image a host or a Grafana group launches (`ami`), and what a launch needs to know of it:
//! its id and the name of its root device.
//!
//! `ami` is written one of three ways:
//! - an AMI id, `"ami-0abcdef1234567890"`;
//! - `"resolve:ssm:<parameter>"`: the id an SSM parameter holds, such as AWS's public
//!   `/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64`;
//! - `{ owner = "099720109477", name = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*" }`:
//!   the most recent available image of that owner whose name matches the pattern (`*` and `?`
//!   wildcards), as Terraform's `aws_ami` data source with `most_recent = true` picks it.
//!
//! A parameter or a pattern is resolved each time the image is needed (every observation of a
//! launch template, every launch of a host), so a new image behind it is picked up. The root
//! device's name differs between AMI families (`/dev/xvda` on Amazon Linux, `/dev/sda1` on
//! Ubuntu) and is read from DescribeImages: an encrypted root volume set for another device
//! name would be a second, unused disk. What DescribeImages says of an image id never changes,
//! so it is kept for the life of the process ([`Images`]).
//!
//! # AWS behaviour relied on (EC2 API reference, DescribeImages)
//! - Deprecated images are left out of a listing unless `IncludeDeprecated` is set, as
//!   Terraform's `include_deprecated = false` leaves them out; images are listed in no
//!   particular order, so the most recent is chosen by `CreationDate` here.
//! - A listing is paged, and its filters apply to each page after it is taken: a page may be
//!   short or empty while more follow. Every page is read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_sdk_ec2::types::Filter;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::controller::Context;
use crate::desired::Validator;
use crate::error::{aws_error, Error, Result};

/// The prefix of an AMI given as an SSM parameter.
const RESOLVE: &str = "resolve:ssm:";

/// `ami` of a host or a Grafana group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ami {
    /// `ami-...`: this image.
    Id(String),
    /// `resolve:ssm:<parameter>`: the image the parameter names.
    Parameter(String),
    /// `{ owner, name }`: the most recent available image of `owner` whose name matches.
    Newest(Newest),
}

/// `{ owner = "...", name = "pattern" }`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Newest {
    /// An account id, or `self`, `amazon`, `aws-marketplace` (DescribeImages' `Owners`).
    pub owner: String,
    /// The image name, `*` and `?` as wildcards.
    pub name: String,
}

/// The owner aliases DescribeImages takes besides account ids.
const OWNER_ALIASES: &[&str] = &["self", "amazon", "aws-marketplace"];

impl<'de> Deserialize<'de> for Ami {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Ami, D::Error> {
        struct AmiVisitor;
        impl<'de> Visitor<'de> for AmiVisitor {
            type Value = Ami;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "an AMI id, `resolve:ssm:<parameter>`, or { owner = \"...\", name = \"pattern\" }",
                )
            }

            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Ami, E> {
                Ok(match s.strip_prefix(RESOLVE) {
                    Some(parameter) => Ami::Parameter(parameter.to_string()),
                    None => Ami::Id(s.to_string()),
                })
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> std::result::Result<Ami, M::Error> {
                Newest::deserialize(de::value::MapAccessDeserializer::new(map)).map(Ami::Newest)
            }
        }
        d.deserialize_any(AmiVisitor)
    }
}

impl std::fmt::Display for Ami {
    /// As written: the plan shows it so.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Ami::Id(id) => f.write_str(id),
            Ami::Parameter(p) => write!(f, "{RESOLVE}{p}"),
            Ami::Newest(n) => write!(f, "the most recent image of {} named {}", n.owner, n.name),
        }
    }
}

impl Ami {
    /// Reports what AWS would refuse, at the table's line.
    pub fn check(&self, v: &mut Validator<'_>) {
        match self {
            Ami::Id(id) => {
                if id.contains("${") {
                    v.here(format!(
                        "ami `{id}` takes no references: the image is resolved before anything is created (write an id, `resolve:ssm:<parameter>` or {{ owner, name }})"
                    ));
                } else if !id.starts_with("ami-") {
                    v.here(format!(
                        "ami `{id}` is neither an AMI id (ami-...), `resolve:ssm:<parameter>` nor {{ owner = \"...\", name = \"pattern\" }}"
                    ));
                }
            }
            Ami::Parameter(p) => {
                if p.is_empty() || p.contains("${") {
                    v.here(format!(
                        "ami `{RESOLVE}{p}` names no SSM parameter (references are not taken)"
                    ));
                }
            }
            Ami::Newest(n) => {
                let account = n.owner.len() == 12 && n.owner.bytes().all(|b| b.is_ascii_digit());
                if !account && !OWNER_ALIASES.contains(&n.owner.as_str()) {
                    v.here(format!(
                        "ami.owner `{}` is neither a 12-digit account id nor one of {}",
                        n.owner,
                        OWNER_ALIASES.join(", ")
                    ));
                }
                if n.name.trim().is_empty() {
                    v.here("ami.name is empty: give the image name pattern, such as `ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*`");
                }
            }
        }
    }

    /// The image this names now, with its root device.
    pub async fn resolve(&self, ctx: &Context) -> Result<Image> {
        match self {
            Ami::Id(id) => ctx.images.by_id(ctx, id).await,
            Ami::Parameter(p) => {
                let id = parameter_value(ctx, p).await?;
                ctx.images.by_id(ctx, &id).await
            }
            Ami::Newest(n) => {
                let image = newest(ctx, n).await?;
                ctx.images.keep(&image);
                Ok(image)
            }
        }
    }
}

/// The default size of the encrypted gp3 root volume of hosts and Grafana instances.
pub fn default_root_size() -> i32 {
    20
}

/// `root_volume_size_gib` as EBS takes it for gp3.
pub fn check_root_size(v: &mut Validator<'_>, size_gib: i32) {
    if !(8..=16384).contains(&size_gib) {
        v.here("root_volume_size_gib must be between 8 and 16384");
    }
}

/// What a launch needs of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    /// Where its root volume is attached (`/dev/xvda`, `/dev/sda1`).
    pub root_device: String,
    /// The size of its root volume's snapshot: a root volume cannot be smaller.
    pub root_size_gib: Option<i32>,
}

impl Image {
    /// Refuses a root volume the image's snapshot does not fit in, before AWS does.
    pub fn check_root_size(&self, size_gib: i32) -> Result<()> {
        match self.root_size_gib {
            Some(snapshot) if snapshot > size_gib => Err(Error::Invalid(format!(
                "root_volume_size_gib {size_gib} is smaller than the root snapshot of {} ({snapshot} GiB)",
                self.id
            ))),
            _ => Ok(()),
        }
    }

    fn of(image: &aws_sdk_ec2::types::Image) -> Image {
        let root_device = image.root_device_name().unwrap_or_default().to_string();
        let root_size_gib = image
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(root_device.as_str()))
            .and_then(|m| m.ebs())
            .and_then(|e| e.volume_size());
        Image {
            id: image.image_id().unwrap_or_default().to_string(),
            root_device,
            root_size_gib,
        }
    }
}

/// The images described so far, by id, for the life of the process: an image's root device
/// and snapshot never change.
#[derive(Debug, Default)]
pub struct Images(Mutex<HashMap<String, Image>>);

impl Images {
    pub fn new() -> Arc<Images> {
        Arc::new(Images::default())
    }

    fn keep(&self, image: &Image) {
        self.lock().insert(image.id.clone(), image.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Image>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn by_id(&self, ctx: &Context, id: &str) -> Result<Image> {
        if let Some(image) = self.lock().get(id) {
            return Ok(image.clone());
        }
        // By id a deprecated image is listed too; one that does not exist fails the call
        // (InvalidAMIID.NotFound), which says so.
        let out = ctx
            .ec2
            .describe_images()
            .image_ids(id)
            .send()
            .await
            .map_err(aws_error("ec2", "DescribeImages"))?;
        let image = out
            .images()
            .iter()
            .find(|i| i.image_id() == Some(id))
            .map(Image::of)
            .ok_or_else(|| Error::Invalid(format!("AMI {id} does not exist in {}", ctx.region)))?;
        self.keep(&image);
        Ok(image)
    }
}

async fn parameter_value(ctx: &Context, parameter: &str) -> Result<String> {
    let out = ctx
        .ssm
        .get_parameter()
        .name(parameter)
        .send()
        .await
        .map_err(aws_error("ssm", "GetParameter"))?;
    out.parameter()
        .and_then(|p| p.value())
        .map(str::to_string)
        .ok_or_else(|| Error::Invalid(format!("SSM parameter {parameter} has no value")))
}

/// The most recent available image of the owner matching the name: every page read, the
/// latest `CreationDate` taken (ties by id, so the choice is stable).
async fn newest(ctx: &Context, n: &Newest) -> Result<Image> {
    let filter = |name: &str, value: &str| Filter::builder().name(name).values(value).build();
    let images = ctx
        .ec2
        .describe_images()
        .owners(&n.owner)
        .filters(filter("name", &n.name))
        .filters(filter("state", "available"))
        .into_paginator()
        .page_size(1000)
        .items()
        .send()
        .collect::<std::result::Result<Vec<_>, _>>()
        .await
        .map_err(aws_error("ec2", "DescribeImages"))?;
    images
        .iter()
        .filter_map(|i| Some((created(i.creation_date()?)?, i.image_id()?, i)))
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
        .map(|(_, _, i)| Image::of(i))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no available image of {} is named like {} in {}",
                n.owner, n.name, ctx.region
            ))
        })
}

/// `CreationDate` (`2024-05-01T12:00:00.000Z`) as a time.
fn created(date: &str) -> Option<aws_smithy_types::DateTime> {
    aws_smithy_types::DateTime::from_str(date, aws_smithy_types::date_time::Format::DateTime).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Host {
        ami: Ami,
    }

    fn ami(toml_text: &str) -> std::result::Result<Ami, String> {
        toml::from_str::<Host>(toml_text)
            .map(|h| h.ami)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn three_ways_to_name_an_image() {
        assert_eq!(ami("ami = \"ami-1\""), Ok(Ami::Id("ami-1".into())));
        assert_eq!(
            ami("ami = \"resolve:ssm:/aws/service/x\""),
            Ok(Ami::Parameter("/aws/service/x".into()))
        );
        assert_eq!(
            ami("ami = { owner = \"099720109477\", name = \"ubuntu/*\" }"),
            Ok(Ami::Newest(Newest {
                owner: "099720109477".into(),
                name: "ubuntu/*".into()
            }))
        );
    }

    #[test]
    fn terraform_spelling_of_the_owner_is_refused_by_name() {
        let e = ami("ami = { owners = [\"099720109477\"], name = \"ubuntu/*\" }").unwrap_err();
        assert!(e.contains("unknown field `owners`"), "{e}");
        let e = ami("ami = 3").unwrap_err();
        assert!(e.contains("an AMI id, `resolve:ssm:<parameter>`"), "{e}");
    }

    #[test]
    fn creation_dates_compare_as_times() {
        let a = created("2024-05-01T12:00:00.000Z").unwrap();
        let b = created("2024-05-01T12:00:01.000Z").unwrap();
        assert!(a < b);
        assert!(created("yesterday").is_none());
    }

    #[test]
    fn a_root_volume_smaller_than_the_snapshot_is_refused() {
        let image = Image {
            id: "ami-1".into(),
            root_device: "/dev/sda1".into(),
            root_size_gib: Some(30),
        };
        assert!(image.check_root_size(30).is_ok());
        let e = image.check_root_size(20).unwrap_err().to_string();
        assert!(
            e.contains("smaller than the root snapshot of ami-1 (30 GiB)"),
            "{e}"
        );
    }
}
