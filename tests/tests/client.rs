//! The local API's blocking queries, parsed documents and metrics, and the client
//! library watching a service through the local API and straight from NATS, against a
//! real pipeline with signed updates.

use std::process::Command;
use std::time::{Duration, Instant};

use confcast_schemas::Kind;
use confcast_subscriber::client::{self, File, ServiceConfig};
use confcast_tests::{bin, wait_for, Master, NatsServer, Relay, Subscriber};
use futures::StreamExt;

async fn next(
    changes: &mut (impl futures::Stream<Item = Result<ServiceConfig, client::ClientError>> + Unpin),
) -> ServiceConfig {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), changes.next()).await {
            Ok(Some(Ok(config))) => return config,
            Ok(Some(Err(e))) => eprintln!("watch (retrying): {e}"),
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("no change within 20 s"),
        }
    }
}

fn text(config: &ServiceConfig, path: &str) -> String {
    String::from_utf8_lossy(config.files.get(path).map(File::bytes).unwrap_or_default()).into_owned()
}

#[test]
fn the_client_library_watches_a_service_through_the_local_api_and_from_nats() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let keys = tempfile::tempdir().expect("tempdir");
    let seed = keys.path().join("relay.nk");
    let out = Command::new(bin("publisher")).arg("keygen").arg(&seed).output().expect("keygen");
    let public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let seed_flag = seed.display().to_string();
    let _relay =
        Relay::start_with(&nats.url(), "dc1", &master.bare.display().to_string(), &["--signing-key", &seed_flag]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let sub =
        Subscriber::start(&nats.url(), "dc1", &["--service", "service0", "--listen", &addr, "--trusted-key", &public]);
    sub.wait_exec("service0", &first);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    runtime.block_on(async {
        let mut local = Box::pin(client::watch_local(addr.parse().expect("listen"), "service0"));
        let nats_client = async_nats::connect(nats.url()).await.expect("connect");
        let mut direct =
            Box::pin(client::watch_nats(nats_client, "dc1", Kind::Service, "service0", std::slice::from_ref(&public)));
        let (a, b) = (next(&mut local).await, next(&mut direct).await);
        for config in [&a, &b] {
            assert_eq!(config.commit.as_deref(), Some(first.as_str()));
            assert_eq!(text(config, "app.conf"), "0\n");
        }

        // A blocking query on the service returns when a push changes it.
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/v1/services/service0");
        // Once the exec's outcome is in, nothing changes until the next push.
        let index: u64 = loop {
            let response = http.get(&url).send().await.expect("get");
            let index = response.headers()["x-confcast-index"].to_str().expect("ascii").parse().expect("number");
            if response.json::<serde_json::Value>().await.expect("json")["exec_status"] == 0 {
                break index;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Without a change it waits out `wait` and answers with the same index.
        let started = Instant::now();
        let same = http.get(format!("{url}?index={index}&wait=400ms")).send().await.expect("get");
        assert!(started.elapsed() >= Duration::from_millis(400), "answered before the wait passed");
        assert_eq!(same.headers()["x-confcast-index"].to_str().expect("ascii"), index.to_string());
        let blocked = tokio::spawn({
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http.get(format!("{url}?index={index}&wait=60s")).send().await.expect("get");
                let index: u64 = response.headers()["x-confcast-index"].to_str().expect("ascii").parse().expect("n");
                (Instant::now(), index, response.json::<serde_json::Value>().await.expect("json"))
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!blocked.is_finished(), "the blocking query answered without a change");

        let second = tokio::task::block_in_place(|| {
            master
                .on("services/service0/master")
                .write("app.conf", "1\n")
                .write("app.yaml", "port: 8080\nhosts: [a, b]\n")
                .write("app.toml", "[db]\nurl = \"postgres://x\"\n")
                .commit_push("second")
                .commit
        });
        let pushed = Instant::now();
        let (woke, new_index, body) = blocked.await.expect("blocking query");
        assert!(new_index > index, "the index moved");
        assert_eq!(body["commit"], second.as_str(), "the blocking query answers with the change");
        assert!(woke.duration_since(pushed) < Duration::from_secs(10));
        assert_eq!(body["files"]["app.yaml"]["document"], serde_json::json!({"port": 8080, "hosts": ["a", "b"]}));
        assert_eq!(body["files"]["app.toml"]["document"], serde_json::json!({"db": {"url": "postgres://x"}}));

        // Both watches see the change, with every file.
        let (a, b) = (next(&mut local).await, next(&mut direct).await);
        for config in [&a, &b] {
            assert_eq!(config.commit.as_deref(), Some(second.as_str()));
            assert_eq!(text(config, "app.conf"), "1\n");
            assert_eq!(config.files.len(), 3);
        }
        assert!(matches!(a.files.get("app.yaml"), Some(File::Text { document: Some(_), .. })));

        // Metrics count what happened.
        let metrics =
            wait_for_metrics(&http, &addr, "confcast_subscriber_updates_applied_total{service=\"service/service0\"} 2")
                .await;
        assert!(metrics.contains("confcast_subscriber_apply_seconds_count 2"), "{metrics}");
        assert!(metrics.contains("confcast_subscriber_exec_last_status{service=\"service/service0\"} 0"), "{metrics}");
    });
}

async fn wait_for_metrics(http: &reqwest::Client, addr: &str, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = http.get(format!("http://{addr}/metrics")).send().await.expect("get").text().await.expect("text");
        if text.contains(line) || Instant::now() > deadline {
            assert!(text.contains(line), "{line} not in\n{text}");
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_watch_from_nats_refuses_a_service_signed_by_another_key() {
    let nats = NatsServer::start();
    let (master, first) = Master::with_service0(&nats.url());
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);
    // The relay signs nothing; the watch trusts a key.
    let trusted = confcast_schemas::sign::Signer::generate().public_key().to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    // The relay has published service0 at `first`: the watch reads its head and refuses it.
    wait_for(Duration::from_secs(20), "the relay's index", || {
        confcast_tests::index_value(
            &nats.url(),
            &confcast_schemas::subject::index_key("dc1", Kind::Service, "service0", "latest"),
        )
        .filter(|v| v.ends_with(&first))
    });
    let error = runtime.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let mut direct = Box::pin(client::watch_nats(client, "dc1", Kind::Service, "service0", &[trusted]));
        match tokio::time::timeout(Duration::from_secs(20), direct.next()).await {
            Ok(Some(Ok(config))) => panic!("accepted an unsigned configuration at {:?}", config.commit),
            Ok(Some(Err(e))) => e.to_string(),
            _ => panic!("no answer"),
        }
    });
    assert!(error.contains("unsigned"), "{error}");
}
