//! Build progress displays: tty (live, compact), plain (CI logs), rawjson
//! (one JSON object per event) and quiet.

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use kiln_proto::control::StatusResponse;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tty,
    Plain,
    RawJson,
    Quiet,
}

#[derive(Default, Clone)]
struct V {
    num: usize,
    name: String,
    started: i64,
    completed: i64,
    cached: bool,
    error: String,
    logs: Vec<String>,
    /// Why the step was not in the cache.
    cache_miss: String,
}

pub struct Display {
    mode: Mode,
    start: Instant,
    order: Vec<String>,
    vertices: HashMap<String, V>,
    drawn_lines: usize,
    warnings: Vec<String>,
    /// `--explain-cache`: say why each step that ran missed the cache.
    explain: bool,
}

fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

impl Display {
    pub fn new(mode: Mode, explain: bool) -> Self {
        Display {
            explain,
            mode,
            start: Instant::now(),
            order: Vec::new(),
            vertices: HashMap::new(),
            drawn_lines: 0,
            warnings: Vec::new(),
        }
    }

    pub fn handle(&mut self, m: &StatusResponse) {
        let mut err = std::io::stderr().lock();
        if self.mode == Mode::RawJson {
            let mut out = std::io::stdout().lock();
            for v in &m.vertexes {
                if !v.cache_miss.is_empty() {
                    let j = serde_json::json!({"digest": v.digest, "cache_miss": v.cache_miss});
                    let _ = writeln!(out, "{j}");
                    continue;
                }
                let j = serde_json::json!({
                    "digest": v.digest, "name": v.name, "inputs": v.inputs, "cached": v.cached,
                    "started": if v.started > 0 { Some(v.started) } else { None },
                    "completed": if v.completed > 0 { Some(v.completed) } else { None },
                    "error": if v.error.is_empty() { None } else { Some(&v.error) },
                });
                let _ = writeln!(out, "{j}");
            }
            for l in &m.logs {
                let j = serde_json::json!({"vertex": l.vertex, "stream": l.stream, "data": String::from_utf8_lossy(&l.msg), "timestamp": l.timestamp});
                let _ = writeln!(out, "{j}");
            }
            for w in &m.warnings {
                let j = serde_json::json!({"warning": w.short, "location": w.location, "vertex": w.vertex});
                let _ = writeln!(out, "{j}");
            }
            return;
        }
        for v in &m.vertexes {
            if !v.cache_miss.is_empty() {
                if let Some(e) = self.vertices.get_mut(&v.digest) {
                    e.cache_miss = v.cache_miss.clone();
                    if self.explain && self.mode == Mode::Plain {
                        let _ = writeln!(err, "#{} cache miss: {}", e.num, v.cache_miss);
                    }
                }
                continue;
            }
            let n = self.vertices.len() + 1;
            let known = self.vertices.contains_key(&v.digest);
            let e = self.vertices.entry(v.digest.clone()).or_insert_with(|| V {
                num: n,
                ..Default::default()
            });
            if !known {
                self.order.push(v.digest.clone());
            }
            e.name = v.name.clone();
            if v.started > 0 {
                e.started = v.started;
            }
            e.completed = v.completed;
            e.cached = v.cached;
            e.error = v.error.clone();
            if self.mode == Mode::Plain {
                if v.completed == 0 {
                    let _ = writeln!(err, "#{} {}", e.num, e.name);
                } else if !v.error.is_empty() {
                    let _ = writeln!(err, "#{} ERROR: {}", e.num, v.error);
                } else if v.cached {
                    if !known {
                        let _ = writeln!(err, "#{} {}", e.num, e.name);
                    }
                    let _ = writeln!(err, "#{} CACHED", e.num);
                } else {
                    let _ = writeln!(err, "#{} DONE {:.1}s", e.num, secs(v.completed - e.started));
                }
            }
        }
        for l in &m.logs {
            let text = String::from_utf8_lossy(&l.msg).to_string();
            if let Some(e) = self.vertices.get_mut(&l.vertex) {
                for line in text.lines() {
                    if self.mode == Mode::Plain {
                        let _ = writeln!(
                            err,
                            "#{} {:.3} {line}",
                            e.num,
                            self.start.elapsed().as_secs_f64()
                        );
                    }
                    e.logs.push(line.to_string());
                    if e.logs.len() > 6 {
                        e.logs.remove(0);
                    }
                }
            }
        }
        for w in &m.warnings {
            let msg = if w.location.is_empty() {
                w.short.clone()
            } else {
                format!("{} ({})", w.short, w.location)
            };
            if self.mode == Mode::Plain {
                let _ = writeln!(err, "WARNING: {msg}");
            }
            self.warnings.push(msg);
        }
        if self.mode == Mode::Tty {
            drop(err);
            self.draw(false);
        }
    }

    /// Redraws the live view (tty mode only).
    pub fn draw(&mut self, last: bool) {
        if self.mode != Mode::Tty {
            return;
        }
        let mut lines = Vec::new();
        let done = self
            .order
            .iter()
            .filter(|d| self.vertices[*d].completed > 0)
            .count();
        lines.push(format!(
            "[+] Building {:.1}s ({}/{}){}",
            self.start.elapsed().as_secs_f64(),
            done,
            self.order.len(),
            if last { " FINISHED" } else { "" }
        ));
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        for d in &self.order {
            let v = &self.vertices[d];
            let status = if !v.error.is_empty() {
                " ERROR".to_string()
            } else if v.cached {
                " CACHED".to_string()
            } else if v.completed > 0 {
                format!(" {:.1}s", secs(v.completed - v.started))
            } else {
                format!(" {:.1}s", secs(now_ns - v.started))
            };
            lines.push(format!(" => {}{}", v.name, status));
            if self.explain && !v.cache_miss.is_empty() {
                lines.push(format!(" => => cache miss: {}", v.cache_miss));
            }
            if v.completed == 0 || !v.error.is_empty() {
                for l in &v.logs {
                    lines.push(format!(" => => {l}"));
                }
            }
        }
        let mut err = std::io::stderr().lock();
        if self.drawn_lines > 0 {
            let _ = write!(err, "\x1b[{}A\x1b[J", self.drawn_lines);
        }
        for l in &lines {
            let _ = writeln!(err, "{l}");
        }
        self.drawn_lines = lines.len();
        if last {
            for w in &self.warnings {
                let _ = writeln!(err, "WARNING: {w}");
            }
        }
    }
}
