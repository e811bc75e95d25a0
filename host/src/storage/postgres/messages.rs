//! MessageStore on PostgreSQL (being written).
#![allow(unused_variables)] // placeholder bodies until the engine is written

use async_trait::async_trait;

use super::PostgresStorage;
use crate::storage::messages::{
    Appended, Channel, ConversationPage, ConversationRow, EventBuilder, MessagePage, MessageRange,
    MessageStore, NewMessage, OnAppend, RowChange, SendRejected, SyncRefused,
};
use crate::storage::Result;

#[async_trait]
impl MessageStore for PostgresStorage {
    async fn append_message(
        &self,
        message: NewMessage,
        event: EventBuilder,
        on_append: OnAppend,
    ) -> Result<std::result::Result<Appended, SendRejected>> {
        todo!("PostgreSQL MessageStore")
    }
    async fn messages(
        &self,
        user: &str,
        range: MessageRange,
        limit: usize,
    ) -> Result<std::result::Result<MessagePage, SyncRefused>> {
        todo!("PostgreSQL MessageStore")
    }
    async fn conversations(
        &self,
        user: &str,
        since: u64,
        high: Option<u64>,
        after_key: Option<String>,
        limit: usize,
        last_messages: usize,
    ) -> Result<std::result::Result<ConversationPage, SyncRefused>> {
        todo!("PostgreSQL MessageStore")
    }
    async fn change_conversation(
        &self,
        user: &str,
        channel: Channel,
        change: RowChange,
    ) -> Result<Option<ConversationRow>> {
        todo!("PostgreSQL MessageStore")
    }
    async fn prune_conversations(&self, older_than_ms: i64) -> Result<usize> {
        todo!("PostgreSQL MessageStore")
    }
    async fn current_version(&self) -> Result<u64> {
        todo!("PostgreSQL MessageStore")
    }
}
