//! Build log lines to Kafka, as the Akkeris log consumers expect them: one message per line
//! on `KAFKA_TOPIC`, value `{"metadata":"{app}-{space}","build":n,"job":"n","message":line}`.
//!
//! One producer per broker list, shared by every build that names it. `write_line` only
//! enqueues (never blocks: a full queue counts the line as undelivered); `finish` waits a
//! bounded time for deliveries and then logs one warning with what did not arrive. A broker
//! that is down therefore costs a build at most that wait, never its success.

use super::Sink;
use crate::build::BuildSpec;
use futures::future::BoxFuture;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Distinct broker lists with a live producer. Each producer holds threads and sockets, and
/// the broker list comes from requests, so the cache is bounded.
const MAX_PRODUCERS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("kafka_hosts names no broker")]
    NoBrokers,
    #[error("more than {MAX_PRODUCERS} distinct kafka_hosts lists are in use; not opening another producer")]
    TooManyProducers,
    #[error("cannot create a Kafka producer for {brokers}: {source}")]
    Create {
        brokers: String,
        #[source]
        source: KafkaError,
    },
}

/// One Kafka message value. Field order is part of the contract (serde keeps it).
#[derive(Serialize)]
struct LogMessage<'a> {
    metadata: &'a str,
    build: u64,
    job: &'a str,
    message: &'a str,
}

/// The message value for one line of a build's log.
pub fn message_json(metadata: &str, build_number: u64, job: &str, line: &str) -> String {
    let msg = LogMessage {
        metadata,
        build: build_number,
        job,
        message: line,
    };
    // Serializing strings and an integer cannot fail; fall back to an empty object anyway.
    serde_json::to_string(&msg).unwrap_or_else(|_| "{}".into())
}

/// The cache key of a broker list: order, spaces and repeats do not make a new producer.
pub fn broker_key(kafka_hosts: &str) -> Option<String> {
    let mut hosts: Vec<&str> = kafka_hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    (!hosts.is_empty()).then(|| hosts.join(","))
}

/// Deliveries of one build, counted by the producer's delivery callback.
#[derive(Default, Debug)]
pub struct Tally {
    delivered: AtomicU64,
    failed: AtomicU64,
}

/// Routes librdkafka's own logs and errors to `tracing` at debug level: a broker that is
/// down would otherwise print a line per reconnect attempt. Builds report once, in `finish`.
pub struct ShuttleContext;

impl ClientContext for ShuttleContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(?level, facility = fac, "librdkafka: {log_message}");
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, "librdkafka: {reason}");
    }
}

impl ProducerContext for ShuttleContext {
    type DeliveryOpaque = Arc<Tally>;
    fn delivery(&self, result: &DeliveryResult<'_>, tally: Arc<Tally>) {
        let counter = if result.is_ok() {
            &tally.delivered
        } else {
            &tally.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

type ShuttleProducer = ThreadedProducer<ShuttleContext>;

/// The shared producers, one per broker list, created on first use.
pub struct KafkaProducers {
    topic: String,
    delivery_timeout: Duration,
    /// Each with when a build last asked for it.
    producers: Mutex<HashMap<String, (Arc<ShuttleProducer>, Instant)>>,
}

impl KafkaProducers {
    pub fn new(topic: impl Into<String>, delivery_timeout: Duration) -> Self {
        Self {
            topic: topic.into(),
            delivery_timeout,
            producers: Mutex::new(HashMap::new()),
        }
    }

    /// How many producers are cached (for tests and metrics).
    pub fn len(&self) -> usize {
        self.producers.lock().map(|p| p.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The producer for `kafka_hosts`, reused when one exists and is still usable.
    fn producer(&self, kafka_hosts: &str) -> Result<Arc<ShuttleProducer>, KafkaSinkError> {
        let key = broker_key(kafka_hosts).ok_or(KafkaSinkError::NoBrokers)?;
        // A poisoned lock only means another build panicked mid-insert; the map is still valid.
        let mut producers = self.producers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, used)) = producers.get_mut(&key) {
            // An idempotent producer that hit a fatal error never recovers: replace it.
            match p.client().fatal_error() {
                None => {
                    *used = Instant::now();
                    return Ok(p.clone());
                }
                Some((code, reason)) => {
                    tracing::warn!(brokers = %key, ?code, reason, "Kafka producer failed fatally; creating a new one");
                    producers.remove(&key);
                }
            }
        }
        if producers.len() >= MAX_PRODUCERS {
            // Make room by closing the least recently used producer no build holds (its
            // builds flushed their lines when they ended).
            let idle = producers
                .iter()
                .filter(|(_, (p, _))| Arc::strong_count(p) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            let Some((evicted, _)) = idle.and_then(|k| producers.remove(&k)) else {
                return Err(KafkaSinkError::TooManyProducers);
            };
            // Closing a producer joins its thread: not on the caller's (async) thread.
            std::thread::spawn(move || drop(evicted));
        }
        let producer: ShuttleProducer = producer_config(&key)
            .create_with_context(ShuttleContext)
            .map_err(|source| KafkaSinkError::Create {
            brokers: key.clone(),
            source,
        })?;
        let producer = Arc::new(producer);
        producers.insert(key, (producer.clone(), Instant::now()));
        Ok(producer)
    }

    /// The Kafka sink of one build, or an error saying why it has none.
    pub fn sink(&self, spec: &BuildSpec, kafka_hosts: &str) -> Result<KafkaSink, KafkaSinkError> {
        Ok(KafkaSink {
            producer: self.producer(kafka_hosts)?,
            topic: self.topic.clone(),
            key: format!("{}-{}", spec.app_key(), spec.build_number),
            metadata: format!("{}-{}", spec.app, spec.space),
            build_number: spec.build_number,
            job: spec.build_number.to_string(),
            tally: Arc::new(Tally::default()),
            enqueued: 0,
            rejected: 0,
            delivery_timeout: self.delivery_timeout,
        })
    }
}

/// Settings chosen for delivery: the idempotent producer (acks from all in-sync replicas,
/// retries without duplicates or reordering), batched with a short linger, and a bounded
/// local queue so a dead broker cannot eat the service's memory.
fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "buildshuttle")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "200000")
        .set("queue.buffering.max.kbytes", "65536")
        // Lines still queued after this are dropped by librdkafka (and counted as failed).
        .set("message.timeout.ms", "120000")
        .set("socket.connection.setup.timeout.ms", "10000");
    c
}

/// One build's Kafka output.
pub struct KafkaSink {
    producer: Arc<ShuttleProducer>,
    topic: String,
    /// Partition key: every line of one build goes to one partition, hence stays in order.
    key: String,
    metadata: String,
    build_number: u64,
    job: String,
    tally: Arc<Tally>,
    enqueued: u64,
    rejected: u64,
    delivery_timeout: Duration,
}

impl Sink for KafkaSink {
    fn write_line(&mut self, line: &str) {
        let payload = message_json(&self.metadata, self.build_number, &self.job, line);
        let record = BaseRecord::with_opaque_to(&self.topic, self.tally.clone())
            .key(&self.key)
            .payload(&payload);
        // Non-blocking: librdkafka queues the message or refuses at once (queue full).
        match self.producer.send(record) {
            Ok(()) => self.enqueued += 1,
            Err(_) => self.rejected += 1,
        }
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + self.delivery_timeout;
            loop {
                let settled = self.tally.delivered.load(Ordering::Relaxed)
                    + self.tally.failed.load(Ordering::Relaxed);
                if settled >= self.enqueued || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let delivered = self.tally.delivered.load(Ordering::Relaxed);
            let total = self.enqueued + self.rejected;
            let undelivered = total.saturating_sub(delivered);
            if undelivered > 0 {
                tracing::warn!(
                    build = %self.key,
                    topic = %self.topic,
                    undelivered,
                    total,
                    wait_ms = self.delivery_timeout.as_millis() as u64,
                    "build log lines not delivered to Kafka (broker down or unreachable?); the build itself is unaffected"
                );
            } else {
                tracing::debug!(build = %self.key, lines = total, "build log delivered to Kafka");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_value_is_the_legacy_shape_in_field_order() {
        assert_eq!(
            message_json("myapp-default", 12, "12", "Step 1/2 : FROM x"),
            r#"{"metadata":"myapp-default","build":12,"job":"12","message":"Step 1/2 : FROM x"}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&message_json("a-b", 1, "1", "quote \" and \\ and \t")).unwrap();
        assert_eq!(v["message"], "quote \" and \\ and \t");
    }

    #[test]
    fn broker_lists_key_by_set_of_hosts() {
        assert_eq!(
            broker_key("h2:9092, h1:9092,,h1:9092").as_deref(),
            Some("h1:9092,h2:9092")
        );
        assert_eq!(
            broker_key("h1:9092,h2:9092"),
            broker_key(" h2:9092 ,h1:9092")
        );
        assert_ne!(broker_key("h1:9092"), broker_key("h1:9093"));
        assert_eq!(broker_key(" , "), None);
    }

    #[test]
    fn one_producer_per_broker_list() {
        // Creating a producer connects lazily, so closed loopback ports are fine here.
        let producers = KafkaProducers::new("t", Duration::from_millis(10));
        let a = producers.producer("127.0.0.1:1,127.0.0.1:2").unwrap();
        let b = producers.producer("127.0.0.1:2, 127.0.0.1:1").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = producers.producer("127.0.0.1:3").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(producers.len(), 2);
        assert!(matches!(
            producers.producer(","),
            Err(KafkaSinkError::NoBrokers)
        ));
    }

    #[test]
    fn the_cache_is_bounded_and_makes_room_by_closing_an_idle_producer() {
        let producers = KafkaProducers::new("t", Duration::from_millis(10));
        let mut held: Vec<_> = (1..=MAX_PRODUCERS)
            .map(|port| producers.producer(&format!("127.0.0.1:{port}")).unwrap())
            .collect();
        assert!(matches!(
            producers.producer("127.0.0.1:9999"),
            Err(KafkaSinkError::TooManyProducers)
        ));
        // A known list is still served.
        assert!(producers.producer("127.0.0.1:1").is_ok());
        // Once no build holds :2, a new list takes its place.
        drop(held.remove(1));
        assert!(producers.producer("127.0.0.1:9999").is_ok());
        assert_eq!(producers.len(), MAX_PRODUCERS);
        let again = producers.producer("127.0.0.1:1").unwrap();
        assert!(Arc::ptr_eq(&again, &held[0]), "a held producer is kept");
    }
}
