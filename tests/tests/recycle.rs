//! Trees are recycled: once a service has had a few updates, the host brings an old
//! tree to the new commit instead of hard-linking a new one. Random pushes (files
//! becoming directories and back, renames, modes, symlinks, deletions) must leave every
//! applied tree exactly the commit's, and never touch the tree that was current before.

use std::path::PathBuf;

use confcast_tests::{disk_listing, Datacenter, Rng};

#[test]
fn recycled_trees_equal_their_commits_and_the_previous_tree_stays_intact() {
    let dc = Datacenter::with_service0().start();
    let (master, sub, first) = (&dc.master, &dc.host, &dc.first);

    let mut rng = Rng::from_env();
    let svc = master.on("services/service0/master");
    let names = ["a", "b", "c", "c/d", "c/e/f", "g/h", "g/h/i", "x"];
    let mut applied: Vec<(String, PathBuf)> =
        vec![(first.clone(), std::fs::read_link(sub.service_dir("service0")).expect("link"))];
    // Removes whatever is at `path` in the work tree, file or directory.
    let rm = |path: &std::path::Path| {
        let at = master.work.join(path);
        if at.is_dir() && !at.is_symlink() {
            std::fs::remove_dir_all(&at).expect("remove dir");
        } else {
            std::fs::remove_file(&at).expect("remove file");
        }
    };
    // Files standing where `name` needs a directory go.
    let clear_way = |name: &str| {
        for ancestor in std::path::Path::new(name).ancestors().skip(1) {
            let at = master.work.join(ancestor);
            if !ancestor.as_os_str().is_empty() && (at.is_file() || at.is_symlink()) {
                rm(ancestor);
            }
        }
    };
    for round in 0..16 {
        // A few random operations per push.
        for _ in 0..1 + rng.below(4) {
            let name = names[rng.below(names.len() as u64) as usize];
            let exists = master.work.join(name).exists() || master.work.join(name).is_symlink();
            match rng.below(6) {
                0 if exists => rm(std::path::Path::new(name)),
                1 if exists && master.work.join(name).is_file() => {
                    svc.chmod(name, rng.below(2) == 0);
                }
                2 if !exists => {
                    clear_way(name);
                    svc.symlink(name, "app.conf");
                }
                3 if exists => {
                    let to = format!("{name}-moved{round}");
                    clear_way(&to);
                    svc.rename(name, &to);
                }
                _ => {
                    // Writing `c/d` when `c` is a file (or `c` when it is a directory)
                    // turns one into the other.
                    clear_way(name);
                    if master.work.join(name).is_dir() || master.work.join(name).is_symlink() {
                        rm(std::path::Path::new(name));
                    }
                    svc.write(name, format!("{round} {}\n", rng.below(1000)));
                }
            }
        }
        svc.write("app.conf", format!("{round}\n"));
        let commit = svc.commit_push(&format!("round {round}")).commit;
        sub.wait_exec("service0", &commit);
        sub.assert_tree(master, "service0", &commit);
        // The tree current before this push is untouched, whatever was recycled.
        let (previous_commit, previous_dir) = applied.last().cloned().expect("a previous tree");
        assert_eq!(
            disk_listing(&previous_dir),
            master.listing(&previous_commit),
            "round {round}: the previous tree was changed"
        );
        applied.push((commit, std::fs::read_link(sub.service_dir("service0")).expect("link")));
    }
    let log = sub.log();
    let recycled = log.matches("built by recycling").count();
    assert!(recycled >= 8, "only {recycled} of 16 trees were recycled:\n{log}");
    // Every update applied as a diff: none fell back to the snapshot (a rename used to,
    // its file looked for at its new path in the current tree).
    assert!(!log.contains("did not apply"), "an update fell back to the snapshot:\n{log}");
    let (ok, report) = sub.verify();
    assert!(ok, "{report}");
}
