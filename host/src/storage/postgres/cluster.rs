//! ClusterStore on PostgreSQL: the `cluster_nodes` table of leases.
//!
//! Renewals and joins run on a pooled connection of their own, not in the
//! writer's queue: a lease must not wait behind a burst of messages. A reap
//! is a write (under the write lock) because it closes sessions, whose
//! presence counts need the lock; it marks the node reaped with its first
//! statement, and the row lock orders it against a renewal of the same
//! node (READ COMMITTED re-checks the second one's condition on the row the
//! first one left).

use std::time::Duration;

use async_trait::async_trait;

use super::messages::{big, message_from_row, Checked, MESSAGE_COLUMNS};
use super::sessions::close_node;
use super::{map_err, map_pool_err, PostgresStorage};
use crate::storage::cluster::{ClusterStore, Joined, NodeInfo, Renewal};
use crate::storage::messages::StoredMessage;
use crate::storage::{Result, SessionEvents};

/// The database's clock in unix milliseconds, in SQL.
pub(super) const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

#[async_trait]
impl ClusterStore for PostgresStorage {
    async fn node_join(
        &self,
        node_id: &str,
        incarnation: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<Joined> {
        let conn = self.lease_pool().get().await.map_err(map_pool_err)?;
        // Taken when there is no row, or the row's lease is not live (lapsed,
        // reaped, or left), or it is this very incarnation.
        let sql = format!(
            "INSERT INTO cluster_nodes AS n (node_id, incarnation, address, started_at, lease_until, reaped)
             VALUES ($1, $2, $3, {NOW_MS}, {NOW_MS} + $4, FALSE)
             ON CONFLICT (node_id) DO UPDATE
                SET incarnation = EXCLUDED.incarnation, address = EXCLUDED.address,
                    started_at = EXCLUDED.started_at, lease_until = EXCLUDED.lease_until,
                    reaped = FALSE
              WHERE n.incarnation = EXCLUDED.incarnation OR n.reaped OR n.lease_until < {NOW_MS}
             RETURNING node_id"
        );
        let taken = conn
            .query_opt(&sql, &[&node_id, &incarnation, &address, &ms(ttl)])
            .await
            .map_err(map_err)?;
        if taken.is_some() {
            return Ok(Joined::Holding);
        }
        let row = conn
            .query_one(
                &format!("SELECT lease_until - {NOW_MS} FROM cluster_nodes WHERE node_id = $1"),
                &[&node_id],
            )
            .await
            .map_err(map_err)?;
        Ok(Joined::HeldByAnother {
            remaining_ms: row.get::<_, i64>(0).max(0),
        })
    }

    async fn node_renew(&self, node_id: &str, incarnation: &str, ttl: Duration) -> Result<Renewal> {
        let conn = self.lease_pool().get().await.map_err(map_pool_err)?;
        let sql = format!(
            "UPDATE cluster_nodes SET lease_until = {NOW_MS} + $3
              WHERE node_id = $1 AND incarnation = $2 AND NOT reaped AND lease_until >= {NOW_MS}"
        );
        let n = conn
            .execute(&sql, &[&node_id, &incarnation, &ms(ttl)])
            .await
            .map_err(map_err)?;
        Ok(if n == 1 {
            Renewal::Renewed
        } else {
            Renewal::Lost
        })
    }

    async fn node_leave(&self, node_id: &str, incarnation: &str) -> Result<()> {
        let conn = self.lease_pool().get().await.map_err(map_pool_err)?;
        // Lapsed at once, not reaped: a survivor reaps it on its next
        // round and closes whatever this node could not record.
        conn.execute(
            "UPDATE cluster_nodes SET lease_until = 0
              WHERE node_id = $1 AND incarnation = $2 AND NOT reaped",
            &[&node_id, &incarnation],
        )
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn nodes_lapsed(&self) -> Result<Vec<String>> {
        let conn = self.pool().get().await.map_err(map_pool_err)?;
        let rows = conn
            .query(
                &format!(
                    "SELECT node_id FROM cluster_nodes WHERE NOT reaped AND lease_until < {NOW_MS}
                      ORDER BY node_id"
                ),
                &[],
            )
            .await
            .map_err(map_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn node_reap(&self, node_id: &str, events: SessionEvents) -> Result<Option<usize>> {
        let node = node_id.to_string();
        self.write_urgent(move |t| {
            Box::pin(async move {
                let marked = t
                    .execute(
                        &format!(
                            "UPDATE cluster_nodes SET reaped = TRUE
                              WHERE node_id = $1 AND NOT reaped AND lease_until < {NOW_MS}"
                        ),
                        &[&node],
                    )
                    .await?;
                if marked == 0 {
                    return Ok(None);
                }
                let closed = close_node(t, &node, &events).await?;
                Ok(Some(closed))
            })
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        let conn = self.pool().get().await.map_err(map_pool_err)?;
        let rows = conn
            .query(
                &format!(
                    "SELECT node_id, incarnation, address, started_at, lease_until, reaped,
                            NOT reaped AND lease_until >= {NOW_MS}
                       FROM cluster_nodes ORDER BY node_id"
                ),
                &[],
            )
            .await
            .map_err(map_err)?;
        Ok(rows
            .iter()
            .map(|r| NodeInfo {
                node_id: r.get(0),
                incarnation: r.get(1),
                address: r.get(2),
                started_at: r.get(3),
                lease_until: r.get(4),
                reaped: r.get(5),
                alive: r.get(6),
            })
            .collect())
    }

    async fn signature_first_use(&self, signature_hash: &str, until_ms: i64) -> Result<bool> {
        let conn = self.pool().get().await.map_err(map_pool_err)?;
        // Taken when new, or when the remembered one has expired.
        let sql = format!(
            "INSERT INTO cluster_seen_signatures AS s (signature, until_ms) VALUES ($1, $2)
             ON CONFLICT (signature) DO UPDATE SET until_ms = EXCLUDED.until_ms
              WHERE s.until_ms <= {NOW_MS}
             RETURNING signature"
        );
        let first = conn
            .query_opt(&sql, &[&signature_hash, &until_ms])
            .await
            .map_err(map_err)?
            .is_some();
        if first && rand::random::<u8>() == 0 {
            // About one request in 256 sweeps what expired.
            let sweep = format!("DELETE FROM cluster_seen_signatures WHERE until_ms <= {NOW_MS}");
            if let Err(e) = conn.execute(&sweep, &[]).await {
                tracing::debug!(error = %e, "cannot sweep expired signatures");
            }
        }
        Ok(first)
    }

    async fn channel_heads(&self, channel_keys: Vec<String>) -> Result<Vec<(String, u64)>> {
        if channel_keys.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.pool().get().await.map_err(map_pool_err)?;
        let rows = conn
            .query(
                "SELECT channel, last_seq FROM channels WHERE channel = ANY($1)",
                &[&channel_keys],
            )
            .await
            .map_err(map_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn channel_messages(
        &self,
        channel_key: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let conn = self.pool().get().await.map_err(map_pool_err)?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages
                      WHERE channel = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ),
                &[&channel_key, &big(after_seq), &big(limit as u64)],
            )
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|r| message_from_row(r, 0))
            .collect::<Checked<Vec<_>>>()
    }
}
