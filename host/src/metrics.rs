//! The Prometheus metrics of one gateway instance.
//!
//! Each [`Metrics`] owns its own registry (no global recorder), so several
//! gateways in one process, as in tests, never mix their figures. Subsystems
//! hold an `Arc<Metrics>` and update the fields directly; `GET /metrics`
//! renders the registry in the [`Format`] the scraper asked for.
//!
//! prometheus-client encodes only OpenMetrics text. The Prometheus text
//! format 0.0.4, which is what a scraper gets unless it asks for
//! OpenMetrics, is made from that output by [`to_text_004`]: the two differ,
//! for the metric types used here (counters, gauges, histograms; no units,
//! exemplars or info metrics), only in a counter's family name (`x` in
//! OpenMetrics, `x_total` like its samples in 0.0.4) and in the `# EOF`
//! line that 0.0.4 does not have.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LifecycleLabel {
    pub event: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointOutcomeLabel {
    pub endpoint: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrameLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginHookLabel {
    pub plugin: String,
    pub hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginOutcomeLabel {
    pub plugin: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLogLabel {
    pub plugin: String,
    /// `line`, `field` or `truncated`.
    pub part: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginCallLabel {
    pub plugin: String,
    pub hook: String,
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn lag_histogram() -> Histogram {
    // 1 ms .. ~36 h
    Histogram::new(exponential_buckets(0.001, 3.0, 18))
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub connections_open: Gauge,
    pub lifecycle_events: Family<LifecycleLabel, Counter>,
    /// Closes of ended connections that storage has not taken yet (retried).
    pub lifecycle_closes_pending: Gauge,
    pub handshake_failures: Family<ReasonLabel, Counter>,
    pub frames_received: Family<FrameLabel, Counter>,
    pub frame_errors: Family<ReasonLabel, Counter>,
    pub outbox_depth: Gauge,
    pub webhook_attempts: Family<EndpointOutcomeLabel, Counter>,
    pub webhook_latency_seconds: HistogramFamily<EndpointLabel>,
    pub webhook_event_lag_seconds: HistogramFamily<EndpointLabel>,
    pub webhook_pending: Family<EndpointLabel, Gauge>,
    pub webhook_failed: Family<EndpointLabel, Gauge>,
    pub webhook_endpoint_disabled: Family<EndpointLabel, Gauge>,
    /// 1 while this process holds the endpoint's delivery lease.
    pub webhook_endpoint_leader: Family<EndpointLabel, Gauge>,
    /// Times this process took an endpoint's delivery lease.
    pub webhook_lease_takeovers: Family<EndpointLabel, Counter>,
    pub storage_commit_seconds: Histogram,
    pub storage_batch_size: Histogram,
    /// Writes holding a place in the writer's queue (waiting or running).
    pub storage_queued_writes: Gauge,
    /// Writes refused because the queue stayed full (`storage_busy`).
    pub storage_busy: Counter,
    pub open_latency_seconds: Histogram,
    pub config_reloads: Family<ReasonLabel, Counter>,
    pub webhook_skipped: Family<EndpointLabel, Counter>,
    pub plugin_calls: Family<PluginCallLabel, Counter>,
    pub plugin_call_seconds: HistogramFamily<PluginHookLabel>,
    pub plugin_breaker_open: Family<PluginLabel, Gauge>,
    pub plugin_breaker_trips: Family<PluginLabel, Counter>,
    pub plugin_loads: Family<PluginOutcomeLabel, Counter>,
    pub plugin_log_dropped: Family<PluginLogLabel, Counter>,
    pub messages: Family<MessageLabel, Counter>,
    pub message_commit_seconds: Histogram,
    pub fanout_frames: Counter,
    pub messages_acked: Counter,
    pub fanout_dropped: Counter,
    pub conversation_sync_seconds: Histogram,
    pub conversations_pruned: Counter,
    pub controls: Counter,
    pub control_acks: Counter,
    pub controls_expired: Counter,
    pub control_refusals: Family<ReasonLabel, Counter>,
    pub cluster_nodes: Gauge,
    pub cluster_fenced: Gauge,
    pub cluster_lease_renewals: Counter,
    pub cluster_lease_failures: Counter,
    pub cluster_reaped_sessions: Counter,
    pub cluster_published: Counter,
    pub cluster_received: Counter,
    pub cluster_dropped_frames: Counter,
    pub cluster_malformed_frames: Counter,
    pub cluster_duplicates: Counter,
    pub cluster_gaps: Family<GapLabel, Counter>,
    pub cluster_filled_messages: Counter,
    pub cluster_resyncs: Counter,
    pub cluster_requests: Family<OutcomeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GapLabel {
    /// `filled` (read from the database) or `skipped`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabel {
    /// `ws` or `api`.
    pub via: String,
    /// `sent`, `duplicate` or an error code.
    pub outcome: String,
}

fn plugin_histogram() -> Histogram {
    // 1 µs .. ~0.5 s
    Histogram::new(exponential_buckets(0.000001, 2.5, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("plugboard");
        let m = Metrics {
            connections_open: Gauge::default(),
            lifecycle_events: Family::default(),
            lifecycle_closes_pending: Gauge::default(),
            handshake_failures: Family::default(),
            frames_received: Family::default(),
            frame_errors: Family::default(),
            outbox_depth: Gauge::default(),
            webhook_attempts: Family::default(),
            webhook_latency_seconds: Family::new_with_constructor(latency_histogram),
            webhook_event_lag_seconds: Family::new_with_constructor(lag_histogram),
            webhook_pending: Family::default(),
            webhook_failed: Family::default(),
            webhook_endpoint_disabled: Family::default(),
            webhook_endpoint_leader: Family::default(),
            webhook_lease_takeovers: Family::default(),
            storage_commit_seconds: latency_histogram(),
            storage_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            storage_queued_writes: Gauge::default(),
            storage_busy: Counter::default(),
            open_latency_seconds: latency_histogram(),
            config_reloads: Family::default(),
            webhook_skipped: Family::default(),
            plugin_calls: Family::default(),
            plugin_call_seconds: Family::new_with_constructor(plugin_histogram),
            plugin_breaker_open: Family::default(),
            plugin_breaker_trips: Family::default(),
            plugin_loads: Family::default(),
            plugin_log_dropped: Family::default(),
            messages: Family::default(),
            message_commit_seconds: latency_histogram(),
            fanout_frames: Counter::default(),
            messages_acked: Counter::default(),
            fanout_dropped: Counter::default(),
            conversation_sync_seconds: latency_histogram(),
            conversations_pruned: Counter::default(),
            controls: Counter::default(),
            control_acks: Counter::default(),
            controls_expired: Counter::default(),
            control_refusals: Family::default(),
            cluster_nodes: Gauge::default(),
            cluster_fenced: Gauge::default(),
            cluster_lease_renewals: Counter::default(),
            cluster_lease_failures: Counter::default(),
            cluster_reaped_sessions: Counter::default(),
            cluster_published: Counter::default(),
            cluster_received: Counter::default(),
            cluster_dropped_frames: Counter::default(),
            cluster_malformed_frames: Counter::default(),
            cluster_duplicates: Counter::default(),
            cluster_gaps: Family::default(),
            cluster_filled_messages: Counter::default(),
            cluster_resyncs: Counter::default(),
            cluster_requests: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections_open",
            "Open client connections",
            m.connections_open.clone(),
        );
        r.register(
            "lifecycle_events",
            "Connection lifecycle events recorded, by event (opened/closed) and reason",
            m.lifecycle_events.clone(),
        );
        r.register(
            "lifecycle_closes_pending",
            "Closes of ended connections waiting for storage to record them",
            m.lifecycle_closes_pending.clone(),
        );
        r.register(
            "handshake_failures",
            "Connection attempts that never opened, by reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "frames_received",
            "Client frames received, by type",
            m.frames_received.clone(),
        );
        r.register(
            "frame_errors",
            "Client frames answered with an error, by reason",
            m.frame_errors.clone(),
        );
        r.register(
            "outbox_depth",
            "Webhook deliveries pending across all endpoints",
            m.outbox_depth.clone(),
        );
        r.register(
            "webhook_attempts",
            "Webhook delivery attempts, by endpoint and outcome",
            m.webhook_attempts.clone(),
        );
        r.register(
            "webhook_latency_seconds",
            "Duration of one webhook request",
            m.webhook_latency_seconds.clone(),
        );
        r.register(
            "webhook_event_lag_seconds",
            "Time from an event's creation to its successful delivery",
            m.webhook_event_lag_seconds.clone(),
        );
        r.register(
            "webhook_pending",
            "Deliveries pending per endpoint",
            m.webhook_pending.clone(),
        );
        r.register(
            "webhook_failed",
            "Deliveries that exhausted their retries, per endpoint",
            m.webhook_failed.clone(),
        );
        r.register(
            "webhook_endpoint_disabled",
            "1 when an endpoint is disabled (by 410, continuous failure or config)",
            m.webhook_endpoint_disabled.clone(),
        );
        r.register(
            "webhook_endpoint_leader",
            "1 while this process holds the endpoint's delivery lease (it alone delivers the endpoint)",
            m.webhook_endpoint_leader.clone(),
        );
        r.register(
            "webhook_lease_takeovers",
            "Times this process took an endpoint's delivery lease",
            m.webhook_lease_takeovers.clone(),
        );
        r.register(
            "storage_commit_seconds",
            "Duration of one storage transaction (a batch of writes)",
            m.storage_commit_seconds.clone(),
        );
        r.register(
            "storage_batch_size",
            "Writes grouped into one transaction",
            m.storage_batch_size.clone(),
        );
        r.register(
            "storage_queued_writes",
            "Writes holding a place in the storage writer's queue, waiting or running (at most storage.max_queued_writes)",
            m.storage_queued_writes.clone(),
        );
        r.register(
            "storage_busy",
            "Writes refused as storage_busy: the writer's queue stayed full for storage.queue_wait",
            m.storage_busy.clone(),
        );
        r.register(
            "connection_open_seconds",
            "Time from upgrade to the durable record of an open connection",
            m.open_latency_seconds.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads, by outcome",
            m.config_reloads.clone(),
        );
        r.register(
            "webhook_skipped",
            "Events a formatter declined for an endpoint",
            m.webhook_skipped.clone(),
        );
        r.register(
            "plugin_calls",
            "Plugin hook calls, by plugin, hook and outcome (ok, error, trap, timeout, memory_limit, malformed, breaker_open, unavailable)",
            m.plugin_calls.clone(),
        );
        r.register(
            "plugin_call_seconds",
            "Duration of one plugin hook call",
            m.plugin_call_seconds.clone(),
        );
        r.register(
            "plugin_breaker_open",
            "1 while a plugin's circuit breaker is open",
            m.plugin_breaker_open.clone(),
        );
        r.register(
            "plugin_breaker_trips",
            "Times a plugin's circuit breaker opened",
            m.plugin_breaker_trips.clone(),
        );
        r.register(
            "plugin_loads",
            "Plugin versions loaded or refused, by plugin and outcome",
            m.plugin_loads.clone(),
        );
        r.register(
            "plugin_log_dropped",
            "Parts of plugin log lines dropped to stay within the log limits, by plugin and part (line: a whole line past the per-call limit; field: a field past the per-line limit; truncated: a line whose message, field name or value was cut)",
            m.plugin_log_dropped.clone(),
        );
        r.register(
            "messages",
            "Messages sent, by way in (ws, api) and outcome (sent, duplicate, or the error code)",
            m.messages.clone(),
        );
        r.register(
            "message_commit_seconds",
            "Time from a send request to its durable commit",
            m.message_commit_seconds.clone(),
        );
        r.register(
            "fanout_frames",
            "Message frames queued to live connections",
            m.fanout_frames.clone(),
        );
        r.register(
            "messages_acked",
            "Message acknowledgements received from clients",
            m.messages_acked.clone(),
        );
        r.register(
            "fanout_dropped",
            "Message frames not queued because the connection was slow or gone (caught up by sync)",
            m.fanout_dropped.clone(),
        );
        r.register(
            "conversation_sync_seconds",
            "Time to answer one conversation-list page, filter chain included",
            m.conversation_sync_seconds.clone(),
        );
        r.register(
            "conversations_pruned",
            "Deleted conversation tombstones pruned after their retention",
            m.conversations_pruned.clone(),
        );
        r.register("controls", "Control requests accepted", m.controls.clone());
        r.register(
            "control_acks",
            "Control receipts recorded",
            m.control_acks.clone(),
        );
        r.register(
            "controls_expired",
            "Persisted control targets expired undelivered",
            m.controls_expired.clone(),
        );
        r.register(
            "control_refusals",
            "Control requests refused, by reason (rate_limited, bad_signature, replayed, rejected, …)",
            m.control_refusals.clone(),
        );
        r.register(
            "cluster_nodes",
            "Cluster mode: nodes with a live lease, this one included (0 on a single node)",
            m.cluster_nodes.clone(),
        );
        r.register(
            "cluster_fenced",
            "Cluster mode: 1 while this node refuses connections because it could not renew its lease",
            m.cluster_fenced.clone(),
        );
        r.register(
            "cluster_lease_renewals",
            "Cluster mode: renewals of this node's lease the database took",
            m.cluster_lease_renewals.clone(),
        );
        r.register(
            "cluster_lease_failures",
            "Cluster mode: renewals of this node's lease that failed or timed out",
            m.cluster_lease_failures.clone(),
        );
        r.register(
            "cluster_reaped_sessions",
            "Cluster mode: connections of nodes whose lease lapsed, closed by this node",
            m.cluster_reaped_sessions.clone(),
        );
        r.register(
            "cluster_published",
            "Cluster mode: frames this node published on the fan-out subject (messages and beats)",
            m.cluster_published.clone(),
        );
        r.register(
            "cluster_received",
            "Cluster mode: messages committed by other nodes received over NATS",
            m.cluster_received.clone(),
        );
        r.register(
            "cluster_dropped_frames",
            "Cluster mode: frames not published because NATS was unreachable (receivers read them back)",
            m.cluster_dropped_frames.clone(),
        );
        r.register(
            "cluster_malformed_frames",
            "Cluster mode: frames or requests from NATS that did not parse (dropped)",
            m.cluster_malformed_frames.clone(),
        );
        r.register(
            "cluster_duplicates",
            "Cluster mode: messages that reached this node's sequencer twice (dropped the second time)",
            m.cluster_duplicates.clone(),
        );
        r.register(
            "cluster_gaps",
            "Cluster mode: gaps in a channel's seq, by outcome (filled from the database, or skipped)",
            m.cluster_gaps.clone(),
        );
        r.register(
            "cluster_filled_messages",
            "Cluster mode: messages read from the database to fill gaps in routing",
            m.cluster_filled_messages.clone(),
        );
        r.register(
            "cluster_resyncs",
            "Cluster mode: comparisons of every known channel with the database after missed frames or a NATS reconnect",
            m.cluster_resyncs.clone(),
        );
        r.register(
            "cluster_requests",
            "Cluster mode: requests to other nodes, by outcome (ok, timeout, no_responders, malformed, error)",
            m.cluster_requests.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Every metric, in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        match format {
            Format::OpenMetrics => out,
            Format::Text004 => to_text_004(&out),
        }
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn lifecycle(&self, event: &str, reason: &str) {
        self.lifecycle_events
            .get_or_create(&LifecycleLabel {
                event: event.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn message(&self, via: &str, outcome: &str) {
        self.messages
            .get_or_create(&MessageLabel {
                via: via.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn frame_error(&self, reason: &str) {
        self.frame_errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// The exposition formats of `GET /metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text004,
}

impl Format {
    /// The format an `Accept` header prefers, as Prometheus negotiates:
    /// OpenMetrics when it is accepted (version 1.0.0 or none named) with a
    /// quality at least that of the text format, else text 0.0.4 (also
    /// without an `Accept` header).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text004;
        };
        let mut openmetrics = 0.0f32;
        let mut text = 0.0f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut version = None;
            for param in parts {
                match param.split_once('=') {
                    Some((k, v)) if k.trim().eq_ignore_ascii_case("q") => {
                        q = v.trim().parse().unwrap_or(0.0);
                    }
                    Some((k, v)) if k.trim().eq_ignore_ascii_case("version") => {
                        version = Some(v.trim().to_string());
                    }
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text"
                    if version.as_deref().is_none_or(|v| v == "1.0.0") =>
                {
                    openmetrics = openmetrics.max(q);
                }
                "text/plain" if version.as_deref().is_none_or(|v| v == "0.0.4") => {
                    text = text.max(q);
                }
                "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4:
/// a counter family takes the name of its `_total` samples in `# HELP` and
/// `# TYPE`, and `# EOF` is dropped. Sample lines are the same in both.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // `# HELP` comes before its `# TYPE`, which says whether to rename.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map(|(_, t)| t).unwrap_or_default();
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_choose_the_format() {
        use Format::*;
        let cases = [
            (None, Text004),
            (Some("*/*"), Text004),
            (Some("text/plain"), Text004),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                OpenMetrics,
            ),
            // What Prometheus sends.
            (
                Some("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
                OpenMetrics,
            ),
            (Some("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"), Text004),
            (Some("application/openmetrics-text;version=2.0.0"), Text004),
            (Some("application/openmetrics-text;q=0"), Text004),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn text_004_names_counter_families_as_their_samples() {
        let m = Metrics::new();
        m.controls.inc();
        m.message("api", "sent");
        m.storage_batch_size.observe(3.0);
        let text = m.render(Format::Text004);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains("# TYPE plugboard_controls_total counter\n"));
        assert!(text.contains("# HELP plugboard_controls_total Control requests accepted.\n"));
        assert!(text.contains("plugboard_controls_total 1\n"));
        assert!(text.contains("plugboard_messages_total{via=\"api\",outcome=\"sent\"} 1\n"));
        assert!(text.contains("# TYPE plugboard_connections_open gauge\n"));
        assert!(text.contains("# TYPE plugboard_storage_batch_size histogram\n"));
        let om = m.render(Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE plugboard_controls counter\n"));
        // The conversion relies on the registry using no exemplars or units.
        assert!(!om.contains(" # {") && !om.contains("# UNIT"));
    }
}
