//! The example permissions (`deploy/nats/permissions.conf`, run as it is) and signed
//! updates: the pipeline works with least-privilege credentials; a host cannot publish
//! an update nor read another datacenter; a relay cannot publish into another
//! datacenter; a forged update sent with valid credentials is refused by hosts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use confcast_schemas::{decode, encode, subject, Kind, ServiceUpdate};
use confcast_tests::{bin, block_on, wait_for, Master, NatsServer, Relay, Subscriber};
use futures::StreamExt;

const USERS: [(&str, &str); 7] = [
    ("master", "CONFCAST_MASTER_PASSWORD"),
    ("relay_dc1", "CONFCAST_RELAY_DC1_PASSWORD"),
    ("relay_dc2", "CONFCAST_RELAY_DC2_PASSWORD"),
    ("dc1_host1", "CONFCAST_DC1_HOST1_PASSWORD"),
    ("dc2_host1", "CONFCAST_DC2_HOST1_PASSWORD"),
    ("operator", "CONFCAST_OPERATOR_PASSWORD"),
    ("admin", "CONFCAST_ADMIN_PASSWORD"),
];

/// A server running the example permissions, with a password file per user.
struct Secured {
    server: NatsServer,
    secrets: tempfile::TempDir,
}

impl Secured {
    fn start() -> Secured {
        let secrets = tempfile::tempdir().expect("tempdir");
        let env: Vec<(String, String)> = USERS
            .iter()
            .map(|(user, var)| {
                let password = format!("{user}-{:016x}", rand_u64());
                std::fs::write(secrets.path().join(user), format!("{password}\n")).expect("password file");
                (var.to_string(), password)
            })
            .collect();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/permissions.conf");
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let server = NatsServer::start_with(&["-c", config.to_str().expect("utf-8")], &env);
        Secured { server, secrets }
    }

    fn password_file(&self, user: &str) -> PathBuf {
        self.secrets.path().join(user)
    }

    fn password(&self, user: &str) -> String {
        std::fs::read_to_string(self.password_file(user)).expect("password").trim().to_owned()
    }

    /// The flags a binary takes to log in as `user` with its own inbox.
    fn flags(&self, user: &str) -> Vec<String> {
        vec![
            "--nats-user".into(),
            user.into(),
            "--nats-password-file".into(),
            self.password_file(user).display().to_string(),
            "--nats-inbox-prefix".into(),
            format!("_INBOX_{user}"),
        ]
    }

    /// The operators' client, for the test's own checks.
    async fn admin(&self) -> async_nats::Client {
        async_nats::ConnectOptions::with_user_and_password("admin".into(), self.password("admin"))
            .connect(self.server.url())
            .await
            .expect("admin connects")
    }

    /// Last sequence of a stream.
    fn last_seq(&self, stream: &str) -> u64 {
        block_on(async {
            let js = jetstream::new(self.admin().await);
            js.get_stream(stream).await.expect("stream").info().await.expect("info").state.last_sequence
        })
    }

    /// A value of the index bucket.
    fn index_value(&self, key: &str) -> Option<String> {
        block_on(async {
            let js = jetstream::new(self.admin().await);
            let kv = js.get_key_value(subject::INDEX_BUCKET).await.ok()?;
            kv.get(key).await.ok()?.map(|v| String::from_utf8_lossy(&v).into_owned())
        })
    }

    /// A client logged in as `user`, and the server errors it receives.
    async fn client(&self, user: &str) -> (async_nats::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_user_and_password(user.into(), self.password(user))
            .custom_inbox_prefix(format!("_INBOX_{user}"))
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(self.server.url())
            .await
            .expect("connect");
        (client, rx)
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// Installs the master's hooks with the `master` user's credentials.
fn secure_master(secured: &Secured) -> Master {
    let master = Master::new(&secured.server.url());
    let flags = secured.flags("master");
    master.install_hooks(&secured.server.url(), &flags.iter().map(String::as_str).collect::<Vec<_>>());
    master
}

/// Waits for a server error naming a permissions violation.
async fn violation(errors: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(5), errors.recv()).await {
        Ok(Some(error)) => {
            assert!(error.to_lowercase().contains("permissions violation"), "{what}: {error}");
            error
        }
        other => panic!("{what}: no permissions violation reported ({other:?})"),
    }
}

/// Both datacenters running with their own credentials; returns the master and the
/// first commit of service0 (pinned in both).
fn both_datacenters(secured: &Secured) -> (Master, Relay, Relay, String) {
    let master = secure_master(secured);
    master.configuration("big", r#"{"services":[{"name":"service0","branch":"master"}]}"#);
    master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
    master.datacenter("dc2", r#"{"conf":"datacenter-configuration/big"}"#);
    let first = master.on("services/service0/master").write("app.conf", "0\n").commit_push("first");
    assert!(first.stderr.contains("announced"), "the hook publishes with its credentials: {}", first.stderr);
    let relay = |dc: &str| {
        let flags = secured.flags(&format!("relay_{dc}"));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Relay::start_with(&secured.server.url(), dc, &master.bare.display().to_string(), &flags)
    };
    let (r1, r2) = (relay("dc1"), relay("dc2"));
    (master, r1, r2, first.commit)
}

#[test]
fn permission_a_host_cannot_publish_an_update_nor_read_another_datacenter() {
    let secured = Secured::start();
    let (master, _r1, _r2, first) = both_datacenters(&secured);
    let flags = secured.flags("dc1_host1");
    let mut args = vec!["--service", "service0", "--host-id", "host1"];
    args.extend(flags.iter().map(String::as_str));
    let host = Subscriber::start(&secured.server.url(), "dc1", &args);
    host.wait_exec("service0", &first);
    host.assert_tree(&master, "service0", &first);

    let dc1_updates = secured.last_seq(&subject::updates_stream("dc1"));
    let dc2_updates = secured.last_seq(&subject::updates_stream("dc2"));
    block_on(async {
        let (client, mut errors) = secured.client("dc1_host1").await;
        let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client.clone());

        // Publishing an update of its own datacenter: refused by the server.
        let forged = js.publish(subject::update_subject("dc1", Kind::Service, "service0"), "x".into()).await;
        if let Ok(ack) = forged {
            assert!(ack.await.is_err(), "an update published by a host was stored");
        }
        violation(&mut errors, "host publishing an update").await;

        // Reading another datacenter: its stream, its state, its files, its subjects.
        assert!(js.get_stream(subject::updates_stream("dc2")).await.is_err(), "host read dc2's stream info");
        violation(&mut errors, "host reading dc2's stream").await;
        assert!(js.get_object_store(subject::blobs_bucket("dc2")).await.is_err(), "host opened dc2's files");
        violation(&mut errors, "host opening dc2's object store").await;
        let direct = format!(
            "$JS.API.DIRECT.GET.{}.{}",
            subject::state_stream("dc2"),
            subject::snapshot_subject("dc2", Kind::Service, "service0")
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(2), client.request(direct, "".into()))
                .await
                .map_or(true, |r| r.is_err()),
            "host read dc2's snapshot"
        );
        violation(&mut errors, "host reading dc2's snapshot").await;
        let mut sub = client.subscribe("confcast.dc.dc2.>").await.expect("subscribe is sent");
        violation(&mut errors, "host subscribing to dc2's subjects").await;
        let mut others = client.subscribe("_INBOX_relay_dc2.>").await.expect("subscribe is sent");
        violation(&mut errors, "host subscribing to dc2's relay replies").await;
        // Traffic on both while the subscriptions would be live: none arrives.
        let admin_client = secured.admin().await;
        admin_client
            .publish(subject::status_subject("dc2", "host9", Kind::Service, "service0"), "secret".into())
            .await
            .expect("publish");
        admin_client.publish("_INBOX_relay_dc2.reply", "secret".into()).await.expect("publish");
        admin_client.flush().await.expect("flush");
        assert!(tokio::time::timeout(Duration::from_millis(500), sub.next()).await.is_err(), "host read dc2");
        assert!(tokio::time::timeout(Duration::from_millis(100), others.next()).await.is_err(), "host read replies");

        // Its own status is allowed, another host's is not.
        client
            .publish(subject::status_subject("dc1", "host1", Kind::Service, "service0"), "ok".into())
            .await
            .expect("publish");
        client
            .publish(subject::status_subject("dc1", "host2", Kind::Service, "service0"), "x".into())
            .await
            .expect("publish");
        client.flush().await.expect("flush");
        let error = violation(&mut errors, "host publishing another host's status").await;
        assert!(error.contains("host2"), "{error}");
    });
    assert_eq!(secured.last_seq(&subject::updates_stream("dc1")), dc1_updates, "dc1's stream is unchanged");
    assert_eq!(secured.last_seq(&subject::updates_stream("dc2")), dc2_updates, "dc2's stream is unchanged");
    host.assert_tree(&master, "service0", &first);
}

#[test]
fn permission_a_relay_cannot_publish_into_another_datacenter() {
    let secured = Secured::start();
    let (master, r1, _r2, first) = both_datacenters(&secured);
    // Both relays did their work with their own credentials and nothing more.
    for dc in ["dc1", "dc2"] {
        wait_for(Duration::from_secs(20), &format!("{dc}'s index"), || {
            secured
                .index_value(&subject::index_key(dc, Kind::Service, "service0", "latest"))
                .filter(|v| v.ends_with(&first))
        });
    }
    assert!(!secured.server.log().contains("Permissions Violation"), "{}", secured.server.log());
    assert!(!r1.log().contains("ermission"), "{}", r1.log());

    let dc2_updates = secured.last_seq(&subject::updates_stream("dc2"));
    let dc2_state = secured.last_seq(&subject::state_stream("dc2"));
    block_on(async {
        let (client, mut errors) = secured.client("relay_dc1").await;
        let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(2)).build(client.clone());
        for subject in [
            subject::update_subject("dc2", Kind::Service, "service0"),
            subject::snapshot_subject("dc2", Kind::Service, "service0"),
            subject::error_subject("dc2"),
        ] {
            if let Ok(ack) = js.publish(subject.clone(), "x".into()).await {
                assert!(ack.await.is_err(), "relay of dc1 stored a message on {subject}");
            }
            violation(&mut errors, &format!("relay of dc1 publishing {subject}")).await;
        }
        // Nor take dc2's lease, nor read dc2's commit consumer.
        client.publish("$KV.confcast-leases.relay.dc2", "dc1".into()).await.expect("publish");
        client.flush().await.expect("flush");
        violation(&mut errors, "relay of dc1 taking dc2's lease").await;
        let next = client.request("$JS.API.CONSUMER.MSG.NEXT.CONFCAST_COMMITS.relay-dc2", "1".into());
        assert!(tokio::time::timeout(Duration::from_secs(2), next).await.map_or(true, |r| r.is_err()));
        violation(&mut errors, "relay of dc1 reading dc2's commit consumer").await;
    });
    assert_eq!(secured.last_seq(&subject::updates_stream("dc2")), dc2_updates, "dc2's updates are unchanged");
    assert_eq!(secured.last_seq(&subject::state_stream("dc2")), dc2_state, "dc2's state is unchanged");
    drop(master);
}

#[test]
fn permission_a_forged_update_with_valid_credentials_is_refused_and_keys_rotate() {
    let secured = Secured::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let keygen = |name: &str| -> (PathBuf, String) {
        let path = keys.path().join(name);
        let out = Command::new(bin("publisher")).arg("keygen").arg(&path).output().expect("publisher runs");
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        (path, String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let (old_seed, old_key) = keygen("old.nk");
    let (new_seed, new_key) = keygen("new.nk");
    let (_, intruder_key) = keygen("intruder.nk");

    let master = secure_master(&secured);
    master.configuration("big", r#"{"services":[{"name":"service0","branch":"master"}]}"#);
    master.datacenter("dc1", r#"{"conf":"datacenter-configuration/big"}"#);
    let svc = master.on("services/service0/master");
    let first = svc.write("app.conf", "0\n").commit_push("first").commit;
    let relay_flags = |seed: &Path| {
        let mut flags = secured.flags("relay_dc1");
        flags.extend(["--signing-key".to_owned(), seed.display().to_string()]);
        flags
    };
    let flags = relay_flags(&old_seed);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut relay = Relay::start_with(&secured.server.url(), "dc1", &master.bare.display().to_string(), &flags);
    let host_flags = secured.flags("dc1_host1");
    let trusted = format!("{old_key},{new_key}");
    let mut args = vec!["--service", "service0", "--host-id", "host1", "--trusted-key", &trusted];
    args.extend(host_flags.iter().map(String::as_str));
    let host = Subscriber::start(&secured.server.url(), "dc1", &args);
    host.wait_exec("service0", &first);
    let second = svc.write("app.conf", "1\n").commit_push("second").commit;
    host.wait_exec("service0", &second);

    // The first update, replayed as a snapshot: self-consistent (its tree id matches its
    // files), so only its signature stands between it and the host.
    let genuine: Vec<(ServiceUpdate, async_nats::HeaderMap)> = block_on(async {
        let js = jetstream::new(secured.admin().await);
        let stream = js.get_stream(subject::updates_stream("dc1")).await.expect("stream");
        let mut out = Vec::new();
        for seq in 1..=stream.clone().info().await.expect("info").state.last_sequence {
            if let Ok(message) = stream.get_raw_message(seq).await {
                if let Ok(update) = decode::<ServiceUpdate>(&message.payload) {
                    out.push((update, message.headers));
                }
            }
        }
        out
    });
    let (to_first, headers) = genuine
        .iter()
        .find(|(u, _)| u.to.as_deref() == Some(first.as_str()))
        .cloned()
        .expect("the first update is in the stream");
    assert!(headers.get(confcast_schemas::sign::SIGNATURE_HEADER).is_some(), "the relay signs its updates");
    let original = encode(&to_first);
    let replay = encode(&ServiceUpdate { snapshot: true, from: None, ..to_first });
    let update_subject = subject::update_subject("dc1", Kind::Service, "service0");
    let intruder = confcast_schemas::sign::Signer::from_file(&keys.path().join("intruder.nk")).expect("intruder key");
    block_on(async {
        // Valid credentials: the relay's own, allowed on dc1's update subjects.
        let (client, _errors) = secured.client("relay_dc1").await;
        let js = jetstream::new(client);
        let publish = |headers: async_nats::HeaderMap, payload: Vec<u8>| {
            let js = js.clone();
            let subject = update_subject.clone();
            async move { js.publish_with_headers(subject, headers, payload.into()).await.expect("sent").await }
        };
        let signed = |signature: String| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(confcast_schemas::sign::SIGNATURE_HEADER, signature.as_str());
            headers
        };
        // The genuine message again, headers and all: JetStream refuses it, because the
        // subject has moved on since the sequence it was signed for.
        let stored = publish(headers.clone(), original.clone()).await;
        let refused = stored.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("wrong last sequence"), "a replayed genuine update was stored: {refused:?}");
        // Stored, but refused by the host: unsigned, signed by an untrusted key, and
        // the genuine signature without the sequence condition it was made for.
        publish(async_nats::HeaderMap::new(), replay.clone()).await.expect("unsigned is stored");
        publish(signed(intruder.sign(&update_subject, None, &replay)), replay.clone()).await.expect("stored");
        let genuine = headers.get(confcast_schemas::sign::SIGNATURE_HEADER).map(|v| v.as_str().to_owned());
        publish(signed(genuine.unwrap_or_default()), original.clone()).await.expect("stored");
    });
    wait_for(Duration::from_secs(10), "three refusals in the host's log", || {
        (host.log().matches("refusing update").count() >= 3).then_some(())
    });
    let log = host.log();
    assert!(log.contains("unsigned message"), "{log}");
    assert!(log.contains(&format!("signed by {intruder_key}")), "{log}");
    assert!(log.contains("does not match the message"), "{log}");
    host.assert_tree(&master, "service0", &second);
    assert_eq!(host.execs().len(), 2, "no exec for a refused update");

    // Rotation: the relay switches to the new key, which the host already trusts.
    relay.kill();
    let flags = relay_flags(&new_seed);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    relay = Relay::start_with(&secured.server.url(), "dc1", &master.bare.display().to_string(), &flags);
    let third = svc.write("app.conf", "2\n").commit_push("third").commit;
    host.wait_exec("service0", &third);
    host.assert_tree(&master, "service0", &third);
    assert!(relay.log().contains(&new_key), "the relay names the key it signs with");
}
