//! Reading build log messages back from Kafka with a real consumer.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use serde_json::Value;
use std::time::{Duration, Instant};

fn is_finished(value: &str) -> bool {
    serde_json::from_str::<Value>(value).is_ok_and(|v| v["message"] == "Build finished")
}

/// Reads `topic` from the start until a message keyed `key` says `Build finished`; returns
/// that build's messages (key, value) in order.
pub fn consume_build(bootstrap: String, topic: String, key: String) -> Vec<(String, String)> {
    let within = Duration::from_secs(60);
    let got = consume_until_quiet(bootstrap, topic, key.clone(), Duration::ZERO, within);
    assert!(
        got.iter().any(|(_, v)| is_finished(v)),
        "no `Build finished` message for {key} within 60 s; got {got:?}"
    );
    got
}

/// Reads `topic` from the start for the messages keyed `key` (key, value), in order, until
/// `quiet` has passed without one after a `Build finished` (so an extra end would be seen),
/// or `within` has passed.
pub fn consume_until_quiet(
    bootstrap: String,
    topic: String,
    key: String,
    quiet: Duration,
    within: Duration,
) -> Vec<(String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let start = Instant::now();
    let mut last = Instant::now();
    let mut got: Vec<(String, String)> = Vec::new();
    while start.elapsed() < within {
        if got.iter().any(|(_, v)| is_finished(v)) && last.elapsed() >= quiet {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.expect("consume");
        let k = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        if k != key {
            continue;
        }
        let v = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
        got.push((k, v));
        last = Instant::now();
    }
    got
}
