//! The live view: one frame per tick, fitted to the terminal. Every line is
//! cut to the width (so nothing wraps and the cursor arithmetic that erases
//! the previous frame stays right) and the frame is at most one line less
//! than the height (so nothing scrolls out of reach): when there are more
//! steps than rows, finished steps are hidden first, then log lines, then
//! the oldest running steps. The last frame is printed whole.

use unicode_width::UnicodeWidthChar;

use super::{State, Step, secs};

/// Log lines shown under a running step.
pub const LOG_TAIL: usize = 6;

/// The terminal's size (columns, rows) from stderr, else $COLUMNS/$LINES,
/// else 80×24; read every frame, so a resize re-fits the next one.
pub fn terminal_size() -> (usize, usize) {
    if let Ok(ws) = rustix::termios::tcgetwinsize(std::io::stderr())
        && ws.ws_col > 0
        && ws.ws_row > 0
    {
        return (ws.ws_col as usize, ws.ws_row as usize);
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n: &usize| *n > 0)
            .unwrap_or(d)
    };
    (env("COLUMNS", 80), env("LINES", 24))
}

/// `s` cut to at most `width` columns.
pub fn cut(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > width {
            break;
        }
        used += w;
        out.push(c);
    }
    out
}

fn display_width(s: &str) -> usize {
    s.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// `left` and `right` on one line of `width` columns: `right` aligned to
/// the right edge, `left` cut to make room.
fn aligned(left: &str, right: &str, width: usize) -> String {
    let rw = display_width(right);
    if rw + 2 > width {
        return cut(left, width);
    }
    let left = cut(left, width - rw - 1);
    let pad = width - rw - display_width(&left);
    format!("{left}{}{right}", " ".repeat(pad))
}

fn status(step: &Step, now_ns: i64) -> (&'static str, String) {
    let took = |end: i64| format!("{:.1}s", secs(end.saturating_sub(step.started).max(0)));
    if step.canceled {
        ("CANCELED ", took(step.completed.max(step.started)))
    } else if !step.error.is_empty() {
        ("ERROR ", took(step.completed))
    } else if step.cached {
        ("CACHED ", "0.0s".into())
    } else if step.completed > 0 {
        ("", took(step.completed))
    } else if step.started > 0 {
        ("", took(now_ns))
    } else {
        ("", String::new())
    }
}

/// One frame: the header, then each step (a running step with its last log
/// lines). `last`: the whole list, nothing hidden.
pub fn render(
    state: &State,
    (width, height): (usize, usize),
    now_ns: i64,
    last: bool,
    explain: bool,
) -> Vec<String> {
    let width = width.saturating_sub(1).max(10);
    let done = state.steps().filter(|s| s.completed > 0).count();
    let header = format!(
        "[+] Building {:.1}s ({}/{}){}",
        state.elapsed(),
        done,
        state.order.len(),
        if last && state.failed.is_none() {
            " FINISHED"
        } else {
            ""
        }
    );
    // (finished, step line, detail lines)
    let mut blocks: Vec<(bool, String, Vec<String>)> = Vec::new();
    for step in state.steps() {
        let (prefix, time) = status(step, now_ns);
        let line = aligned(&format!(" => {prefix}{}", step.name), &time, width);
        let mut detail = Vec::new();
        if explain && !step.cache_miss.is_empty() {
            detail.push(cut(
                &format!(" => => cache miss: {}", step.cache_miss),
                width,
            ));
        }
        let running = step.completed == 0 && step.started > 0;
        if running && !last {
            let partial = step.splitter.partial().map(str::to_string);
            let lines: Vec<&String> = step
                .logs
                .iter()
                .map(|(_, l)| l)
                .chain(partial.as_ref())
                .collect();
            for l in &lines[lines.len().saturating_sub(LOG_TAIL)..] {
                detail.push(cut(&format!(" => => # {l}"), width));
            }
        }
        blocks.push((step.completed > 0, line, detail));
    }
    let mut lines = vec![cut(&header, width)];
    if !last {
        // The header and the blocks take at most height - 1 lines, so the
        // line after the frame is still on the screen.
        let room = height.saturating_sub(2).max(1);
        let count = |b: &[(bool, String, Vec<String>)]| {
            b.iter().map(|(_, _, d)| 1 + d.len()).sum::<usize>()
        };
        // Finished steps go first, oldest first...
        while count(&blocks) > room {
            match blocks.iter().position(|b| b.0) {
                Some(i) => {
                    blocks.remove(i);
                }
                None => break,
            }
        }
        // ...then log lines, then the oldest running steps.
        while count(&blocks) > room {
            match blocks.iter_mut().find(|b| b.2.len() > 1) {
                Some(b) => {
                    b.2.remove(0);
                }
                None => break,
            }
        }
        while count(&blocks) > room {
            match blocks.iter_mut().find(|b| !b.2.is_empty()) {
                Some(b) => b.2.clear(),
                None => {
                    blocks.remove(0);
                }
            }
        }
    }
    for (_, line, detail) in blocks {
        lines.push(line);
        lines.extend(detail);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::control::{StatusResponse, Vertex, VertexLog};

    fn state_with(n: usize, running_from: usize) -> State {
        let mut st = State::default();
        let mut m = StatusResponse::default();
        for i in 0..n {
            m.vertexes.push(Vertex {
                digest: format!("sha256:{i}"),
                name: format!("[{}/{n}] RUN step number {i} with a long command line that goes on and on and on", i + 1),
                started: 1_000_000_000,
                completed: if i < running_from { 2_000_000_000 } else { 0 },
                ..Default::default()
            });
        }
        m.logs.push(VertexLog {
            vertex: format!("sha256:{}", n - 1),
            timestamp: 1_500_000_000,
            stream: 1,
            msg: b"a\nb\nc\nd\ne\nf\ng\nprogress 10%\rprogress 90%".to_vec(),
        });
        st.apply(&m);
        st
    }

    #[test]
    fn frames_fit_the_terminal() {
        for (w, h) in [(80, 24), (60, 20), (40, 10)] {
            let st = state_with(30, 27);
            let frame = render(&st, (w, h), 3_000_000_000, false, false);
            assert!(frame.len() < h, "{w}x{h}: {} lines", frame.len());
            assert!(frame.iter().all(|l| display_width(l) < w), "{frame:#?}");
            assert!(frame[0].starts_with("[+] Building"));
            // The running steps stay; finished ones made room.
            assert!(frame.iter().any(|l| l.contains("step number 29")));
            let last = render(&st, (w, h), 3_000_000_000, true, false);
            assert_eq!(last.len(), 31, "the last frame lists every step");
        }
        // The log tail of a running step, a \r progress bar as its last state.
        let st = state_with(3, 2);
        let frame = render(&st, (80, 24), 3_000_000_000, false, false);
        let logs: Vec<&String> = frame.iter().filter(|l| l.contains("=> => #")).collect();
        assert_eq!(logs.len(), LOG_TAIL);
        assert!(logs.last().unwrap().ends_with("progress 90%"));
        // Times are right-aligned in one column.
        let ends: Vec<usize> = frame[1..]
            .iter()
            .filter(|l| l.ends_with('s') && !l.contains('#'))
            .map(|l| display_width(l))
            .collect();
        assert!(ends.iter().all(|e| *e == 79), "{frame:#?}");
    }

    #[test]
    fn wide_characters_are_counted_as_wide() {
        assert_eq!(display_width(&cut("日本語のテキスト", 7)), 6);
        assert_eq!(aligned("abc", "1.0s", 10), "abc   1.0s");
    }
}
