//! EC2 images: `DescribeImages` as AWS answers it, over moto's images and the public images a
//! test publishes ([`crate::Emulator::publish_image`], `POST /_emulator/images`): the AMIs of
//! publishers such as Canonical (account 099720109477), which no test account owns and moto
//! has no notion of.
//!
//! Where moto is laxer than AWS (EC2 API reference, DescribeImages; EC2 User Guide, "List and
//! filter using the CLI and API"), answered as AWS does:
//! - Deprecated images are left out unless `IncludeDeprecated` is true or the images are named
//!   by id.
//! - With `MaxResults` the listing is paged, and the filters apply to each page after it is
//!   taken: a page may be short, or empty, while a `NextToken` says more follow. `MaxResults`
//!   with `ImageIds` is `InvalidParameterCombination`.
//! - Images come in no particular order (here by id, which says nothing of their age).
//! - Filter values take `*` (any run of characters) and `?` (zero or one character); a
//!   backslash makes either literal.
//!
//! A filter this emulator does not know is refused, so a test never passes on a filter that was
//! silently ignored. `RunInstances` is checked against the images too ([`check_launch`]).

use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::route::Incoming;
use crate::wire::{escape, paginate, ApiError};
use crate::{lock, State};

/// A public image, as its publisher registered it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicImage {
    /// Default us-east-1.
    #[serde(default = "us_east_1")]
    pub region: String,
    /// The publisher's account id.
    pub owner: String,
    pub name: String,
    /// ISO 8601 with milliseconds, as AWS writes it (`2024-05-01T12:00:00.000Z`).
    pub creation_date: String,
    /// Default `/dev/sda1`, as Ubuntu's images have it.
    #[serde(default = "sda1")]
    pub root_device_name: String,
    /// The root snapshot's size; default 8 GiB.
    #[serde(default = "eight")]
    pub root_size_gib: i32,
    /// Default `x86_64`.
    #[serde(default = "x86_64")]
    pub architecture: String,
    /// Deprecated since its creation.
    #[serde(default)]
    pub deprecated: bool,
}

impl PublicImage {
    /// An available x86_64 image of `owner` in us-east-1, its root at `/dev/sda1` (8 GiB).
    pub fn new(owner: &str, name: &str, creation_date: &str) -> PublicImage {
        PublicImage {
            region: us_east_1(),
            owner: owner.into(),
            name: name.into(),
            creation_date: creation_date.into(),
            root_device_name: sda1(),
            root_size_gib: eight(),
            architecture: x86_64(),
            deprecated: false,
        }
    }
}

fn us_east_1() -> String {
    "us-east-1".into()
}
fn sda1() -> String {
    "/dev/sda1".into()
}
fn eight() -> i32 {
    8
}
fn x86_64() -> String {
    "x86_64".into()
}

/// The published images, with their ids.
#[derive(Default)]
pub struct Store {
    images: Vec<(String, PublicImage)>,
}

impl Store {
    /// Registers `image`; its id.
    pub fn publish(&mut self, image: PublicImage) -> String {
        // Ids derived from what is published, so their order says nothing of the age.
        let digest = format!(
            "{:x}",
            hash128(&format!(
                "{}/{}/{}",
                image.owner,
                image.name,
                self.images.len()
            ))
        );
        let id = format!("ami-{:0>17}", &digest[..digest.len().min(17)]);
        self.images.push((id.clone(), image));
        id
    }
}

/// A stable 64-bit hash (FNV-1a) of `text`, twice, as 128 bits.
fn hash128(text: &str) -> u128 {
    let fnv = |seed: u64| {
        text.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325_cbf2_9ce4))
}

/// The answer of one image, as an `item` of `imagesSet`.
fn render(id: &str, i: &PublicImage) -> String {
    let e = escape;
    let deprecation = if i.deprecated {
        format!("<deprecationTime>{}</deprecationTime>", e(&i.creation_date))
    } else {
        String::new()
    };
    format!(
        "<item><imageId>{id}</imageId><imageLocation>{owner}/{name}</imageLocation>\
         <imageState>available</imageState><imageOwnerId>{owner}</imageOwnerId>\
         <creationDate>{created}</creationDate><isPublic>true</isPublic>\
         <architecture>{arch}</architecture><imageType>machine</imageType><name>{name}</name>\
         <rootDeviceType>ebs</rootDeviceType><rootDeviceName>{root}</rootDeviceName>\
         <blockDeviceMapping><item><deviceName>{root}</deviceName><ebs>\
         <snapshotId>snap-{snap}</snapshotId><volumeSize>{size}</volumeSize>\
         <deleteOnTermination>true</deleteOnTermination><volumeType>gp3</volumeType>\
         <encrypted>false</encrypted></ebs></item></blockDeviceMapping>\
         <virtualizationType>hvm</virtualizationType><hypervisor>xen</hypervisor>\
         {deprecation}</item>",
        owner = e(&i.owner),
        name = e(&i.name),
        created = e(&i.creation_date),
        arch = e(&i.architecture),
        root = e(&i.root_device_name),
        snap = &id[4..],
        size = i.root_size_gib,
    )
}

/// The filters known here, with the element of an image's answer each one reads.
const FILTERS: &[(&str, &str)] = &[
    ("name", "name"),
    ("image-id", "imageId"),
    ("owner-id", "imageOwnerId"),
    ("state", "imageState"),
    ("architecture", "architecture"),
    ("virtualization-type", "virtualizationType"),
    ("root-device-type", "rootDeviceType"),
    ("root-device-name", "rootDeviceName"),
    ("is-public", "isPublic"),
    ("image-type", "imageType"),
];

/// One image of the listing: its `item` element's text, and what the checks read of it.
struct Listed {
    xml: String,
    id: String,
    deprecated: bool,
}

pub async fn describe_images(state: &Arc<State>, req: &Incoming) -> Result<Response, ApiError> {
    let form = req.form();
    let numbered = |prefix: &str| -> Vec<String> {
        form.iter()
            .filter(|(k, _)| {
                k.strip_prefix(prefix)
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|(_, v)| v.clone())
            .collect()
    };
    let param = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let ids = numbered("ImageId.");
    let owners = numbered("Owner.");
    if !numbered("ExecutableBy.").is_empty() {
        return Err(ApiError::bad_request(
            "InvalidParameterValue",
            "the emulator does not implement ExecutableBy",
        ));
    }
    let max = param("MaxResults")
        .map(|m| {
            m.parse::<usize>().map_err(|_| {
                ApiError::bad_request(
                    "InvalidParameterValue",
                    format!("MaxResults {m} is not a number"),
                )
            })
        })
        .transpose()?;
    if max.is_some() && !ids.is_empty() {
        return Err(ApiError::bad_request(
            "InvalidParameterCombination",
            "The parameter imageIdsSet cannot be used with the parameter maxResults",
        ));
    }
    let include_deprecated = param("IncludeDeprecated").as_deref() == Some("true");
    let filters = filters(&form)?;

    let published: Vec<(String, PublicImage)> = lock(&state.images)
        .images
        .iter()
        .filter(|(_, i)| i.region == req.region)
        .cloned()
        .collect();
    let (named, others): (Vec<String>, Vec<String>) = ids
        .iter()
        .cloned()
        .partition(|id| published.iter().any(|(p, _)| p == id));
    let mut listed: Vec<Listed> = Vec::new();
    if ids.is_empty() || !others.is_empty() {
        // moto's own images, by the ids and owners asked (filters apply below).
        let mut params = vec![
            ("Action".to_string(), "DescribeImages".to_string()),
            ("Version".to_string(), "2016-11-15".to_string()),
        ];
        params.extend(
            others
                .iter()
                .enumerate()
                .map(|(n, id)| (format!("ImageId.{}", n + 1), id.clone())),
        );
        params.extend(
            owners
                .iter()
                .enumerate()
                .map(|(n, o)| (format!("Owner.{}", n + 1), o.clone())),
        );
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        let request = Incoming::internal(req, "ec2", "POST", "/", body.into());
        let answer = state.moto.forward(&request).await?;
        if !answer.status().is_success() {
            return Ok(answer.map(Body::from).into_response());
        }
        let text = String::from_utf8_lossy(answer.body()).into_owned();
        let doc = crate::moto::xml(&text)?;
        for item in doc
            .descendants()
            .filter(|n| n.has_tag_name("imagesSet"))
            .flat_map(|s| s.children().filter(|n| n.has_tag_name("item")))
        {
            listed.push(Listed {
                xml: text[item.range()].to_string(),
                id: crate::moto::child_text(item, "imageId").unwrap_or_default(),
                deprecated: false,
            });
        }
    }
    for (id, image) in &published {
        let wanted = if ids.is_empty() {
            owners.is_empty() || owners.contains(&image.owner)
        } else {
            named.contains(id)
        };
        if wanted {
            listed.push(Listed {
                xml: render(id, image),
                id: id.clone(),
                deprecated: image.deprecated,
            });
        }
    }
    if ids.is_empty() && !include_deprecated {
        listed.retain(|l| !l.deprecated);
    }
    listed.sort_by(|a, b| a.id.cmp(&b.id));

    let (page, next_token) = match max {
        Some(max) => {
            let page = paginate(&listed, max, param("NextToken").as_deref()).map_err(|_| {
                ApiError::bad_request(
                    "InvalidParameterValue",
                    "the NextToken is not one this API returned",
                )
            })?;
            (page.items, page.next_token)
        }
        None => (&listed[..], None),
    };
    let mut items = String::new();
    for l in page {
        if matches(&l.xml, &filters)? {
            items.push_str(&l.xml);
        }
    }
    let next = next_token
        .map(|t| format!("<nextToken>{}</nextToken>", escape(&t)))
        .unwrap_or_default();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeImagesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{}</requestId><imagesSet>{items}</imagesSet>{next}</DescribeImagesResponse>",
        uuid::Uuid::new_v4()
    );
    Ok((
        StatusCode::OK,
        [(http::header::CONTENT_TYPE, "text/xml")],
        body,
    )
        .into_response())
}

/// What RunInstances checks of its image, as EC2 does and moto does not: that it exists
/// (`InvalidAMIID.NotFound`), and that a volume given for its root device holds the root
/// snapshot (`InvalidBlockDeviceMapping`). A launch from a template names no image here.
pub async fn check_launch(state: &Arc<State>, req: &Incoming) -> Result<(), ApiError> {
    let form = req.form();
    let param = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let Some(id) = param("ImageId") else {
        return Ok(());
    };
    let published = lock(&state.images)
        .images
        .iter()
        .find(|(p, i)| *p == id && i.region == req.region)
        .map(|(_, i)| (i.root_device_name.clone(), Some(i.root_size_gib)));
    let (root, snapshot) = match published {
        Some(found) => found,
        None => {
            let body: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs([
                    ("Action", "DescribeImages"),
                    ("Version", "2016-11-15"),
                    ("ImageId.1", id.as_str()),
                ])
                .finish();
            let answer = state
                .moto
                .forward(&Incoming::internal(req, "ec2", "POST", "/", body.into()))
                .await?;
            let text = String::from_utf8_lossy(answer.body()).into_owned();
            let doc = crate::moto::xml(&text)?;
            let image = doc
                .descendants()
                .find(|n| n.has_tag_name("imagesSet"))
                .and_then(|s| s.children().find(|n| n.has_tag_name("item")));
            let Some(image) = image.filter(|_| answer.status().is_success()) else {
                return Err(ApiError::bad_request(
                    "InvalidAMIID.NotFound",
                    format!("The image id '[{id}]' does not exist"),
                ));
            };
            let root = crate::moto::child_text(image, "rootDeviceName").unwrap_or_default();
            let size = image
                .descendants()
                .filter(|n| n.has_tag_name("item"))
                .find(|m| crate::moto::child_text(*m, "deviceName").as_deref() == Some(&root))
                .and_then(|m| m.descendants().find(|n| n.has_tag_name("volumeSize")))
                .and_then(|n| n.text())
                .and_then(|t| t.parse().ok());
            (root, size)
        }
    };
    let Some(snapshot) = snapshot else {
        return Ok(());
    };
    for n in 1.. {
        let Some(device) = param(&format!("BlockDeviceMapping.{n}.DeviceName")) else {
            break;
        };
        let size: Option<i32> =
            param(&format!("BlockDeviceMapping.{n}.Ebs.VolumeSize")).and_then(|s| s.parse().ok());
        if device == root && size.is_some_and(|size| size < snapshot) {
            return Err(ApiError::bad_request(
                "InvalidBlockDeviceMapping",
                format!(
                    "Volume of size {}GB is smaller than  snapshot 'snap-{}', expect size >= {snapshot}GB",
                    size.unwrap_or_default(),
                    id.trim_start_matches("ami-")
                ),
            ));
        }
    }
    Ok(())
}

/// `Filter.N.Name` with its `Filter.N.Value.M`, each name one this emulator knows.
fn filters(form: &[(String, String)]) -> Result<Vec<(&'static str, Vec<String>)>, ApiError> {
    let mut out = Vec::new();
    for n in 1.. {
        let Some((_, name)) = form.iter().find(|(k, _)| *k == format!("Filter.{n}.Name")) else {
            break;
        };
        let Some((_, element)) = FILTERS.iter().find(|(f, _)| f == name) else {
            return Err(ApiError::bad_request(
                "InvalidParameterValue",
                format!("the emulator does not implement the DescribeImages filter {name}"),
            ));
        };
        let prefix = format!("Filter.{n}.Value.");
        let values = form
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect();
        out.push((*element, values));
    }
    Ok(out)
}

/// Whether an image's answer passes every filter (one of its values, wildcards as AWS has them).
fn matches(item: &str, filters: &[(&'static str, Vec<String>)]) -> Result<bool, ApiError> {
    let doc = crate::moto::xml(item)?;
    let root = doc.root_element();
    Ok(filters.iter().all(|(element, values)| {
        let value = crate::moto::child_text(root, element).unwrap_or_default();
        values.iter().any(|pattern| wildcard(pattern, &value))
    }))
}

/// `*` matches any run of characters, `?` zero or one, `\` makes the next character literal.
fn wildcard(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => go(rest, t) || (!t.is_empty() && go(rest, &t[1..])),
            Some(('\\', rest)) if !rest.is_empty() => {
                t.first() == Some(&rest[0]) && go(&rest[1..], &t[1..])
            }
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_as_ec2_filters_have_them() {
        let name = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20240501";
        assert!(wildcard(
            "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*",
            name
        ));
        assert!(!wildcard(
            "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-arm64-server-*",
            name
        ));
        assert!(wildcard("ab?c", "abc"), "? matches nothing");
        assert!(wildcard("ab?c", "abxc"), "or one character");
        assert!(!wildcard("ab?c", "abxyc"));
        assert!(wildcard("a\\*b", "a*b"));
        assert!(!wildcard("a\\*b", "axb"));
        assert!(!wildcard("abc", "abcd"), "the whole value matches");
    }

    #[test]
    fn ids_are_unique_and_in_no_order_of_publication() {
        let mut store = Store::default();
        let image = |name: &str| PublicImage::new("099720109477", name, "2024-01-01T00:00:00.000Z");
        let ids: Vec<String> = (0..20)
            .map(|n| store.publish(image(&format!("i-{n}"))))
            .collect();
        assert!(ids
            .iter()
            .all(|id| id.len() == 21 && id.starts_with("ami-")));
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 20);
        assert_ne!(sorted, ids);
    }
}
