//! A full disk on the host: the apply fails before the swap, the old tree stays and
//! keeps being served, the error is reported, and once space is freed the update is
//! applied without another push. Mounts a small tmpfs, so it needs root (as the
//! project's machines and CI run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use confcast_tests::{wait_for, Master, NatsServer, Relay, Subscriber};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount runs");
        assert!(out.status.success(), "mounting a tmpfs needs root: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(at.to_owned())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("mount runs");
        assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_keeps_the_old_tree_and_recovers_when_space_is_freed() {
    let nats = NatsServer::start();
    let (master, _) = Master::with_service0(&nats.url());
    let first = master.on("services/service0/master").write("app.conf", "small\n").commit_push("first").commit;
    let _relay = Relay::start(&nats.url(), "dc1", &master.bare);

    let mut sub = Subscriber::prepare(&nats.url(), "dc1", &["--service", "service0"]);
    let disk = Tmpfs::mount(&sub.state_dir(), "2m");
    sub.restart();
    sub.wait_exec("service0", &first);

    let big =
        master.on("services/service0/master").write("data.bin", vec![7u8; 3 * 1024 * 1024]).commit_push("3 MiB").commit;
    wait_for(Duration::from_secs(20), "the apply to fail", || {
        sub.log().contains("update refused; keeping the current configuration").then_some(())
    });
    assert!(sub.log().contains("No space left on device"), "the error names the cause");
    sub.assert_tree(&master, "service0", &first);
    assert_eq!(sub.execs().len(), 1, "nothing ran for the state that was not applied");

    disk.resize("64m");
    sub.wait_exec("service0", &big);
    sub.assert_tree(&master, "service0", &big);
    sub.stop();
}
