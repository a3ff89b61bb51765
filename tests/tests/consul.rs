// Over 500 lines: one contract (the index in Consul) from the double's fidelity to the real relay, read top to bottom.
//! The configuration index in Consul: the Consul double's fidelity to Consul's
//! documented API, the relay's Consul client against it, and the real relay keeping the
//! index there (`relay --consul`) with a real nats-server and real `git push`.

use std::time::{Duration, Instant};

use confcast_relay::consul::{Client, ConsulError, Token, TxnOp, TxnOutcome, MAX_VALUE_BYTES};
use confcast_tests::consul::ConsulDouble;
use confcast_tests::{wait_for, Master, NatsServer, Relay, Subscriber};
use serde_json::{json, Value};

// ---- the double, over raw HTTP

struct Answer {
    status: u16,
    index: Option<u64>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn call(method: reqwest::Method, url: String, body: Vec<u8>, token: Option<&str>) -> Answer {
    let mut request = reqwest::Client::new().request(method, url).body(body);
    if let Some(token) = token {
        request = request.header("X-Consul-Token", token);
    }
    let response = request.send().await.expect("the double answers");
    let status = response.status().as_u16();
    let index = response.headers().get("X-Consul-Index").map(|v| v.to_str().expect("ascii").parse().expect("number"));
    Answer { status, index, body: response.bytes().await.expect("body").to_vec() }
}

async fn get(consul: &ConsulDouble, path_and_query: &str) -> Answer {
    call(reqwest::Method::GET, format!("{}{path_and_query}", consul.url()), Vec::new(), None).await
}

async fn put(consul: &ConsulDouble, path_and_query: &str, body: impl Into<Vec<u8>>) -> Answer {
    call(reqwest::Method::PUT, format!("{}{path_and_query}", consul.url()), body.into(), None).await
}

async fn delete(consul: &ConsulDouble, path_and_query: &str) -> Answer {
    call(reqwest::Method::DELETE, format!("{}{path_and_query}", consul.url()), Vec::new(), None).await
}

#[tokio::test]
async fn the_double_keeps_consul_indexes_and_answers_like_consul() {
    let consul = ConsulDouble::start();
    let empty = get(&consul, "/v1/kv/app/a").await;
    assert_eq!((empty.status, empty.index), (404, Some(1)), "404 for a missing key, index never 0");

    assert_eq!(put(&consul, "/v1/kv/app/a", "one").await.text(), "true");
    assert_eq!(put(&consul, "/v1/kv/app/sub/b?flags=42", "two").await.text(), "true");
    let a = get(&consul, "/v1/kv/app/a").await;
    assert_eq!(a.status, 200);
    let entry = &a.json()[0];
    assert_eq!(entry["Key"], "app/a");
    assert_eq!(entry["Value"], "b25l", "base64 of the value");
    assert_eq!((entry["CreateIndex"].as_u64(), entry["ModifyIndex"].as_u64()), (Some(1), Some(1)));
    assert_eq!(a.index, Some(2), "a single key answers with the K/V table's index");
    let b = get(&consul, "/v1/kv/app/sub/b").await.json();
    assert_eq!((b[0]["Flags"].as_u64(), b[0]["ModifyIndex"].as_u64()), (Some(42), Some(2)));

    // Every write moves the index forward; a write that changes nothing keeps ModifyIndex.
    put(&consul, "/v1/kv/app/a", "one").await;
    assert_eq!(get(&consul, "/v1/kv/app/a").await.json()[0]["ModifyIndex"], 1);
    put(&consul, "/v1/kv/app/a", "uno").await;
    let a = get(&consul, "/v1/kv/app/a").await;
    assert_eq!(
        (a.json()[0]["CreateIndex"].as_u64(), a.json()[0]["ModifyIndex"].as_u64(), a.index),
        (Some(1), Some(4), Some(4))
    );
    assert_eq!(consul.index(), 4);

    let raw = get(&consul, "/v1/kv/app/a?raw").await;
    assert_eq!((raw.status, raw.body.as_slice(), raw.index), (200, b"uno".as_slice(), Some(4)));
    let missing_raw = get(&consul, "/v1/kv/nope?raw").await;
    assert_eq!((missing_raw.status, missing_raw.index), (404, Some(4)));

    // Prefixes: the index is the last change under the prefix.
    put(&consul, "/v1/kv/other/x", "x").await;
    let tree = get(&consul, "/v1/kv/app/?recurse").await;
    assert_eq!(tree.json().as_array().map(Vec::len), Some(2));
    assert_eq!(tree.index, Some(4), "a write elsewhere does not move the prefix's index");
    assert_eq!(get(&consul, "/v1/kv/app/?keys").await.json(), json!(["app/a", "app/sub/b"]));
    assert_eq!(get(&consul, "/v1/kv/app/?keys&separator=/").await.json(), json!(["app/a", "app/sub/"]));
    assert_eq!(get(&consul, "/v1/kv/?keys&separator=/").await.json(), json!(["app/", "other/"]));
    let none = get(&consul, "/v1/kv/zzz/?recurse").await;
    assert_eq!((none.status, none.index), (404, Some(5)), "an empty prefix: 404 with the table's index");
    assert_eq!(get(&consul, "/v1/kv/zzz/?keys").await.status, 404);

    // Deletion leaves a tombstone: the prefix's index moves.
    assert_eq!(delete(&consul, "/v1/kv/app/sub/b").await.text(), "true");
    assert_eq!(get(&consul, "/v1/kv/app/?recurse").await.index, Some(6));
    assert_eq!(get(&consul, "/v1/kv/app/sub/b").await.status, 404);
    assert_eq!(delete(&consul, "/v1/kv/app/sub/b").await.text(), "true", "deleting a missing key is fine");
    assert_eq!(delete(&consul, "/v1/kv/?recurse").await.text(), "true");
    assert!(consul.tree("").is_empty());
    assert_eq!(get(&consul, "/v1/kv/").await.status, 400, "a key name is needed without ?recurse");
}

#[tokio::test]
async fn the_double_checks_and_sets_like_consul() {
    let consul = ConsulDouble::start();
    assert_eq!(put(&consul, "/v1/kv/k?cas=0", "first").await.text(), "true", "cas=0 creates");
    assert_eq!(put(&consul, "/v1/kv/k?cas=0", "second").await.text(), "false", "cas=0 only creates");
    assert_eq!(put(&consul, "/v1/kv/new?cas=7", "x").await.text(), "false", "cas=N needs the key");
    let index = get(&consul, "/v1/kv/k").await.json()[0]["ModifyIndex"].as_u64().expect("index");
    assert_eq!(put(&consul, &format!("/v1/kv/k?cas={}", index + 100), "stale").await.text(), "false");
    assert_eq!(consul.text("k").as_deref(), Some("first"));
    assert_eq!(put(&consul, &format!("/v1/kv/k?cas={index}"), "second").await.text(), "true");
    assert_eq!(delete(&consul, &format!("/v1/kv/k?cas={index}")).await.text(), "false", "stale delete");
    let index = get(&consul, "/v1/kv/k").await.json()[0]["ModifyIndex"].as_u64().expect("index");
    assert_eq!(delete(&consul, &format!("/v1/kv/k?cas={index}")).await.text(), "true");
    assert_eq!(consul.value("k"), None);
    assert_eq!(delete(&consul, "/v1/kv/k?recurse&cas=1").await.status, 400, "recurse and cas conflict");
    assert_eq!(put(&consul, "/v1/kv/k?cas=abc", "x").await.status, 400);
}

#[tokio::test]
async fn the_doubles_blocking_queries_wake_on_writes_and_time_out() {
    let consul = ConsulDouble::start();
    put(&consul, "/v1/kv/watched", "v1").await;
    let index = get(&consul, "/v1/kv/watched").await.index.expect("index");

    // Index 0, or an index already passed: at once.
    let started = Instant::now();
    assert_eq!(get(&consul, "/v1/kv/watched?index=0&wait=5s").await.status, 200);
    assert_eq!(get(&consul, &format!("/v1/kv/watched?index={}&wait=5s", index - 1)).await.status, 200);
    assert!(started.elapsed() < Duration::from_secs(1));

    // Nothing happens: the answer comes after `wait`, index unchanged.
    let started = Instant::now();
    let quiet = get(&consul, &format!("/v1/kv/watched?index={index}&wait=400ms")).await;
    assert!(started.elapsed() >= Duration::from_millis(400), "waited {:?}", started.elapsed());
    assert_eq!(quiet.index, Some(index));

    // Another key changes: a single-key query keeps waiting.
    let url = consul.url();
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let answer =
            call(reqwest::Method::GET, format!("{url}/v1/kv/watched?index={index}&wait=20s"), Vec::new(), None).await;
        (answer, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(&consul, "/v1/kv/elsewhere", "x").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "woken by a write to another key");
    put(&consul, "/v1/kv/watched", "v2").await;
    let (answer, took) = waiter.await.expect("waiter");
    assert!(took < Duration::from_secs(5), "woke up after {took:?}");
    assert_eq!(answer.json()[0]["Value"], "djI=");
    assert!(answer.index.expect("index") > index);

    // A prefix query wakes on a deletion under the prefix.
    put(&consul, "/v1/kv/dir/a", "a").await;
    let tree = get(&consul, "/v1/kv/dir/?recurse").await.index.expect("index");
    let url = consul.url();
    let waiter = tokio::spawn(async move {
        call(reqwest::Method::GET, format!("{url}/v1/kv/dir/?recurse&index={tree}&wait=20s"), Vec::new(), None).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    delete(&consul, "/v1/kv/dir/a").await;
    let answer = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woke up").expect("waiter");
    assert_eq!((answer.status, answer.index.map(|i| i > tree)), (404, Some(true)));
    assert_eq!(get(&consul, "/v1/kv/watched?index=1&wait=10").await.status, 400, "a wait needs a unit");
}

fn txn_op(verb: &str, key: &str, value: Option<&[u8]>, index: Option<u64>) -> Value {
    use base64::Engine as _;
    let mut kv = json!({ "Verb": verb, "Key": key });
    if let Some(value) = value {
        kv["Value"] = json!(base64::engine::general_purpose::STANDARD.encode(value));
    }
    if let Some(index) = index {
        kv["Index"] = json!(index);
    }
    json!({ "KV": kv })
}

#[tokio::test]
async fn the_doubles_transactions_are_all_or_nothing_within_consuls_limits() {
    let consul = ConsulDouble::start();
    put(&consul, "/v1/kv/t/b", "b").await;
    let b = get(&consul, "/v1/kv/t/b").await.json()[0]["ModifyIndex"].as_u64().expect("index");
    let before = consul.index();

    // One operation fails: 409, Consul's errors, nothing applied.
    let ops = json!([
        txn_op("set", "t/a", Some(b"a"), None),
        txn_op("cas", "t/b", Some(b"b2"), Some(b + 50)),
        txn_op("delete-cas", "t/b", None, Some(b + 50)),
        txn_op("get", "t/missing", None, None),
    ]);
    let rolled = put(&consul, "/v1/txn", ops.to_string()).await;
    assert_eq!(rolled.status, 409);
    assert_eq!(
        rolled.json(),
        json!({ "Results": null, "Errors": [
            { "OpIndex": 1, "What": "failed to set key \"t/b\", index is stale" },
            { "OpIndex": 2, "What": "failed to delete key \"t/b\", index is stale" },
            { "OpIndex": 3, "What": "key \"t/missing\" doesn't exist" },
        ] })
    );
    assert_eq!(consul.value("t/a"), None, "rolled back");
    assert_eq!(consul.text("t/b").as_deref(), Some("b"));
    assert_eq!(consul.index(), before + 1, "it went through raft all the same");

    // All succeed: one index for all of them, one result per operation but deletes.
    let ops = json!([
        txn_op("set", "t/a", Some(&[0, 1, 2, 255]), None),
        txn_op("cas", "t/b", Some(b"b2"), Some(b)),
        txn_op("cas", "t/c", Some(b"c"), Some(0)),
        txn_op("delete", "t/a-not-there", None, None),
        txn_op("get", "t/b", None, None),
    ]);
    let committed = put(&consul, "/v1/txn", ops.to_string()).await;
    assert_eq!(committed.status, 200, "{}", committed.text());
    let results = committed.json()["Results"].as_array().cloned().expect("results");
    assert_eq!(results.len(), 4);
    let index = consul.index();
    for result in &results {
        assert_eq!(result["KV"]["ModifyIndex"], index, "{result}");
    }
    assert_eq!(results[0]["KV"]["Value"], Value::Null, "writes return no value");
    assert_eq!(results[3]["KV"]["Value"], "YjI=", "a get returns the value");
    assert_eq!(consul.value("t/a"), Some(vec![0, 1, 2, 255]));

    // Limits: 64 operations, 512 KiB values and bodies.
    let many: Vec<Value> = (0..65).map(|i| txn_op("set", &format!("m/{i}"), Some(b"x"), None)).collect();
    let too_many = put(&consul, "/v1/txn", Value::Array(many.clone()).to_string()).await;
    assert_eq!(too_many.status, 413);
    assert!(too_many.text().contains("too many operations (65 > 64)"), "{}", too_many.text());
    assert!(consul.tree("m/").is_empty());
    let sixty_four = put(&consul, "/v1/txn", Value::Array(many[..64].to_vec()).to_string()).await;
    assert_eq!(sixty_four.status, 200);
    assert_eq!(consul.tree("m/").len(), 64);
    let big =
        put(&consul, "/v1/txn", json!([txn_op("set", "big", Some(&vec![7; 400 * 1024]), None)]).to_string()).await;
    assert_eq!(big.status, 413, "base64 of 400 KiB is over the body limit");
    assert_eq!(put(&consul, "/v1/kv/big", vec![7; MAX_VALUE_BYTES + 1]).await.status, 413);
    assert_eq!(put(&consul, "/v1/kv/big", vec![7; MAX_VALUE_BYTES]).await.text(), "true", "512 KiB exactly is fine");
    assert_eq!(put(&consul, "/v1/txn", "[{\"Node\":{}}]").await.status, 400);
}

#[tokio::test]
async fn the_double_enforces_its_token() {
    let consul = ConsulDouble::start_with_token(Some("let-me-in"));
    let url = format!("{}/v1/kv/k", consul.url());
    let none = call(reqwest::Method::PUT, url.clone(), b"v".to_vec(), None).await;
    assert_eq!((none.status, none.text().as_str()), (403, "Permission denied"));
    let wrong = call(reqwest::Method::PUT, url.clone(), b"v".to_vec(), Some("nope")).await;
    assert_eq!((wrong.status, wrong.text().as_str()), (403, "ACL not found"));
    assert_eq!(consul.value("k"), None);
    assert_eq!(call(reqwest::Method::PUT, url.clone(), b"v".to_vec(), Some("let-me-in")).await.text(), "true");
    let read = call(reqwest::Method::GET, format!("{url}?raw&token=let-me-in"), Vec::new(), None).await;
    assert_eq!(read.body, b"v");
}

// ---- the relay's client against the double

#[tokio::test]
async fn the_client_keeps_bytes_and_speaks_consuls_api() {
    let mut consul = ConsulDouble::start();
    let client = Client::new(&consul.url(), None).expect("client");
    let cas = |key: &str, value: &[u8], index: u64| TxnOp::Cas { key: key.into(), value: value.to_vec(), index };
    let committed = |outcome: TxnOutcome| match outcome {
        TxnOutcome::Committed(results) => results,
        TxnOutcome::RolledBack(failures) => panic!("rolled back: {failures:?}"),
    };
    let every_byte: Vec<u8> = (0..=255u8).collect();
    committed(client.txn(&[cas("bin/all", &every_byte, 0)]).await.expect("txn"));
    assert_eq!(get(&consul, "/v1/kv/bin/all?raw").await.body, every_byte);
    let listed = client.list("bin/").await.expect("list");
    let entry = listed[0].clone();
    assert_eq!((entry.value.as_slice(), entry.modify_index), (every_byte.as_slice(), 1));
    assert_eq!(get(&consul, "/v1/kv/bin/all").await.json()[0]["CreateIndex"], 1);
    let missing = get(&consul, "/v1/kv/bin/none").await;
    assert_eq!((missing.status, missing.index), (404, Some(1)));
    committed(client.txn(&[cas("bin/empty", b"", 0)]).await.expect("txn"));
    committed(client.txn(&[cas("bin/sub/x", b"x", 0)]).await.expect("txn"));
    let listed = client.list("bin/").await.expect("list");
    assert_eq!(listed.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), ["bin/all", "bin/empty", "bin/sub/x"]);
    assert_eq!(listed[1].value, Vec::<u8>::new());
    assert!(client.list("nothing/").await.expect("list").is_empty());
    assert_eq!(get(&consul, "/v1/kv/bin/?keys&separator=/").await.json(), json!(["bin/all", "bin/empty", "bin/sub/"]));

    // Check-and-set.
    let rolled_back = |outcome: TxnOutcome| matches!(outcome, TxnOutcome::RolledBack(_));
    assert!(rolled_back(client.txn(&[cas("bin/all", b"x", 0)]).await.expect("cas")), "exists already");
    assert!(rolled_back(client.txn(&[cas("bin/all", b"x", 99)]).await.expect("cas")), "stale");
    committed(client.txn(&[cas("bin/all", b"x", entry.modify_index)]).await.expect("cas"));
    let stale = TxnOp::DeleteCas { key: "bin/all".into(), index: entry.modify_index };
    assert!(rolled_back(client.txn(&[stale]).await.expect("delete")), "stale");
    assert_eq!(delete(&consul, "/v1/kv/bin/?recurse").await.text(), "true");
    assert!(consul.tree("bin/").is_empty());

    // Transactions.
    let results = committed(client.txn(&[cas("t/a", &[0, 159, 146, 150], 0), cas("t/b", b"b", 0)]).await.expect("txn"));
    assert_eq!(results.len(), 2);
    let (a, b) = (results[0].modify_index, results[1].modify_index);
    assert_eq!(consul.value("t/a"), Some(vec![0, 159, 146, 150]), "non-UTF-8 bytes survive");
    let outcome = client
        .txn(&[TxnOp::DeleteCas { key: "t/b".into(), index: b }, TxnOp::DeleteCas { key: "t/a".into(), index: a + 1 }])
        .await
        .expect("txn");
    let TxnOutcome::RolledBack(failures) = outcome else { panic!("applied: {outcome:?}") };
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].op_index, 1);
    assert!(failures[0].what.contains("index is stale"), "{}", failures[0].what);
    assert!(consul.value("t/b").is_some(), "nothing applied");

    // Limits are checked before anything is sent.
    let sent = consul.requests().len();
    let too_big = client.txn(&[cas("big", &vec![0; MAX_VALUE_BYTES + 1], 0)]).await;
    assert!(matches!(too_big, Err(ConsulError::ValueTooLarge { .. })), "{too_big:?}");
    let ops: Vec<TxnOp> = (0..65).map(|i| TxnOp::DeleteCas { key: format!("k{i}"), index: 1 }).collect();
    assert!(matches!(client.txn(&ops).await, Err(ConsulError::TooManyOps { ops: 65 })));
    assert_eq!(consul.requests().len(), sent, "refused requests never reach Consul");

    // A blocking query of a reader wakes up on the client's write.
    let current = get(&consul, "/v1/kv/t/a").await.index.expect("index");
    let url = consul.url();
    let watcher = tokio::spawn(async move {
        call(reqwest::Method::GET, format!("{url}/v1/kv/t/a?raw&index={current}&wait=20s"), Vec::new(), None).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    committed(client.txn(&[cas("t/a", b"changed", a)]).await.expect("txn"));
    let woke = tokio::time::timeout(Duration::from_secs(5), watcher).await.expect("woke").expect("task");
    assert_eq!(woke.body, b"changed");
    assert!(woke.index.expect("index") > current);

    // Errors name the request and carry Consul's message; only outages are transient.
    consul.stop();
    let down = client.list("t/").await.expect_err("consul is down");
    assert!(down.is_transient(), "{down}");
    assert!(down.to_string().contains("GET /v1/kv/t/"), "{down}");
    consul.restart();
    let back = client.list("t/").await.expect("back");
    assert_eq!(back.iter().find(|e| e.key == "t/a").map(|e| e.value.clone()), Some(b"changed".to_vec()), "same data");

    let locked = ConsulDouble::start_with_token(Some("tok-123"));
    let anonymous = Client::new(&locked.url(), None).expect("client");
    let refused = anonymous.txn(&[cas("k", b"v", 0)]).await.expect_err("no token");
    assert!(!refused.is_transient());
    assert!(refused.to_string().contains("PUT /v1/txn: HTTP 403 Forbidden: Permission denied"), "{refused}");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), "tok-123\n").expect("token file");
    let token = Token::from_file(&dir.path().join("token")).expect("token");
    let authorized = Client::new(&locked.url(), Some(token)).expect("client");
    committed(authorized.txn(&[cas("k", b"v", 0)]).await.expect("txn"));
    assert_eq!(locked.text("k").as_deref(), Some("v"));
    assert!(!format!("{authorized:?}").contains("tok-123"));
}

// ---- the relay keeping the index in Consul

const KEY: &str = "confcast/dc1/configurations/services/service0/latest";

fn relay_with_consul(nats: &NatsServer, master: &Master, dc: &str, consul: &ConsulDouble, extra: &[&str]) -> Relay {
    let url = consul.url();
    let mut args = vec!["--consul", url.as_str()];
    args.extend_from_slice(extra);
    Relay::start_with(&nats.url(), dc, &master.bare.display().to_string(), &args)
}

fn wait_value(consul: &ConsulDouble, key: &str, expected: Option<&str>) {
    wait_for(Duration::from_secs(30), &format!("{key} to be {expected:?} in Consul"), || {
        (consul.text(key).as_deref() == expected).then_some(())
    });
}

#[test]
fn the_relay_keeps_the_index_in_consul_with_transactions() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let consul = ConsulDouble::start();
    // Left over from an earlier life of this datacenter, and another datacenter's key.
    let ghost = "confcast/dc1/configurations/services/ghost/latest";
    let other = "confcast/dc9/configurations/services/service0/latest";
    block_on(async {
        assert_eq!(put(&consul, &format!("/v1/kv/{ghost}"), "master/0000").await.text(), "true");
        assert_eq!(put(&consul, &format!("/v1/kv/{other}"), "master/9999").await.text(), "true");
    });
    let by_test = consul.requests().len();
    let relay = relay_with_consul(&nats, &master, "dc1", &consul, &[]);

    wait_value(&consul, KEY, Some(&format!("master/{first}")));
    wait_value(&consul, ghost, None);
    assert_eq!(consul.text(other).as_deref(), Some("master/9999"), "other datacenters are left alone");

    let second = master.on("services/service0/master").write("app.conf", "1\n").commit_push("second").commit;
    wait_value(&consul, KEY, Some(&format!("master/{second}")));

    // Repinned to a tag: the version key moves, the old one goes, in one transaction.
    let v1 = master.on("services/service0/master").tag_push("services/service0/v1");
    let txns_before = consul.requests().iter().filter(|r| r.starts_with("PUT /v1/txn")).count();
    master.configuration("big", r#"{"services":[{"name":"service0","branch":"master","tag":"v1"}]}"#);
    let pinned = "confcast/dc1/configurations/services/service0/v1";
    wait_value(&consul, pinned, Some(&format!("master/{v1}")));
    assert_eq!(consul.text(KEY), None, "the latest key went with the same transaction");
    let writes: Vec<String> = consul.requests()[by_test..].iter().filter(|r| !r.starts_with("GET ")).cloned().collect();
    assert!(writes.iter().all(|r| r == "PUT /v1/txn"), "only transactions write: {writes:?}");
    assert_eq!(writes.len(), txns_before + 1, "the repin was one transaction: {writes:?}");

    // Dropped from the datacenter: its keys go.
    master.on("services/other/master").write("o", "o").commit_push("other");
    master.configuration("big", r#"{"services":[{"name":"other","branch":"master"}]}"#);
    wait_value(
        &consul,
        "confcast/dc1/configurations/services/other/latest",
        Some(&format!("master/{}", master.rev("refs/heads/services/other/master").expect("other"))),
    );
    wait_value(&consul, pinned, None);
    assert_eq!(consul.tree("confcast/dc1/").len(), 1, "{:?}", consul.tree("confcast/dc1/"));
    assert!(relay.log().contains("consul index updated"));
}

#[test]
fn two_datacenters_share_one_consul_under_their_prefixes() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    master.datacenter("dc2", r#"{"conf":"datacenter-configuration/big"}"#);
    let consul = ConsulDouble::start();
    let _dc1 = relay_with_consul(&nats, &master, "dc1", &consul, &[]);
    let _dc2 = relay_with_consul(&nats, &master, "dc2", &consul, &[]);
    let key2 = "confcast/dc2/configurations/services/service0/latest";
    wait_value(&consul, KEY, Some(&format!("master/{first}")));
    wait_value(&consul, key2, Some(&format!("master/{first}")));

    // dc2 leaves service0; dc1 keeps it.
    master.on("services/s2/main").write("s", "2").commit_push("s2");
    master.configuration("small", r#"{"services":[{"name":"s2","branch":"main"}]}"#);
    master.datacenter("dc2", r#"{"conf":"datacenter-configuration/small"}"#);
    wait_value(&consul, key2, None);
    wait_value(
        &consul,
        "confcast/dc2/configurations/services/s2/latest",
        Some(&format!("main/{}", master.rev("refs/heads/services/s2/main").expect("s2"))),
    );
    assert_eq!(consul.text(KEY), Some(format!("master/{first}")), "dc1's key is untouched");
}

#[test]
fn a_blocking_query_on_the_key_wakes_up_when_a_push_changes_it() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let consul = ConsulDouble::start();
    let _relay = relay_with_consul(&nats, &master, "dc1", &consul, &[]);
    wait_value(&consul, KEY, Some(&format!("master/{first}")));

    // What consul-template and Nomad's `template` do: read, then block on the index.
    let index = block_on(get(&consul, &format!("/v1/kv/{KEY}"))).index.expect("index");
    let watcher = std::thread::spawn({
        let url = format!("{}/v1/kv/{KEY}?index={index}&wait=60s", consul.url());
        move || {
            let started = Instant::now();
            let answer = block_on(call(reqwest::Method::GET, url, Vec::new(), None));
            (answer, started.elapsed())
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!watcher.is_finished(), "the query blocks while nothing changes");
    let pushed = Instant::now();
    let second = master.on("services/service0/master").write("app.conf", "2\n").commit_push("second").commit;
    let (answer, waited) = watcher.join().expect("watcher");
    assert_eq!(answer.status, 200, "blocking get: {}", answer.text());
    let value = answer.json()[0]["Value"].as_str().map(str::to_owned).expect("a value");
    let value = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, value).expect("base64");
    assert_eq!(value, format!("master/{second}").into_bytes());
    assert!(answer.index.expect("index") > index);
    assert!(waited < Duration::from_secs(30), "woke after {waited:?}");
    eprintln!("push to Consul blocking query wake-up: {:?}", pushed.elapsed());
}

#[test]
fn consul_down_does_not_stop_nats_and_catches_up_when_back() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let mut consul = ConsulDouble::start();
    let relay = relay_with_consul(&nats, &master, "dc1", &consul, &[]);
    let sub = Subscriber::start(&nats.url(), "dc1", &["--service", "service0"]);
    sub.wait_exec("service0", &first);
    wait_value(&consul, KEY, Some(&format!("master/{first}")));

    consul.stop();
    let second = master.on("services/service0/master").write("app.conf", "2\n").commit_push("second").commit;
    sub.wait_exec("service0", &second);
    sub.assert_tree(&master, "service0", &second);
    let third = master.on("services/service0/master").write("app.conf", "3\n").commit_push("third").commit;
    sub.wait_exec("service0", &third);
    assert_eq!(consul.text(KEY), Some(format!("master/{first}")), "Consul was down");
    wait_for(Duration::from_secs(10), "the relay to notice Consul is down", || {
        relay.log().contains("consul index not updated").then_some(())
    });

    consul.restart();
    wait_value(&consul, KEY, Some(&format!("master/{third}")));
}

#[test]
fn a_token_protected_consul_gets_the_token_which_never_reaches_the_log() {
    let secret = "6f1e0b55-confcast-test-token";
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let consul = ConsulDouble::start_with_token(Some(secret));
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("consul.token");
    std::fs::write(&token_file, format!("{secret}\n")).expect("token file");
    let token_path = token_file.display().to_string();
    let relay = relay_with_consul(&nats, &master, "dc1", &consul, &["--consul-token-file", &token_path]);
    wait_value(&consul, KEY, Some(&format!("master/{first}")));
    let second = master.on("services/service0/master").write("app.conf", "2\n").commit_push("second").commit;
    wait_value(&consul, KEY, Some(&format!("master/{second}")));

    // The wrong token: refused, reported, and NATS publishing goes on.
    std::fs::write(&token_file, "wrong-token\n").expect("token file");
    master.datacenter("dc-wrong", r#"{"conf":"datacenter-configuration/big"}"#);
    let wrong = relay_with_consul(&nats, &master, "dc-wrong", &consul, &["--consul-token-file", &token_path]);
    let sub = Subscriber::start(&nats.url(), "dc-wrong", &["--service", "service0"]);
    sub.wait_exec("service0", &second);
    wait_for(Duration::from_secs(20), "the refusal in the log", || wrong.log().contains("ACL not found").then_some(()));
    assert!(consul.tree("confcast/dc-wrong/").is_empty());
    for log in [relay.log(), wrong.log()] {
        assert!(!log.contains(secret), "the token is in the relay's log");
        assert!(!log.contains("wrong-token"), "the token is in the relay's log");
    }
}

#[test]
fn relay_help_documents_the_consul_flags() {
    let out = std::process::Command::new(confcast_tests::bin("relay")).arg("--help").output().expect("relay --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for part in ["--consul <URL>", "CONFCAST_CONSUL", "--consul-token-file <FILE>", "CONFCAST_CONSUL_TOKEN_FILE"] {
        assert!(help.contains(part), "{part} missing from:\n{help}");
    }
    // A token file without Consul, or an unreadable one, stops the relay at once.
    let out = std::process::Command::new(confcast_tests::bin("relay"))
        .args(["--dc", "x", "--master", "/nonexistent", "--state-dir", "/nonexistent"])
        .args(["--consul", "http://127.0.0.1:1", "--consul-token-file", "/nonexistent/token"])
        .output()
        .expect("relay runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("consul token file /nonexistent/token"));
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
}
