//! `subscriber --listen`: the host's configuration as JSON on localhost, over TCP and a
//! unix socket, always one commit's files.

use confcast_tests::{free_port, http_get as get, wait_for, Datacenter};
use std::time::Duration;

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).expect("JSON body")
}

#[test]
fn the_local_api_serves_what_the_host_applied() {
    let addr = format!("127.0.0.1:{}", free_port());
    let dc = Datacenter::with_service0().host_flags(&["--service", "service0", "--listen", &addr]).start();
    let (master, sub, first) = (&dc.master, &dc.host, &dc.first);
    let tcp = || std::net::TcpStream::connect(&addr).expect("connect");

    let (status, body) = wait_for(Duration::from_secs(10), "the API", || {
        std::net::TcpStream::connect(&addr).ok().map(|mut s| get(&mut s, "/healthz"))
    });
    assert_eq!((status, body), (200, b"ok\n".to_vec()));
    let (status, body) = get(&mut tcp(), "/v1/services");
    assert_eq!(status, 200);
    let list = json(&body);
    assert_eq!(list["dc"], "dc1");
    assert_eq!(list["services"][0]["name"], "service0");
    assert_eq!(list["services"][0]["commit"], first.as_str());
    assert_eq!(list["services"][0]["status"], "ok");

    let next = master
        .on("services/service0/master")
        .write("app.conf", "port = 8080\n")
        .write("bin.dat", [0u8, 255, 1, 254])
        .symlink("link", "app.conf")
        .commit_push("more")
        .commit;
    sub.wait_exec("service0", &next);
    let (status, body) = get(&mut tcp(), "/v1/services/service0");
    assert_eq!(status, 200);
    let one = json(&body);
    assert_eq!(one["commit"], next.as_str());
    assert_eq!(one["ref"], "refs/heads/services/service0/master");
    assert_eq!(one["files"]["app.conf"]["text"], "port = 8080\n");
    assert_eq!(one["files"]["bin.dat"]["base64"], "AP8B/g==");
    assert_eq!(one["files"]["link"]["symlink"], "app.conf");

    let (status, body) = get(&mut tcp(), "/v1/services/service0/files/app.conf");
    assert_eq!((status, body), (200, b"port = 8080\n".to_vec()));
    let (status, body) = get(&mut tcp(), "/v1/services/service0/files/bin.dat");
    assert_eq!((status, body), (200, vec![0u8, 255, 1, 254]));
    let (status, body) = get(&mut tcp(), "/v1/services/nope");
    assert_eq!(status, 404);
    assert!(
        String::from_utf8_lossy(&body).contains("no service \\\"nope\\\" on this host"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, _) = get(&mut tcp(), "/v1/services/service0/files/missing.conf");
    assert_eq!(status, 404);
    let (status, _) = get(&mut tcp(), "/v1/services/service0/files/../../etc/passwd");
    assert!(status == 400 || status == 404, "never outside the service: {status}");
}

#[test]
fn the_local_api_listens_on_a_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("confcast.sock");
    let _dc = Datacenter::with_service0()
        .host_flags(&["--service", "service0", "--listen", socket.to_str().expect("utf-8")])
        .start();
    let mut stream =
        wait_for(Duration::from_secs(10), "the socket", || std::os::unix::net::UnixStream::connect(&socket).ok());
    let (status, body) = get(&mut stream, "/v1/services/service0/files/app.conf");
    assert_eq!((status, body), (200, b"0\n".to_vec()));
}
