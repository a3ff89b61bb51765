//! What the bus takes in and keeps, in bytes: the bytes `nats-server` received from its
//! clients (`in_bytes` of `/varz` on its monitoring port) and the bytes each JetStream
//! stream holds (stream info). Read before and after a series of pushes, they say what
//! one push writes to the bus and how much the store grows by it.

use std::collections::BTreeMap;

use confcast_schemas::subject;
use futures::TryStreamExt;

use crate::bus::block_on;
use crate::net::get_monitoring;

/// Bytes the server has received from clients so far (`/varz` `in_bytes`), read on its
/// monitoring port (`nats-server -m <port>`).
pub fn in_bytes(monitor_port: u16) -> u64 {
    let (status, body) = get_monitoring(monitor_port, "/varz").expect("nats-server answers on its monitoring port");
    assert_eq!(status, 200, "/varz: {body}");
    let varz: serde_json::Value = serde_json::from_str(&body).expect("/varz is JSON");
    varz["in_bytes"].as_u64().expect("/varz has in_bytes")
}

/// Every JetStream stream of the server (object stores and K/V buckets included, as
/// `OBJ_…` and `KV_…`) and the bytes it holds.
pub fn stream_bytes(nats_url: &str) -> BTreeMap<String, u64> {
    block_on(async {
        let client = async_nats::connect(nats_url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.streams().map_ok(|info| (info.config.name, info.state.bytes)).try_collect().await.expect("stream list")
    })
}

/// Bytes held by every stream but those all datacenters share (the commit stream and
/// the index bucket): with one datacenter on the server, that datacenter's store —
/// its updates, state, status and blob streams, and whatever other stream it has.
pub fn datacenter_bytes(nats_url: &str) -> u64 {
    let shared = [subject::COMMITS_STREAM.to_owned(), format!("KV_{}", subject::INDEX_BUCKET)];
    stream_bytes(nats_url).into_iter().filter(|(name, _)| !shared.contains(name)).map(|(_, bytes)| bytes).sum()
}
