use super::*;
use crate::push_options::ALLOW_UNPIN;
use crate::suggest::nearest;

const DC1: &str = "refs/heads/datacenters/dc1";
const CONF: &str = "refs/heads/datacenter-configuration/web";
const WEB: &str = "refs/heads/services/web/master";

/// A bare master whose refs are set directly; a push is a list of [`RefUpdate`]s whose
/// objects are written but whose refs have not moved, as in pre-receive.
struct Master {
    _dir: tempfile::TempDir,
    repo: Repository,
}

impl Master {
    fn empty() -> Master {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::init_bare(dir.path()).expect("init");
        Master { _dir: dir, repo }
    }

    /// Service `web` (branches `master` and `dev`, tag `v1`), configuration `web` pinning
    /// its master branch, and datacenter `dc1` following it, with `host-a` running web.
    fn with_web() -> Master {
        let master = Master::empty();
        let web = master.commit("app.conf", "0\n");
        master.set(WEB, web);
        master.set("refs/heads/services/web/dev", web);
        master.set("refs/tags/services/web/v1", web);
        master.set(CONF, master.configuration(r#"{"services":[{"name":"web","branch":"master"}]}"#));
        master.set(
            DC1,
            master.datacenter(
                r#"{"conf":"datacenter-configuration/web","inventories":{"hosts":{"host-a":{"services":["web"]}}}}"#,
            ),
        );
        master
    }

    fn commit(&self, file: &str, content: &str) -> Oid {
        let blob = self.repo.blob(content.as_bytes()).expect("blob");
        let mut tree = self.repo.treebuilder(None).expect("builder");
        tree.insert(file, blob, 0o100644).expect("insert");
        let tree = self.repo.find_tree(tree.write().expect("tree")).expect("tree");
        let sig = git2::Signature::now("confcast test", "test@confcast.invalid").expect("signature");
        self.repo.commit(None, &sig, &sig, "test", &tree, &[]).expect("commit")
    }

    fn configuration(&self, json: &str) -> Oid {
        self.commit(CONFIGURATION_FILE, json)
    }

    fn datacenter(&self, json: &str) -> Oid {
        self.commit(DATACENTER_FILE, json)
    }

    fn set(&self, ref_name: &str, oid: Oid) {
        self.repo.reference(ref_name, oid, true, "test").expect("ref");
    }

    fn rev(&self, ref_name: &str) -> Option<Oid> {
        self.repo.refname_to_id(ref_name).ok()
    }

    fn check(&self, updates: &[RefUpdate]) -> Verdict {
        check(&self.repo, updates, &PushOptions::default())
    }

    /// The refusals of a push, as pre-receive prints them.
    fn refusals(&self, updates: &[RefUpdate]) -> Vec<String> {
        self.check(updates).rejections.iter().map(ToString::to_string).collect()
    }
}

/// Pushing `new` to `ref_name` on `master`.
fn push(master: &Master, ref_name: &str, new: Oid) -> RefUpdate {
    RefUpdate { old: master.rev(ref_name), new: Some(new), ref_name: ref_name.into() }
}

/// Deleting `ref_name` on `master`.
fn delete(master: &Master, ref_name: &str) -> RefUpdate {
    RefUpdate { old: master.rev(ref_name), new: None, ref_name: ref_name.into() }
}

#[test]
fn a_push_without_documents_or_deletions_asks_for_nothing() {
    let master = Master::with_web();
    let next = master.commit("app.conf", "1\n");
    let service = [push(&master, WEB, next), push(&master, "refs/tags/services/web/v2", next)];
    assert!(Plan::of(&service).is_empty(), "no datacenter document is read for a plain service push");
    assert!(Plan::of(&[delete(&master, DC1)]).is_empty(), "a datacenter can go");
    let plan_deleting = [delete(&master, "refs/heads/services/web/dev"), delete(&master, CONF)];
    assert_eq!(Plan::of(&plan_deleting).deleted.len(), 2);
    let verdict = master.check(&service);
    assert!(verdict.rejections.is_empty() && verdict.notes.is_empty(), "{verdict:?}");
}

#[test]
fn an_inventory_entry_must_be_in_the_followed_configuration() {
    let master = Master::with_web();
    let typo = master.datacenter(
        r#"{"conf":"datacenter-configuration/web","inventories":{"hosts":{"host-a":{"services":["web"],"devices":["sw"]},"host-b":{"services":["wbe"]}}}}"#,
    );
    assert_eq!(
        master.refusals(&[push(&master, DC1, typo)]),
        vec![
            "refs/heads/datacenters/dc1: datacenter.json: field `inventories.hosts.host-a.devices[0]`: device \"sw\" \
             is not in datacenter-configuration/web, the configuration this datacenter follows",
            "refs/heads/datacenters/dc1: datacenter.json: field `inventories.hosts.host-b.services[0]`: service \
             \"wbe\" is not in datacenter-configuration/web, the configuration this datacenter follows; did you \
             mean `web`?",
        ]
    );
}

#[test]
fn conf_must_name_a_configuration_with_a_valid_document() {
    let master = Master::with_web();
    master.set("refs/tags/datacenter-configuration/web/1", master.rev(CONF).expect("conf"));
    let missing = master.datacenter(r#"{"conf":"datacenter-configuration/wbe"}"#);
    assert_eq!(
        master.refusals(&[push(&master, DC1, missing)]),
        vec![
            "refs/heads/datacenters/dc1: datacenter.json: field `conf`: \"datacenter-configuration/wbe\" names \
             refs/heads/datacenter-configuration/wbe, which does not exist on the master; did you mean \
             `datacenter-configuration/web`?"
        ]
    );
    let version = master.datacenter(r#"{"conf":"datacenter-configuration/web/2"}"#);
    let refusals = master.refusals(&[push(&master, DC1, version)]);
    assert!(refusals[0].ends_with("did you mean `datacenter-configuration/web/1`?"), "{refusals:?}");
    let far = master.datacenter(r#"{"conf":"datacenter-configuration/storage"}"#);
    let refusals = master.refusals(&[push(&master, DC1, far)]);
    assert!(refusals[0].ends_with("does not exist on the master"), "no guess when nothing is close: {refusals:?}");

    // A configuration ref without its document (pushed around pre-receive).
    master.set("refs/heads/datacenter-configuration/empty", master.commit("README", "nothing\n"));
    let empty = master.datacenter(r#"{"conf":"datacenter-configuration/empty"}"#);
    assert_eq!(
        master.refusals(&[push(&master, DC1, empty)]),
        vec![
            "refs/heads/datacenters/dc1: datacenter.json: field `conf`: \"datacenter-configuration/empty\" names \
             refs/heads/datacenter-configuration/empty, which holds no datacenter-configuration.json"
        ]
    );

    // A version pushed as an annotated tag, in the same push.
    let sig = git2::Signature::now("confcast test", "test@confcast.invalid").expect("signature");
    let conf_commit = master.repo.find_object(master.rev(CONF).expect("conf"), None).expect("commit");
    let annotated = master.repo.tag_annotation_create("v3", &conf_commit, &sig, "v3").expect("tag object");
    let v3 = master.datacenter(r#"{"conf":"datacenter-configuration/web/3"}"#);
    let both = [push(&master, "refs/tags/datacenter-configuration/web/3", annotated), push(&master, DC1, v3)];
    assert!(master.refusals(&both).is_empty(), "{:?}", master.refusals(&both));

    let fine = master.datacenter(r#"{"conf":"datacenter-configuration/web/1"}"#);
    assert!(master.refusals(&[push(&master, DC1, fine)]).is_empty());
}

#[test]
fn every_pin_names_an_existing_branch_or_tag() {
    let master = Master::with_web();
    let conf = master.configuration(
        r#"{"services":[{"name":"web","branch":"mastr"},{"name":"web2","branch":"main"}],
            "applications":[{"name":"web","branch":"master","tag":"v2"}]}"#,
    );
    master.set("refs/heads/applications/web/master", master.rev(WEB).expect("web"));
    master.set("refs/tags/applications/web/v1", master.rev(WEB).expect("web"));
    let verdict = master.check(&[push(&master, CONF, conf)]);
    let refusals: Vec<String> = verdict.rejections.iter().map(ToString::to_string).collect();
    // The same document as an annotated tag: a version of the configuration.
    let sig = git2::Signature::now("confcast test", "test@confcast.invalid").expect("signature");
    let object = master.repo.find_object(conf, None).expect("commit");
    let annotated = master.repo.tag_annotation_create("2", &object, &sig, "2").expect("tag object");
    let version = master.refusals(&[push(&master, "refs/tags/datacenter-configuration/web/2", annotated)]);
    assert_eq!(version.len(), 2, "{version:?}");
    assert!(version[0].starts_with("refs/tags/datacenter-configuration/web/2: datacenter-configuration.json: "));
    assert_eq!(
        refusals,
        vec![
            "refs/heads/datacenter-configuration/web: datacenter-configuration.json: field `services[0].branch`: \
             \"mastr\" names refs/heads/services/web/mastr, which does not exist on the master; did you mean \
             `master`?",
            "refs/heads/datacenter-configuration/web: datacenter-configuration.json: field `applications[0].tag`: \
             \"v2\" names refs/tags/applications/web/v2, which does not exist on the master; did you mean `v1`?",
        ]
    );
    // web2 has no ref at all: a service being introduced, not a typo of a branch.
    assert_eq!(
        verdict.notes,
        vec![
            "confcast: note: refs/heads/datacenter-configuration/web: datacenter-configuration.json: field \
             `services[1].name`: service \"web2\" has no branch or tag on the master yet; it is delivered once \
             refs/heads/services/web2/main is pushed; did you mean `web`?"
        ]
    );
}

#[test]
fn refs_created_by_the_same_push_count() {
    let master = Master::with_web();
    let web = master.rev(WEB).expect("web");
    // A release: the tag, the configuration pinning it, and a new host running it.
    let conf = master
        .configuration(r#"{"services":[{"name":"web","branch":"master","tag":"v2"},{"name":"api","branch":"main"}]}"#);
    let dc = master.datacenter(
        r#"{"conf":"datacenter-configuration/web","inventories":{"hosts":{"host-b":{"services":["web","api"]}}}}"#,
    );
    let release = [
        push(&master, "refs/tags/services/web/v2", web),
        push(&master, "refs/heads/services/api/main", web),
        push(&master, CONF, conf),
        push(&master, DC1, dc),
    ];
    let verdict = master.check(&release);
    assert!(verdict.rejections.is_empty() && verdict.notes.is_empty(), "{verdict:?}");
    // Without the tag, the configuration is refused; without the configuration, the
    // inventory is.
    let refusals = master.refusals(&release[1..]);
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("field `services[0].tag`: \"v2\" names refs/tags/services/web/v2"), "{refusals:?}");
    let refusals = master.refusals(&release[3..]);
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("field `inventories.hosts.host-b.services[1]`: service \"api\""), "{refusals:?}");

    // A datacenter following a configuration created in the same push.
    let new_conf = master.configuration(r#"{"services":[{"name":"web","branch":"dev"}]}"#);
    let dc = master.datacenter(r#"{"conf":"datacenter-configuration/canary"}"#);
    let both = [push(&master, "refs/heads/datacenter-configuration/canary", new_conf), push(&master, DC1, dc)];
    assert!(master.refusals(&both).is_empty());
    // When that configuration is itself refused, only its own refusal is printed.
    let bad_conf = master.configuration(r#"{"services":[{"name":"web","branch":"mastr"}]}"#);
    let both = [push(&master, "refs/heads/datacenter-configuration/canary", bad_conf), push(&master, DC1, dc)];
    let refusals = master.refusals(&both);
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].starts_with("refs/heads/datacenter-configuration/canary: "), "{refusals:?}");
}

#[test]
fn deleting_what_a_datacenter_pins_is_refused_unless_asked_for() {
    let master = Master::with_web();
    let dc2 = master.datacenter(r#"{"conf":"datacenter-configuration/web"}"#);
    master.set("refs/heads/datacenters/dc2", dc2);
    assert_eq!(
        master.refusals(&[delete(&master, WEB)]),
        vec![
            "refs/heads/services/web/master: datacenter-configuration.json in refs/heads/datacenter-configuration/web: \
             field `services[0].branch`: \"master\" still names this ref; deleting it would leave the pin \
             unresolvable in datacenters dc1, dc2 (to delete it anyway, push with `-o confcast.allow-unpin`; hosts \
             then keep what they have)"
        ]
    );
    assert_eq!(
        master.refusals(&[delete(&master, CONF)]),
        vec![
            "refs/heads/datacenter-configuration/web: datacenter.json in refs/heads/datacenters/dc1: field `conf`: \
             \"datacenter-configuration/web\" still names this ref; deleting it would leave datacenter dc1 without a \
             configuration (to delete it anyway, push with `-o confcast.allow-unpin`; hosts then keep what they have)",
            "refs/heads/datacenter-configuration/web: datacenter.json in refs/heads/datacenters/dc2: field `conf`: \
             \"datacenter-configuration/web\" still names this ref; deleting it would leave datacenter dc2 without a \
             configuration (to delete it anyway, push with `-o confcast.allow-unpin`; hosts then keep what they have)",
        ]
    );

    let allowed = check(&master.repo, &[delete(&master, WEB)], &PushOptions::parse([ALLOW_UNPIN.to_owned()]));
    assert!(allowed.rejections.is_empty(), "{allowed:?}");
    assert_eq!(
        allowed.notes,
        vec![
            "confcast: note: deleting refs/heads/services/web/master as asked (confcast.allow-unpin): \
             datacenter-configuration.json in refs/heads/datacenter-configuration/web: field `services[0].branch`: \
             \"master\" still names it; datacenters dc1, dc2 keep what their hosts have until that changes"
        ]
    );

    // Nobody pins it; or the same push moves the pin away; or removes the datacenters.
    assert!(master.refusals(&[delete(&master, "refs/heads/services/web/dev")]).is_empty());
    let repinned = master.configuration(r#"{"services":[{"name":"web","branch":"dev"}]}"#);
    assert!(master.refusals(&[delete(&master, WEB), push(&master, CONF, repinned)]).is_empty());
    let gone = [delete(&master, WEB), delete(&master, DC1), delete(&master, "refs/heads/datacenters/dc2")];
    assert!(master.refusals(&gone).is_empty());
}

#[test]
fn a_datacenter_whose_documents_do_not_resolve_does_not_block_deletions() {
    let master = Master::with_web();
    master.set("refs/heads/datacenters/broken", master.datacenter("{ nope"));
    master.set("refs/heads/datacenters/lost", master.datacenter(r#"{"conf":"datacenter-configuration/none"}"#));
    let refusals = master.refusals(&[delete(&master, WEB)]);
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("in datacenter dc1 "), "{refusals:?}");
}

#[test]
fn the_nearest_name_is_offered_only_when_close() {
    let names = ["web", "api", "master", "main", "webhooks"];
    assert_eq!(nearest("wbe", names), Some("web"), "a transposition is one edit");
    assert_eq!(nearest("Web", names), Some("web"), "case is ignored");
    assert_eq!(nearest("mastr", names), Some("master"));
    assert_eq!(nearest("mian", names), Some("main"));
    assert_eq!(nearest("storage", names), None);
    assert_eq!(nearest("web", names), None, "the name itself is not a suggestion");
    assert_eq!(nearest("ab", ["ac", "aa"]), Some("aa"), "ties go to the first in order");
}

#[test]
fn push_options_outside_confcast_are_left_alone_and_typos_are_named() {
    let options = PushOptions::parse(["ci.skip".to_owned(), "confcast.allow-unpinn".to_owned()]);
    assert!(!options.allow_unpin);
    assert_eq!(options.unknown, vec!["confcast.allow-unpinn"]);
    assert_eq!(
        options.notes(),
        vec!["confcast: note: ignoring push option \"confcast.allow-unpinn\"; did you mean `confcast.allow-unpin`?"]
    );
    assert!(PushOptions::parse([ALLOW_UNPIN.to_owned()]).allow_unpin);
}
