//! The server's Prometheus metrics (prometheus-client 0.26; `gpo_` prefix, base units,
//! bounded labels). [`registry`] is the one place they are registered, so the process-wide
//! registry of `gpo-ops` can later take them in one call.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A route and a stage (`embed`, `forward`, or `total`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStage {
    /// `predict`, `rerank`, `groups`.
    pub route: &'static str,
    /// `embed`, `forward`, `total`.
    pub stage: &'static str,
}

/// A route and the outcome of a request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteCode {
    /// `predict`, `rerank`, `groups`.
    pub route: &'static str,
    /// `ok`, `invalid`, `not_found`, `busy`, `deadline`, `internal`.
    pub code: &'static str,
}

/// A batching stage.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stage {
    /// `embed` or `forward`.
    pub stage: &'static str,
}

/// Where a cache lookup was answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Tier {
    /// `memory` (the LRU) or `store` (the embedding store on disk).
    pub tier: &'static str,
}

/// A refused request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    /// `predict`, `rerank`, `groups`.
    pub route: &'static str,
    /// `busy` (limits reached) or `deadline` (timed out while waiting).
    pub reason: &'static str,
}

/// Every metric of the server.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `gpo_serve_request_duration_seconds{route,stage}`.
    pub duration: Family<RouteStage, Histogram, fn() -> Histogram>,
    /// `gpo_serve_requests_total{route,code}`.
    pub requests: Family<RouteCode, Counter>,
    /// `gpo_serve_batch_requests{stage}`: requests per batch.
    pub batch_requests: Family<Stage, Histogram, fn() -> Histogram>,
    /// `gpo_serve_batch_items{stage}`: texts (embed) or points (forward) per batch.
    pub batch_items: Family<Stage, Histogram, fn() -> Histogram>,
    /// `gpo_serve_embedding_cache_hits_total{tier}`.
    pub cache_hits: Family<Tier, Counter>,
    /// `gpo_serve_embedding_cache_misses_total`: texts the embedder had to embed.
    pub cache_misses: Counter,
    /// `gpo_serve_context_cache_hits_total`: inline contexts found already embedded.
    pub context_hits: Counter,
    /// `gpo_serve_context_cache_misses_total`: inline contexts embedded anew.
    pub context_misses: Counter,
    /// `gpo_serve_refusals_total{route,reason}`.
    pub refusals: Family<Refused, Counter>,
    /// `gpo_serve_in_flight_requests`.
    pub in_flight: Gauge,
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn counts() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Fresh metrics.
    pub fn new() -> Self {
        Metrics {
            duration: Family::new_with_constructor(seconds),
            requests: Family::default(),
            batch_requests: Family::new_with_constructor(counts),
            batch_items: Family::new_with_constructor(counts),
            cache_hits: Family::default(),
            cache_misses: Counter::default(),
            context_hits: Counter::default(),
            context_misses: Counter::default(),
            refusals: Family::default(),
            in_flight: Gauge::default(),
        }
    }
}

/// Registers `m` under the `gpo_serve` prefix in `r`.
pub fn register(r: &mut Registry, m: &Metrics) {
    let r = r.sub_registry_with_prefix("gpo_serve");
    r.register_with_unit(
        "request_duration",
        "Request duration by route and stage (embed, forward, total)",
        prometheus_client::registry::Unit::Seconds,
        m.duration.clone(),
    );
    r.register(
        "requests",
        "Requests by route and outcome",
        m.requests.clone(),
    );
    r.register(
        "batch_requests",
        "Requests per batch, by stage",
        m.batch_requests.clone(),
    );
    r.register(
        "batch_items",
        "Texts (embed) or points (forward) per batch",
        m.batch_items.clone(),
    );
    r.register(
        "embedding_cache_hits",
        "Embeddings found in the memory LRU or the embedding store",
        m.cache_hits.clone(),
    );
    r.register(
        "embedding_cache_misses",
        "Texts that had to be embedded",
        m.cache_misses.clone(),
    );
    r.register(
        "context_cache_hits",
        "Inline contexts found in the context LRU (vectors and encoding reused)",
        m.context_hits.clone(),
    );
    r.register(
        "context_cache_misses",
        "Inline contexts embedded anew",
        m.context_misses.clone(),
    );
    r.register(
        "refusals",
        "Requests refused by admission control",
        m.refusals.clone(),
    );
    r.register(
        "in_flight_requests",
        "Requests running or waiting",
        m.in_flight.clone(),
    );
}

/// A registry holding the server's metrics (the one function `gpo-ops` needs to fold in).
pub fn registry(m: &Metrics) -> Registry {
    let mut r = Registry::default();
    register(&mut r, m);
    r
}

/// The registry in Prometheus' text format.
pub fn encode(r: &Registry) -> String {
    let mut s = String::new();
    if prometheus_client::encoding::text::encode(&mut s, r).is_err() {
        s.clear();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_units() {
        let m = Metrics::new();
        m.duration
            .get_or_create(&RouteStage {
                route: "predict",
                stage: "forward",
            })
            .observe(0.01);
        m.cache_misses.inc();
        let text = encode(&registry(&m));
        assert!(
            text.contains("gpo_serve_request_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(
            text.contains("route=\"predict\",stage=\"forward\""),
            "{text}"
        );
        assert!(
            text.contains("gpo_serve_embedding_cache_misses_total 1"),
            "{text}"
        );
    }
}
