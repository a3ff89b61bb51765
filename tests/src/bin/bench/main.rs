//! confcast's benchmark: one run on loopback, against the polling design it replaces
//! and against git itself.
//!
//! `cargo run --release -p confcast-tests --bin bench` (add `-- --quick` for a short
//! smoke run, `-- --only tree-size,bootstrap` for some scenarios, `-- --help` for the
//! rest). It starts nats-server, serves the master with `git daemon` (behind a counting
//! TCP proxy where the master's load is measured), runs real `relay` and `subscriber`
//! processes of this build, prints one table per scenario and how long each scenario
//! took. BENCHMARKS.md describes the scenarios and records a run.
//!
//! One file per scenario: [`latency`] (1, 3), [`load`] (2, 6), [`burst`] (4),
//! [`apply`] (5), [`fanout`] (7), and what a user with a large configuration repository
//! feels: [`tree_size`] (8, a one-line change at 100 to 100,000 files), [`bootstrap`]
//! (9, a new host next to `git checkout`), [`datacenters`] (10, every host of several
//! datacenters over `git://`, next to `git fetch`), [`services`] (11, one push in a
//! datacenter of thousands of services), [`rollout`] (12, a staged rollout's timeline).
//! [`synthetic`] writes large trees and many
//! services with `git fast-import`, [`stage`] sets up a datacenter serving one,
//! [`observe`] watches exec logs and processes, [`proxy`] counts what the master serves
//! and [`report`] prints the tables.

mod apply;
mod bootstrap;
mod burst;
mod datacenters;
mod fanout;
mod latency;
mod load;
mod observe;
mod proxy;
mod report;
mod rollout;
mod services;
mod stage;
mod synthetic;
mod tree_size;

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

/// The scenarios `--only` can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Push → `--exec` on one host, and its footprint (tables 1, 3).
    Latency,
    /// Master requests and bytes per push (table 2).
    Load,
    /// The polling baseline (table 6).
    Polling,
    /// The host's apply cost against tree size (table 5).
    Apply,
    /// One push updating many services, many host processes (table 4).
    Burst,
    /// D datacenters × H in-process hosts (table 7).
    Fanout,
    /// A one-line change at 100, 10,000 and 100,000 files: latency, bus bytes, store
    /// growth, relay CPU (table 8).
    TreeSize,
    /// A new host at 100,000 files, next to `git checkout` (table 9).
    Bootstrap,
    /// 3 datacenters × 2 hosts over `git://`, next to `git fetch` (table 10).
    Datacenters,
    /// A push to one of 5 and of 3,000 services (table 11).
    Services,
    /// A staged rollout's timeline: a good commit wave by wave, a bad one halted at
    /// its canary (table 12).
    Rollout,
}

/// A fan-out size: `DxH`, e.g. `10x1000`.
#[derive(Debug, Clone, Copy)]
struct Size {
    datacenters: usize,
    hosts: usize,
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Size, String> {
        let parse = || -> Option<Size> {
            let (d, h) = s.split_once('x')?;
            Some(Size { datacenters: d.parse().ok()?, hosts: h.parse().ok()? })
        };
        parse().ok_or_else(|| format!("{s:?} is not DxH (e.g. 10x1000)"))
    }
}

/// confcast's benchmark, on loopback with the real binaries of this build.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// A short smoke run: fewer pushes, smaller sizes.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Run the fan-out at this one size only (`DxH`).
    #[arg(long, value_name = "DxH")]
    fanout: Option<Size>,
}

impl Args {
    fn runs(&self, scenario: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }
}

fn main() {
    let args = Args::parse();
    let quick = args.quick;
    let started = Instant::now();
    let mut tables = Vec::new();
    let mut took = Vec::new();
    println!("# confcast benchmark{}", if quick { " (quick)" } else { "" });
    println!("\nmachine: {}", report::machine());
    let mut run = |scenario: Scenario, f: &mut dyn FnMut(&mut Vec<report::Table>)| {
        if args.runs(scenario) {
            let started = Instant::now();
            f(&mut tables);
            let secs = started.elapsed().as_secs_f64();
            eprintln!("{scenario:?} took {secs:.0} s");
            took.push((scenario, secs));
        }
    };

    run(Scenario::Latency, &mut |tables| {
        latency::latency_one_host(if quick { 10 } else { 100 }, tables);
    });
    run(Scenario::Fanout, &mut |tables| {
        let mut table = fanout::table();
        let sizes: Vec<(usize, usize)> = match args.fanout {
            Some(size) => vec![(size.datacenters, size.hosts)],
            None if quick => vec![(1, 10), (2, 50)],
            None => vec![(1, 10), (10, 10), (1, 1000), (10, 1000)],
        };
        for (d, h) in sizes {
            fanout::fanout(d, h, if quick { 3 } else { 10 }, &mut table);
        }
        tables.push(table);
    });
    run(Scenario::Load, &mut |tables| {
        let mut table = load::load_table();
        for d in if quick { [1, 3] } else { [1, 10] } {
            load::master_load(d, if quick { 3 } else { 20 }, &mut table);
        }
        tables.push(table);
    });
    run(Scenario::Polling, &mut |tables| {
        let hosts = if quick { 3 } else { 10 };
        tables.push(load::polling(hosts, Duration::from_secs(if quick { 4 } else { 15 })));
    });
    run(Scenario::Apply, &mut |tables| {
        let mut table = apply::table();
        apply::apply_cost(100, 10, &mut table);
        apply::apply_cost(if quick { 10_000 } else { 100_000 }, if quick { 4 } else { 12 }, &mut table);
        tables.push(table);
    });
    run(Scenario::Burst, &mut |tables| {
        let mut table = burst::table();
        burst::burst(if quick { 3 } else { 10 }, if quick { 10 } else { 100 }, &mut table);
        tables.push(table);
    });
    run(Scenario::TreeSize, &mut |tables| {
        let sizes: &[usize] = if quick { &[100, 10_000] } else { &[100, 10_000, 100_000] };
        tables.push(tree_size::tree_size(sizes, if quick { 10 } else { 100 }));
    });
    run(Scenario::Bootstrap, &mut |tables| {
        tables.push(bootstrap::bootstrap(if quick { 10_000 } else { 100_000 }, if quick { 2 } else { 3 }));
    });
    run(Scenario::Datacenters, &mut |tables| {
        tables.push(datacenters::datacenters(3, 2, if quick { 10 } else { 30 }));
    });
    run(Scenario::Rollout, &mut |tables| {
        tables.push(rollout::rollout(if quick { 4 } else { 10 }));
    });
    run(Scenario::Services, &mut |tables| {
        let counts: &[usize] = if quick { &[5, 300] } else { &[5, 3_000] };
        tables.push(services::services(counts, if quick { 10 } else { 30 }));
    });

    // Titles start with the scenario's number: "10." comes after "9.".
    tables.sort_by_key(|t| t.title.split('.').next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(u32::MAX));
    for table in &tables {
        table.print();
    }
    println!("\n### Time each scenario took\n");
    println!("| scenario | seconds |");
    println!("| --- | --- |");
    for (scenario, secs) in &took {
        let name = scenario.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
        println!("| {name} | {secs:.0} |");
    }
    println!("\nbench finished in {:.0} s", started.elapsed().as_secs_f64());
}
