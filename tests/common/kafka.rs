//! Reading build log messages back from Kafka with a real consumer.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Reads `topic` from the start until a message keyed `key` says `Build finished`; returns
/// that build's messages (key, value) in order.
pub fn consume_build(bootstrap: String, topic: String, key: String) -> Vec<(String, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let start = Instant::now();
    let mut got = Vec::new();
    while start.elapsed() < Duration::from_secs(60) {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.expect("consume");
        let k = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        if k != key {
            continue;
        }
        let v = String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned();
        let done = serde_json::from_str::<Value>(&v).unwrap()["message"] == "Build finished";
        got.push((k, v));
        if done {
            return got;
        }
    }
    panic!("no `Build finished` message for {key} within 60 s; got {got:?}");
}
