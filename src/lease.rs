//! `--lease TABLE`: one writer among several daemons (two management instances for high
//! availability), by a lease item in a DynamoDB table.
//!
//! The item `{lease: <stack>, holder, expires}` (the key is `<account>/<stack>` for a stack
//! acting as a role of another account: [`key`]) is written only with a condition: nobody holds
//! it, or this daemon does, or the holder's lease has expired. A daemon holds the lease from
//! the moment it *sent* a successful write until `duration` later, minus a safety margin, by its
//! own monotonic clock; it renews every third of the duration. A holder that dies stops
//! renewing, and another takes over once `expires` has passed. Expiry is compared with each
//! daemon's wall clock, so management instances need synchronised clocks (Amazon Time Sync);
//! the margin absorbs a skew of up to a fifth of the duration.
//!
//! The engine checks [`Lease::held`] right before every AWS write, so a daemon that lost the
//! lease in the middle of a pass stops writing there. A daemon that shuts down cleanly deletes
//! the item, so the other takes over at its next renewal instead of after the expiry.
//!
//! The table (partition key `lease`, a string) is created on first use when missing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use tokio::sync::watch;
use tokio::time::Instant;

/// The key of a stack's lease item: its name, or `<account>/<name>` when it acts as a role
/// (`[stack] assume_role`) in that account. Ownership is by stack name within an account, so
/// two accounts' stacks of one name are two stacks, and their daemons must not wait for each
/// other; two daemons of one stack in one account share the item.
pub fn key(stack: &stackwarden_controllers::desired::StackSpec) -> String {
    let name = stack.name.get_ref();
    match stack.role_account() {
        Some(account) => format!("{account}/{name}"),
        None => name.clone(),
    }
}

pub struct Lease {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// The lease's key ([`key`]), so one table serves several stacks.
    key: String,
    /// Who this daemon is: host name, process id and a random part.
    pub holder: String,
    duration: Duration,
    /// `Some(until)` while held.
    until: std::sync::Mutex<Option<Instant>>,
    /// Flips when the lease is taken or lost.
    changes: watch::Sender<bool>,
}

impl Lease {
    pub fn new(
        sdk: &aws_config::SdkConfig,
        interceptor: aws_smithy_runtime_api::client::interceptors::SharedInterceptor,
        table: &str,
        key: &str,
        duration: Duration,
    ) -> Lease {
        let conf = aws_sdk_dynamodb::config::Builder::from(sdk)
            .interceptor(interceptor)
            .build();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Lease {
            client: aws_sdk_dynamodb::Client::from_conf(conf),
            table: table.to_string(),
            key: key.to_string(),
            holder: format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..)),
            duration,
            until: std::sync::Mutex::new(None),
            changes: watch::channel(false).0,
        }
    }

    /// Whether this daemon may write now.
    pub fn held(&self) -> bool {
        self.until
            .lock()
            .expect("lease lock")
            .is_some_and(|until| Instant::now() < until)
    }

    /// Notified when the lease is taken or lost.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Ensures the table exists (creating it, pay per request, when missing).
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await;
        match described {
            Ok(_) => return Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) => {}
            Err(e) => {
                return Err(aws_sdk_dynamodb::Error::from(e))
                    .with_context(|| format!("cannot read the lease table {}", self.table))
            }
        }
        tracing::info!(table = %self.table, "creating the lease table");
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("lease")
                    .attribute_type(ScalarAttributeType::S)
                    .build()?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("lease")
                    .key_type(KeyType::Hash)
                    .build()?,
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        if let Err(e) = created {
            // The other daemon may have created it at the same moment.
            if !e
                .as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception())
            {
                return Err(aws_sdk_dynamodb::Error::from(e))
                    .with_context(|| format!("cannot create the lease table {}", self.table));
            }
        }
        for _ in 0..120 {
            let t = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(aws_sdk_dynamodb::Error::from)?;
            if t.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        anyhow::bail!("the lease table {} did not become ACTIVE", self.table)
    }

    /// One attempt to take or renew the lease. Returns whether it is held.
    pub async fn try_acquire(&self) -> bool {
        let sent = Instant::now();
        let now_ms = unix_millis();
        let expires = now_ms + self.duration.as_millis() as u64;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("lease", AttributeValue::S(self.key.clone()))
            .item("holder", AttributeValue::S(self.holder.clone()))
            .item("expires", AttributeValue::N(expires.to_string()))
            .condition_expression("attribute_not_exists(#l) OR #h = :me OR #e < :now")
            .expression_attribute_names("#l", "lease")
            .expression_attribute_names("#h", "holder")
            .expression_attribute_names("#e", "expires")
            .expression_attribute_values(":me", AttributeValue::S(self.holder.clone()))
            .expression_attribute_values(":now", AttributeValue::N(now_ms.to_string()))
            .send()
            .await;
        let held = match result {
            Ok(_) => {
                // A fifth of the duration for clock skew and the time the write took.
                *self.until.lock().expect("lease lock") = Some(sent + self.duration.mul_f64(0.8));
                true
            }
            Err(e) => {
                if !e
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception())
                {
                    tracing::warn!(error = %aws_sdk_dynamodb::Error::from(e), "cannot renew the lease");
                }
                // Held until the previous renewal runs out, if it has not.
                self.held()
            }
        };
        self.changes.send_if_modified(|was| {
            let changed = *was != held;
            *was = held;
            changed
        });
        held
    }

    /// Takes and renews the lease forever: every third of its duration.
    pub async fn keep(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(self.duration / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate, and the caller has just made the first attempt.
        tick.tick().await;
        let mut was = self.held();
        loop {
            tick.tick().await;
            let held = self.try_acquire().await;
            if held != was {
                if held {
                    tracing::info!(holder = %self.holder, table = %self.table, "lease taken: this daemon writes");
                } else {
                    tracing::warn!(holder = %self.holder, "lease lost: observing only");
                }
                was = held;
            }
        }
    }

    /// Who holds the lease now, as far as the table says (for messages).
    pub async fn holder_now(&self) -> String {
        let item = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("lease", AttributeValue::S(self.key.clone()))
            .consistent_read(true)
            .send()
            .await;
        match item
            .ok()
            .and_then(|o| o.item().and_then(|i| i.get("holder").cloned()))
        {
            Some(AttributeValue::S(h)) => h,
            _ => "another stackwarden".into(),
        }
    }

    /// Gives the lease up (a clean shutdown), so the other daemon need not wait for expiry.
    pub async fn release(&self) {
        *self.until.lock().expect("lease lock") = None;
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("lease", AttributeValue::S(self.key.clone()))
            .condition_expression("#h = :me")
            .expression_attribute_names("#h", "holder")
            .expression_attribute_values(":me", AttributeValue::S(self.holder.clone()))
            .send()
            .await;
        match result {
            Ok(_) => tracing::info!("lease released"),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) => {}
            Err(e) => {
                tracing::warn!(error = %aws_sdk_dynamodb::Error::from(e), "cannot release the lease")
            }
        }
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use stackwarden_controllers::desired::StackSpec;
    use toml::Spanned;

    fn stack(name: &str, role: Option<&str>) -> StackSpec {
        StackSpec {
            name: Spanned::new(0..0, name.to_string()),
            region: None,
            tags: None,
            deletion_policy: Default::default(),
            assume_role: role.map(|r| Spanned::new(0..0, r.to_string())),
            external_id: None,
        }
    }

    #[test]
    fn a_stacks_lease_item_is_its_own_in_every_account() {
        assert_eq!(super::key(&stack("monitoring", None)), "monitoring");
        let dev = "arn:aws:iam::111111111111:role/stackwarden";
        let prod = "arn:aws:iam::222222222222:role/ops/stackwarden";
        assert_eq!(
            super::key(&stack("monitoring", Some(dev))),
            "111111111111/monitoring"
        );
        assert_ne!(
            super::key(&stack("monitoring", Some(dev))),
            super::key(&stack("monitoring", Some(prod)))
        );
        // Two roles of one account act on the one stack of that name there: one item.
        let other_role = "arn:aws:iam::111111111111:role/another";
        assert_eq!(
            super::key(&stack("monitoring", Some(dev))),
            super::key(&stack("monitoring", Some(other_role)))
        );
    }
}
