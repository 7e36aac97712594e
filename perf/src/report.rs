//! What a run produces: every sample, the Markdown tables built from them,
//! the headline ratios and the plots, written under
//! `perf/results/<date>/<time>-<suite>/` as `results.json`, `summary.md`
//! and PNG files; plus the progress bar on the terminal.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::plot;

/// Median, extremes and count of one measured quantity.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(v: &[f64]) -> Option<Stat> {
        if v.is_empty() {
            return None;
        }
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        // The median of an even count is the mean of the two middle ones.
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Stat { median, min: v[0], max: v[n - 1], n })
    }

    /// `median (min..max)` with `prec` decimals; the median alone for one sample.
    pub fn cell(&self, prec: usize) -> String {
        if self.n > 1 {
            format!("{:.p$} ({:.p$}..{:.p$})", self.median, self.min, self.max, p = prec)
        } else {
            format!("{:.p$}", self.median, p = prec)
        }
    }
}

/// A cell for an optional statistic: "skipped" when there is none.
pub fn cell(s: Option<Stat>, prec: usize) -> String {
    s.map_or_else(|| "skipped".to_string(), |s| s.cell(prec))
}

/// `a / b` of two medians, or "-".
pub fn ratio(a: Option<Stat>, b: Option<Stat>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.median != 0.0 => format!("{:.3}", a.median / b.median),
        _ => "-".to_string(),
    }
}

struct Sample {
    suite: String,
    case: String,
    system: String,
    metric: String,
    unit: String,
    value: f64,
}

struct Headline {
    suite: String,
    what: String,
    ours: String,
    peer: String,
    ratio: f64,
    better: &'static str,
}

pub struct Report {
    out: PathBuf,
    started: String,
    t0: Instant,
    argv: Vec<String>,
    quick: bool,
    reps: usize,
    machine: Value,
    versions: Value,
    samples: Vec<Sample>,
    tables: Vec<(String, String)>,
    headlines: Vec<Headline>,
    suites: Vec<Value>,
    plots: Vec<(String, String)>,
    notes: Vec<String>,
    suite: Option<(String, Instant)>,
    pb: Option<ProgressBar>,
}

/// UTC date and time of day as ("2026-11-23", "024001").
fn now_utc() -> (String, String) {
    civil(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64)
}

/// ("YYYY-MM-DD", "HHMMSS") of `t` seconds since the epoch, UTC.
fn civil(t: i64) -> (String, String) {
    let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (format!("{y:04}-{m:02}-{d:02}"), format!("{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60))
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let s = String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).into_owned();
    s.lines().next().map(|l| l.trim().to_string()).filter(|l| !l.is_empty())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// What the figures depend on: CPU, memory, kernel, the KVM flavour and
/// the filesystem the scratch files live on.
fn machine(scratch: &Path) -> Value {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string());
    let meminfo = read("/proc/meminfo");
    let mem_kib: Option<u64> = meminfo.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok());
    let kvm: Vec<&str> = ["kvm_intel", "kvm_amd", "kvm_pvm"].into_iter().filter(|m| Path::new("/sys/module").join(m).exists()).collect();
    let scratch_fs = first_line("findmnt", &["-n", "-o", "SOURCE,FSTYPE", "-T", &scratch.to_string_lossy()]);
    json!({
        "cpu_model": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_total_mib": mem_kib.map(|k| k / 1024),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "kvm_modules": kvm,
        "scratch_dir": scratch,
        "scratch_fs": scratch_fs,
        "thp": read("/sys/kernel/mm/transparent_hugepage/enabled").trim(),
    })
}

fn versions(root: &Path) -> Value {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let pkg = |p: &str| first_line("dpkg-query", &["-W", "-f", "${Version}", p]).filter(|v| !v.contains("no packages"));
    json!({
        "ringvm_commit": git(&["rev-parse", "--short=12", "HEAD"]).map(|c| if dirty { format!("{c}-dirty") } else { c }),
        "rustc": first_line("rustc", &["--version"]),
        "qemu": first_line("qemu-system-x86_64", &["--version"]),
        "fio": first_line("fio", &["--version"]),
        "nfs_ganesha": pkg("nfs-ganesha"),
        "libnfs": pkg("libnfs13").or_else(|| pkg("libnfs14")),
    })
}

impl Report {
    /// A report for `what` (the suite name or "all"), written under
    /// `results/<date>/<time>-<what>[-quick]/`.
    pub fn new(root: &Path, scratch: &Path, what: &str, quick: bool, reps: usize) -> Result<Report> {
        let (date, time) = now_utc();
        let out = root.join("perf/results").join(&date).join(format!("{time}-{what}{}", if quick { "-quick" } else { "" }));
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        Ok(Report {
            out,
            started: format!("{date}T{}:{}:{}Z", &time[0..2], &time[2..4], &time[4..6]),
            t0: Instant::now(),
            argv: std::env::args().collect(),
            quick,
            reps,
            machine: machine(scratch),
            versions: versions(root),
            samples: Vec::new(),
            tables: Vec::new(),
            headlines: Vec::new(),
            suites: Vec::new(),
            plots: Vec::new(),
            notes: Vec::new(),
            suite: None,
            pb: None,
        })
    }

    /// Starts a suite of about `steps` measurements (for the progress bar).
    pub fn begin(&mut self, suite: &str, steps: u64) {
        if let Some(old) = self.pb.take() {
            old.finish_and_clear();
        }
        self.enter(suite);
        let pb = ProgressBar::new(steps.max(1));
        pb.set_style(ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {elapsed_precise} {wide_msg}").unwrap().progress_chars("=> "));
        pb.set_prefix(suite.to_string());
        pb.enable_steady_tick(Duration::from_millis(250));
        self.pb = Some(pb);
    }

    /// Makes `suite` the current one (its clock starts unless it already
    /// is current).
    fn enter(&mut self, suite: &str) {
        if self.suite.as_ref().is_none_or(|s| s.0 != suite) {
            self.suite = Some((suite.to_string(), Instant::now()));
        }
    }

    /// One measurement begins; the previous one is done.
    pub fn step(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(pb) = &self.pb {
            if !pb.message().is_empty() {
                pb.inc(1);
            }
            pb.set_message(msg);
        }
    }

    /// A line for the terminal (above the progress bar).
    pub fn log(&self, msg: impl AsRef<str>) {
        match &self.pb {
            Some(pb) if !pb.is_hidden() => pb.println(msg.as_ref()),
            _ => eprintln!("{}", msg.as_ref()),
        }
    }

    fn suite_name(&self) -> String {
        self.suite.as_ref().map_or_else(|| "-".into(), |s| s.0.clone())
    }

    /// Ends the current suite as run.
    pub fn end(&mut self) {
        self.finish_suite("ran", None);
    }

    /// Ends (or replaces) the current suite as skipped, with the reason on
    /// the terminal and in the results.
    pub fn skip(&mut self, suite: &str, why: &str) {
        self.enter(suite);
        self.print(&format!("\n## {suite}: SKIPPED -- {why}\n"));
        self.finish_suite("skipped", Some(why));
    }

    fn finish_suite(&mut self, status: &str, why: Option<&str>) {
        if let Some(pb) = self.pb.take() {
            pb.finish_and_clear();
        }
        if let Some((name, t)) = self.suite.take() {
            self.suites.push(json!({"suite": name, "status": status, "why": why, "seconds": t.elapsed().as_secs_f64()}));
        }
    }

    /// A suite that failed: recorded, and the run goes on with the next.
    pub fn fail(&mut self, suite: &str, err: &anyhow::Error) {
        self.print(&format!("\n## {suite}: FAILED -- {err:#}\n"));
        self.enter(suite);
        self.finish_suite("failed", Some(&format!("{err:#}")));
    }

    pub fn failed(&self) -> Vec<String> {
        self.suites.iter().filter(|s| s["status"] == "failed").map(|s| s["suite"].as_str().unwrap_or("").to_string()).collect()
    }

    fn print(&self, s: &str) {
        match &self.pb {
            Some(pb) => pb.suspend(|| println!("{s}")),
            None => println!("{s}"),
        }
    }

    /// One measured value.
    pub fn sample(&mut self, case: &str, system: &str, metric: &str, unit: &str, value: f64) {
        self.samples.push(Sample { suite: self.suite_name(), case: case.into(), system: system.into(), metric: metric.into(), unit: unit.into(), value });
    }

    /// Statistics over the current suite's samples of (case, system, metric).
    pub fn stat(&self, case: &str, system: &str, metric: &str) -> Option<Stat> {
        let suite = self.suite_name();
        let v: Vec<f64> =
            self.samples.iter().filter(|s| s.suite == suite && s.case == case && s.system == system && s.metric == metric).map(|s| s.value).collect();
        Stat::of(&v)
    }

    /// A Markdown table, printed now and kept for summary.md.
    pub fn table(&mut self, title: &str, intro: &str, header: &[&str], rows: &[Vec<String>]) {
        let mut s = format!("## {title}\n\n");
        if !intro.is_empty() {
            s += intro.trim_end();
            s += "\n\n";
        }
        s += &format!("| {} |\n|{}\n", header.join(" | "), " --- |".repeat(header.len()));
        for r in rows {
            s += &format!("| {} |\n", r.join(" | "));
        }
        self.print(&s);
        self.tables.push((self.suite_name(), s));
    }

    /// A free-text remark kept in summary.md (e.g. why a peer's row failed).
    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        self.log(&s);
        self.notes.push(format!("{}: {s}", self.suite_name()));
    }

    /// A headline ratio: `ours` over `peer` (their medians), where
    /// `lower_is_better` says which direction favours ringvm. `ours.0` is
    /// the unit ("ms"), `peer.0` the peer's name and unit ("QEMU ms").
    pub fn headline(&mut self, what: &str, ours: (&str, Option<Stat>), peer: (&str, Option<Stat>), lower_is_better: bool) {
        if let (Some(a), Some(b)) = (ours.1, peer.1) {
            if b.median != 0.0 {
                self.headlines.push(Headline {
                    suite: self.suite_name(),
                    what: what.into(),
                    ours: format!("{} {}", fmt_num(a.median), ours.0),
                    peer: match peer.0.rsplit_once(' ') {
                        Some((name, unit)) => format!("{name} {} {unit}", fmt_num(b.median)),
                        None => format!("{} {}", fmt_num(b.median), peer.0),
                    },
                    ratio: a.median / b.median,
                    better: if lower_is_better { "lower" } else { "higher" },
                });
            }
        }
    }

    /// A line plot (one PNG, one panel per entry of `panels`).
    pub fn plot(&mut self, file: &str, title: &str, x: &str, y: &str, log2_x: bool, panels: Vec<plot::Panel>) {
        if panels.iter().all(|p| p.series.iter().all(|s| s.points.is_empty())) {
            return;
        }
        let path = self.out.join(file);
        match plot::lines(&path, title, x, y, log2_x, &panels) {
            Ok(()) => self.plots.push((file.to_string(), title.to_string())),
            Err(e) => self.note(format!("plot {file} not drawn: {e:#}")),
        }
    }

    /// Writes results.json and summary.md, prints the headline table and
    /// points `perf/results/latest` at this run.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.finish_suite("ran", None);
        let samples: Vec<Value> = self
            .samples
            .iter()
            .map(|s| json!({"suite": s.suite, "case": s.case, "system": s.system, "metric": s.metric, "unit": s.unit, "value": s.value}))
            .collect();
        let headlines: Vec<Value> = self
            .headlines
            .iter()
            .map(|h| json!({"suite": h.suite, "what": h.what, "ringvm": h.ours, "peer": h.peer, "ratio": h.ratio, "better": h.better}))
            .collect();
        let doc = json!({
            "started": self.started,
            "seconds": self.t0.elapsed().as_secs_f64(),
            "command": self.argv,
            "quick": self.quick,
            "repetitions": self.reps,
            "machine": self.machine,
            "versions": self.versions,
            "suites": self.suites,
            "headline": headlines,
            "tables": self.tables.iter().map(|t| json!({"suite": t.0, "markdown": t.1})).collect::<Vec<_>>(),
            "plots": self.plots.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
            "notes": self.notes,
            "samples": samples,
        });
        std::fs::write(self.out.join("results.json"), serde_json::to_string_pretty(&doc)?)?;

        let mut md = format!("# ringvm benchmarks, {}\n\n", self.started);
        md += &format!(
            "Command: `{}`{}. Repetitions: {} per figure (median, min..max), systems interleaved.\n\n",
            self.argv.join(" "),
            if self.quick { " (smoke run: not figures to quote)" } else { "" },
            self.reps
        );
        md += &format!("Machine: {}\n\nVersions: {}\n\n", self.machine, self.versions);
        md += "## Headline ratios\n\nringvm over its peer (medians); 'better' says which direction favours ringvm.\n\n| suite | figure | ringvm | peer | ratio | better |\n| --- | --- | --- | --- | --- | --- |\n";
        for h in &self.headlines {
            md += &format!("| {} | {} | {} | {} | {:.3} | {} |\n", h.suite, h.what, h.ours, h.peer, h.ratio, h.better);
        }
        md += "\n## Suites\n\n";
        for s in &self.suites {
            md += &format!(
                "- {}: {}{} ({:.0} s)\n",
                s["suite"].as_str().unwrap_or(""),
                s["status"].as_str().unwrap_or(""),
                s["why"].as_str().map(|w| format!(" -- {w}")).unwrap_or_default(),
                s["seconds"].as_f64().unwrap_or(0.0)
            );
        }
        md += "\n";
        for (_, t) in &self.tables {
            md += t;
            md += "\n";
        }
        if !self.plots.is_empty() {
            md += "## Plots\n\n";
            for (f, t) in &self.plots {
                md += &format!("![{t}]({f})\n\n");
            }
        }
        if !self.notes.is_empty() {
            md += "## Notes\n\n";
            for n in &self.notes {
                md += &format!("- {n}\n");
            }
        }
        std::fs::write(self.out.join("summary.md"), &md)?;

        println!("\n## Headline ratios (ringvm / peer, medians)\n");
        println!("| suite | figure | ringvm | peer | ratio | better |\n| --- | --- | --- | --- | --- | --- |");
        for h in &self.headlines {
            println!("| {} | {} | {} | {} | {:.3} | {} |", h.suite, h.what, h.ours, h.peer, h.ratio, h.better);
        }
        for s in &self.suites {
            if s["status"] != "ran" {
                println!("{}: {} -- {}", s["suite"].as_str().unwrap_or(""), s["status"].as_str().unwrap_or(""), s["why"].as_str().unwrap_or(""));
            }
        }
        let latest = self.out.parent().and_then(Path::parent).map(|p| p.join("latest"));
        if let Some(latest) = latest {
            let _ = std::fs::remove_file(&latest);
            let rel = self.out.strip_prefix(latest.parent().unwrap()).unwrap_or(&self.out).to_path_buf();
            let _ = std::os::unix::fs::symlink(rel, &latest);
        }
        println!("\nresults: {} (results.json, summary.md, {} plot(s))", self.out.display(), self.plots.len());
        Ok(self.out)
    }
}

/// A figure with 3 significant digits or so, for the headline table.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_min_max() {
        let s = Stat::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        let s = Stat::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.cell(1), "2.5 (1.0..4.0)");
        assert!(Stat::of(&[]).is_none());
        assert_eq!(ratio(Stat::of(&[2.0]), Stat::of(&[4.0])), "0.500");
        assert_eq!(ratio(Stat::of(&[2.0]), None), "-");
    }

    #[test]
    fn civil_date() {
        let day = 86_400;
        assert_eq!(civil(0), ("1970-01-01".into(), "000000".into()));
        assert_eq!(civil(day - 1), ("1970-01-01".into(), "235959".into()));
        // 2000-02-29 (a leap day in a year divisible by 400), 12:34:56.
        assert_eq!(civil(951_782_400 + 12 * 3600 + 34 * 60 + 56), ("2000-02-29".into(), "123456".into()));
        assert_eq!(civil(951_782_400 + day), ("2000-03-01".into(), "000000".into()));
        // 2100 is not a leap year: 28 February is followed by 1 March.
        assert_eq!(civil(4_107_456_000), ("2100-02-28".into(), "000000".into()));
        assert_eq!(civil(4_107_456_000 + day), ("2100-03-01".into(), "000000".into()));
        // Before the epoch.
        assert_eq!(civil(-1), ("1969-12-31".into(), "235959".into()));
        let (d, t) = now_utc();
        assert_eq!((d.len(), t.len()), (10, 6));
    }
}
