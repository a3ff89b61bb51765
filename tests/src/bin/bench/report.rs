//! How the bench tells its figures: Markdown tables, percentiles, verdicts against the
//! targets, and what it measures processes with.

use std::thread;

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn summary(mut v: Vec<f64>) -> (f64, f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 99.0), v.last().copied().unwrap_or(f64::NAN))
}

pub(crate) struct Table {
    pub(crate) title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(title: &str, header: &[&str]) -> Table {
        Table { title: title.into(), header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
    pub(crate) fn print(&self) {
        println!("\n### {}\n", self.title);
        println!("| {} |", self.header.join(" | "));
        println!("|{}|", self.header.iter().map(|_| " --- ").collect::<Vec<_>>().join("|"));
        for row in &self.rows {
            println!("| {} |", row.join(" | "));
        }
    }
}

pub(crate) fn verdict(met: bool) -> String {
    if met {
        "met".into()
    } else {
        "**not met**".into()
    }
}

/// CPU time (user + system) of a process so far, in milliseconds.
pub(crate) fn cpu_ms(pid: u32) -> u64 {
    stat_ticks(pid, 2) * 10
}

/// CPU time (user + system) of a process and of the children it has waited for (a
/// relay's `git repack`), in milliseconds.
pub(crate) fn cpu_with_children_ms(pid: u32) -> u64 {
    stat_ticks(pid, 4) * 10
}

/// The sum of the first `n` CPU fields of `/proc/<pid>/stat` (utime, stime, cutime,
/// cstime), in clock ticks (100 a second on Linux).
fn stat_ticks(pid: u32, n: usize) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    fields.iter().skip(11).take(n).filter_map(|t| t.parse::<u64>().ok()).sum()
}

/// The machine the figures were taken on: CPU model and memory.
pub(crate) fn uname() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default().lines().next().unwrap_or("").to_owned();
    format!("{cpu}, {}", mem.replace("MemTotal:", "memory").split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The machine line printed under the bench's title.
pub(crate) fn machine() -> String {
    format!("{} cores, {}", thread::available_parallelism().map(|n| n.get()).unwrap_or(0), uname())
}

/// A ratio as the tables print it: `1.23×`.
pub(crate) fn ratio(r: f64) -> String {
    format!("{r:.2}×")
}
