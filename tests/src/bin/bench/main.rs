//! confcast's benchmark: one run on loopback, against the polling design it replaces.
//!
//! `cargo run --release -p confcast-tests --bin bench` (add `-- --quick` for a short
//! smoke run, `-- --help` for the rest). It starts nats-server, serves the master with
//! `git daemon` behind a counting TCP proxy (so every request and byte the master serves
//! is seen), runs real `relay` and `subscriber` processes, and prints one table per
//! scenario. BENCHMARKS.md describes the scenarios and records a run.
//!
//! One file per scenario: [`latency`] (1, 3), [`load`] (2, 6), [`burst`] (4),
//! [`apply`] (5), [`fanout`] (7); [`proxy`] counts what the master serves and
//! [`report`] prints the tables.

mod apply;
mod burst;
mod fanout;
mod latency;
mod load;
mod proxy;
mod report;

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
    println!("# confcast benchmark{}", if quick { " (quick)" } else { "" });
    println!("\nmachine: {}", report::machine());

    if args.runs(Scenario::Latency) {
        latency::latency_one_host(if quick { 10 } else { 100 }, &mut tables);
    }
    if args.runs(Scenario::Fanout) {
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
    }
    if args.runs(Scenario::Load) {
        let mut table = load::load_table();
        for d in if quick { [1, 3] } else { [1, 10] } {
            load::master_load(d, if quick { 3 } else { 20 }, &mut table);
        }
        tables.push(table);
    }
    if args.runs(Scenario::Polling) {
        let hosts = if quick { 3 } else { 10 };
        tables.push(load::polling(hosts, Duration::from_secs(if quick { 4 } else { 15 })));
    }
    if args.runs(Scenario::Apply) {
        let mut table = apply::table();
        apply::apply_cost(100, 10, &mut table);
        apply::apply_cost(if quick { 10_000 } else { 100_000 }, if quick { 4 } else { 12 }, &mut table);
        tables.push(table);
    }
    if args.runs(Scenario::Burst) {
        let mut table = burst::table();
        burst::burst(if quick { 3 } else { 10 }, if quick { 10 } else { 100 }, &mut table);
        tables.push(table);
    }

    tables.sort_by(|a, b| a.title.cmp(&b.title));
    for table in &tables {
        table.print();
    }
    println!("\nbench finished in {:.0} s", started.elapsed().as_secs_f64());
}
