//! Build progress displays, as buildx shows them: tty (a live view fitted to
//! the terminal), plain (CI logs, one line per event, log lines timed from
//! the step's start), rawjson (BuildKit's SolveStatus JSON, one object per
//! status message) and quiet. A failed build ends with the failing step's
//! last output between `------` rules, once.

pub(crate) mod rawjson;
mod sanitize;
mod tty;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::time::Instant;

use kiln_proto::control::StatusResponse;

use sanitize::LineSplitter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tty,
    Plain,
    RawJson,
    Quiet,
}

/// Lines of a step's output kept for the display and the error block.
const KEPT_LINES: usize = 10;

/// One step as the display knows it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Step {
    num: usize,
    name: String,
    /// Unix nanoseconds; 0 when not yet.
    started: i64,
    completed: i64,
    cached: bool,
    error: String,
    canceled: bool,
    /// The last lines of output, sanitised, with their time from the step's start.
    logs: VecDeque<(f64, String)>,
    splitter: LineSplitter,
    /// Why the step was not in the cache.
    cache_miss: String,
}

/// Everything the status stream said so far.
#[derive(Debug, Default)]
pub(crate) struct State {
    order: Vec<String>,
    by_digest: HashMap<String, Step>,
    warnings: Vec<String>,
    start: Option<Instant>,
    /// Set when the build failed.
    failed: Option<String>,
}

pub(crate) fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl State {
    pub(crate) fn steps(&self) -> impl Iterator<Item = &Step> {
        self.order.iter().filter_map(|d| self.by_digest.get(d))
    }

    fn elapsed(&self) -> f64 {
        self.start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0)
    }

    /// Applies one status message; returns the lines plain mode prints for
    /// it, each marked when it is a cache-miss explanation.
    pub(crate) fn apply(&mut self, m: &StatusResponse) -> Vec<(bool, String)> {
        self.start.get_or_insert_with(Instant::now);
        let mut plain = Vec::new();
        for v in &m.vertexes {
            if !v.cache_miss.is_empty() {
                if let Some(s) = self.by_digest.get_mut(&v.digest) {
                    s.cache_miss = v.cache_miss.clone();
                    plain.push((true, format!("#{} cache miss: {}", s.num, v.cache_miss)));
                }
                continue;
            }
            let num = self.by_digest.len() + 1;
            let known = self.by_digest.contains_key(&v.digest);
            if !known {
                self.order.push(v.digest.clone());
            }
            let s = self
                .by_digest
                .entry(v.digest.clone())
                .or_insert_with(|| Step {
                    num,
                    ..Default::default()
                });
            s.name = v.name.clone();
            if v.started > 0 {
                s.started = v.started;
            }
            s.completed = v.completed;
            s.cached = v.cached;
            s.error = v.error.clone();
            s.canceled = !v.error.is_empty() && v.error.contains("canceled");
            if v.completed == 0 {
                plain.push((false, format!("#{} {}", s.num, s.name)));
            } else if s.canceled {
                plain.push((false, format!("#{} CANCELED", s.num)));
            } else if !v.error.is_empty() {
                plain.push((false, format!("#{} ERROR: {}", s.num, v.error)));
            } else if v.cached {
                if !known {
                    plain.push((false, format!("#{} {}", s.num, s.name)));
                }
                plain.push((false, format!("#{} CACHED", s.num)));
            } else {
                plain.push((
                    false,
                    format!("#{} DONE {:.1}s", s.num, secs(v.completed - s.started)),
                ));
            }
        }
        for l in &m.logs {
            let Some(s) = self.by_digest.get_mut(&l.vertex) else {
                continue;
            };
            let at = if s.started > 0 && l.timestamp >= s.started {
                secs(l.timestamp - s.started)
            } else {
                0.0
            };
            for line in s.splitter.push(&l.msg) {
                plain.push((false, format!("#{} {at:.3} {line}", s.num)));
                s.logs.push_back((at, line));
                if s.logs.len() > KEPT_LINES {
                    s.logs.pop_front();
                }
            }
        }
        for w in &m.warnings {
            let msg = if w.location.is_empty() {
                w.short.clone()
            } else {
                format!("{} ({})", w.short, w.location)
            };
            plain.push((false, format!("WARNING: {msg}")));
            self.warnings.push(msg);
        }
        plain
    }

    /// The build ended: steps still running were canceled.
    fn finish(&mut self, error: Option<&str>) {
        self.failed = error.map(str::to_string);
        if self.failed.is_some() {
            let now = now_ns();
            for s in self.by_digest.values_mut() {
                if s.started > 0 && s.completed == 0 {
                    s.canceled = true;
                    s.completed = now;
                }
            }
        }
    }

    /// The failing step's last output between rules, as BuildKit ends a
    /// failed build (the error itself follows, once).
    fn error_block(&self) -> Vec<String> {
        let Some(s) = self.steps().find(|s| !s.error.is_empty() && !s.canceled) else {
            return Vec::new();
        };
        let mut out = vec!["------".to_string(), format!(" > {}:", s.name)];
        for (at, line) in &s.logs {
            out.push(format!("{at:.3} {line}"));
        }
        if let Some(p) = s.splitter.partial() {
            out.push(p.to_string());
        }
        out.push("------".to_string());
        out
    }
}

pub struct Display {
    mode: Mode,
    state: State,
    drawn_lines: usize,
    /// `--explain-cache`: say why each step that ran missed the cache.
    explain: bool,
}

impl Display {
    pub fn new(mode: Mode, explain: bool) -> Self {
        Display {
            mode,
            state: State::default(),
            drawn_lines: 0,
            explain,
        }
    }

    pub fn handle(&mut self, m: &StatusResponse) {
        match self.mode {
            Mode::RawJson => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", rawjson::solve_status(m));
                self.state.apply(m);
            }
            Mode::Plain => {
                let lines = self.state.apply(m);
                let mut err = std::io::stderr().lock();
                for (explanation, l) in lines {
                    if !explanation || self.explain {
                        let _ = writeln!(err, "{l}");
                    }
                }
            }
            Mode::Tty => {
                self.state.apply(m);
                self.draw(false);
            }
            Mode::Quiet => {
                self.state.apply(m);
            }
        }
    }

    /// A recorded build's progress as `--progress plain` showed it, into
    /// `out` (`kilnctl history logs`), with the error block if it failed.
    pub fn replay_plain(
        messages: &[StatusResponse],
        error: Option<&str>,
        out: &mut dyn Write,
    ) -> std::io::Result<()> {
        let mut state = State::default();
        for m in messages {
            for (explanation, l) in state.apply(m) {
                if !explanation {
                    writeln!(out, "{l}")?;
                }
            }
        }
        state.finish(error);
        for l in state.error_block() {
            writeln!(out, "{l}")?;
        }
        Ok(())
    }

    /// Redraws the live view (tty mode only).
    pub fn draw(&mut self, last: bool) {
        if self.mode != Mode::Tty {
            return;
        }
        let size = tty::terminal_size();
        let lines = tty::render(&self.state, size, now_ns(), last, self.explain);
        // Back to the previous frame's first line, then each line erased and
        // written over, and the previous frame's extra lines erased. Not one
        // erase-below from the top: terminals such as tmux move a screen
        // cleared that way into the scrollback, which fills it with frames.
        let mut frame = String::new();
        if self.drawn_lines > 0 {
            frame.push_str(&format!("\x1b[{}A", self.drawn_lines));
        }
        for l in &lines {
            frame.push_str("\r\x1b[2K");
            frame.push_str(l);
            frame.push('\n');
        }
        let extra = self.drawn_lines.saturating_sub(lines.len());
        if extra > 0 {
            for _ in 0..extra {
                frame.push_str("\r\x1b[2K\n");
            }
            frame.push_str(&format!("\x1b[{extra}A"));
        }
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(frame.as_bytes());
        let _ = err.flush();
        self.drawn_lines = lines.len();
    }

    /// The build ended (`error` when it failed): the last frame, the
    /// warnings, and the failing step's output once.
    pub fn finish(&mut self, error: Option<&str>) {
        self.state.finish(error);
        self.draw(true);
        if matches!(self.mode, Mode::RawJson | Mode::Quiet) {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.mode == Mode::Tty {
            for w in &self.state.warnings {
                let _ = writeln!(err, "WARNING: {w}");
            }
        }
        for l in self.state.error_block() {
            let _ = writeln!(err, "{l}");
        }
    }
}
