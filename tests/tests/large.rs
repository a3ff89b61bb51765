//! Big inputs do not break the bus (DESIGN principle 7): a 100 MiB file and a
//! 100,000-file tree arrive intact. Slow in debug builds, so `#[ignore]`d:
//! `cargo test --release -p confcast-tests --test large -- --ignored`.

use std::time::{Duration, Instant};

use confcast_tests::Datacenter;

#[test]
#[ignore = "slow: 100 MiB through git, NATS and disk"]
fn a_100_mib_file_arrives_intact() {
    let dc = Datacenter::with_service0().start();
    let (master, sub) = (&dc.master, &dc.host);

    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let big: Vec<u8> = (0..100 * 1024 * 1024 / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let started = Instant::now();
    let c = master.on("services/service0/master").write("huge.bin", &big).commit_push("100 MiB").commit;
    sub.wait_exec_within("service0", &c, Duration::from_secs(300));
    eprintln!("100 MiB file: push to exec in {:?}", started.elapsed());
    sub.assert_tree(master, "service0", &c);
    // A one-line change next to it does not resend it.
    let started = Instant::now();
    let c2 = master.on("services/service0/master").write("app.conf", "1\n").commit_push("small change").commit;
    sub.wait_exec("service0", &c2);
    eprintln!("small change next to it: push to exec in {:?}", started.elapsed());
    sub.assert_tree(master, "service0", &c2);
}

#[test]
#[ignore = "slow: 100,000 files through git, NATS and disk"]
fn a_100k_file_tree_arrives_intact() {
    let dc = Datacenter::with_service0().start();
    let (master, sub) = (&dc.master, &dc.host);

    master.on("services/service0/master");
    for i in 0..100_000u32 {
        let path = master.work.join(format!("d{}/e{}/f{i}.conf", i % 100, (i / 100) % 10));
        if i % 1000 == 0 {
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        }
        std::fs::create_dir_all(path.parent().expect("parent")).ok();
        std::fs::write(&path, format!("value = {i}\n")).expect("write");
    }
    let started = Instant::now();
    let c = master.commit_push("100k files").commit;
    sub.wait_exec_within("service0", &c, Duration::from_secs(600));
    eprintln!("100,000 files: push to exec in {:?}", started.elapsed());
    sub.assert_tree(master, "service0", &c);

    let started = Instant::now();
    let c2 = master.write("d7/e3/f7307.conf", "changed\n").commit_push("one file").commit;
    sub.wait_exec_within("service0", &c2, Duration::from_secs(120));
    eprintln!("one file changed in 100,000: push to exec in {:?}", started.elapsed());
    sub.assert_tree(master, "service0", &c2);
}
