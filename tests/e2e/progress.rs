//! The progress display in a real terminal (tmux): frames fitted to the
//! pane, no stale headers, step output sanitised, a failed step's output
//! shown once; plain mode as BuildKit prints it.

use std::process::Command;
use std::time::{Duration, Instant};

use kiln_e2e::{Daemon, bin, busybox_context, require_root};

/// A build of many steps, one printing a `\r` progress bar in colour.
fn long_build() -> tempfile::TempDir {
    let mut df = String::new();
    df.push_str("FROM busybox\n");
    df.push_str("RUN printf 'progress 10%%\\rprogress 50%%\\r\\033[31mred\\033[0m done\\n'\n");
    for i in 0..30 {
        // Each step sleeps a little so frames are drawn while steps run.
        df.push_str(&format!(
            "RUN echo step {i} with a long line of output that is wider than any terminal it will be shown in, by a lot && sleep 0.05\n"
        ));
    }
    busybox_context(&df, &[])
}

fn tmux(args: &[&str]) -> String {
    let o = Command::new("tmux").args(args).output().expect("tmux");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `kilnctl ARGS` in a detached tmux pane of `w`×`h` and returns the
/// whole pane (history included, wrapped lines joined, escapes kept) once
/// it finished.
fn in_tmux(d: &Daemon, args: &[&str], size: (u16, u16)) -> String {
    in_tmux_resized(d, args, size, None)
}

/// As [`in_tmux`], resizing the window to `resize` one second in.
fn in_tmux_resized(
    d: &Daemon,
    args: &[&str],
    (w, h): (u16, u16),
    resize: Option<(u16, u16)>,
) -> String {
    let session = format!("kiln-progress-{}-{w}x{h}", std::process::id());
    let done = d.dir.path().join(format!("{session}.done"));
    let mut cmd = format!("{} --addr {}", bin("kilnctl").display(), d.addr);
    for a in args {
        cmd.push_str(&format!(" '{a}'"));
    }
    let script = format!("{cmd}; echo $? > {}; sleep 60", done.display());
    let _ = tmux(&["kill-session", "-t", &session]);
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        &w.to_string(),
        "-y",
        &h.to_string(),
        "sh",
        "-c",
        &script,
    ]);
    let start = Instant::now();
    if let Some((w2, h2)) = resize {
        std::thread::sleep(Duration::from_secs(1));
        tmux(&[
            "resize-window",
            "-t",
            &session,
            "-x",
            &w2.to_string(),
            "-y",
            &h2.to_string(),
        ]);
    }
    while !done.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the build in tmux did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pane = tmux(&["capture-pane", "-p", "-e", "-J", "-S", "-", "-t", &session]);
    let _ = tmux(&["kill-session", "-t", &session]);
    pane
}

/// The pane's text without tmux's own escapes (its colour of the text).
fn plain_text(pane: &str) -> String {
    let mut out = String::new();
    let mut chars = pane.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn tty_progress_fits_the_terminal_and_leaves_no_stale_frames() {
    require_root!();
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("tmux is missing: apt-get install tmux (scripts/test.sh does)");
    }
    let d = Daemon::start();
    let ctx = long_build();
    let out = tempfile::tempdir().unwrap();
    for (w, h) in [(80u16, 24u16), (60, 20)] {
        let dest = out.path().join(format!("{w}x{h}"));
        let pane = in_tmux(
            &d,
            &[
                "build",
                ctx.path().to_str().unwrap(),
                "--progress",
                "tty",
                "--no-cache",
                "-o",
                dest.to_str().unwrap(),
            ],
            (w, h),
        );
        // The step's colour codes were dropped, not passed through.
        assert!(
            !pane.contains("\u{1b}[31m"),
            "colour passed through:\n{pane}"
        );
        let text = plain_text(&pane);
        let headers = text
            .lines()
            .filter(|l| l.starts_with("[+] Building"))
            .count();
        assert_eq!(headers, 1, "{w}x{h}: stale frames left behind:\n{text}");
        for l in text.lines() {
            assert!(
                l.chars().count() <= w as usize,
                "{w}x{h}: a line wider than the terminal ({}): {l:?}",
                l.chars().count()
            );
        }
        assert!(text.contains("FINISHED"), "{text}");
        // The last frame lists every step, with BuildKit's labels.
        assert!(text.contains("[stage-1  1/31] RUN printf"), "{text}");
        assert!(text.contains("[stage-1 31/31] RUN echo step 29"), "{text}");
        assert!(
            !text
                .lines()
                .any(|l| l.contains("progress 10%") && !l.contains("printf")),
            "{text}"
        );
    }
}

#[test]
fn a_resize_refits_the_next_frames() {
    require_root!();
    let d = Daemon::start();
    let mut df = String::from("FROM busybox\n");
    for i in 0..12 {
        df.push_str(&format!(
            "RUN echo step {i} with a long line of output that is wider than fifty columns && sleep 0.25\n"
        ));
    }
    let ctx = busybox_context(&df, &[]);
    let out = tempfile::tempdir().unwrap();
    let pane = in_tmux_resized(
        &d,
        &[
            "build",
            ctx.path().to_str().unwrap(),
            "--progress",
            "tty",
            "--no-cache",
            "-o",
            out.path().to_str().unwrap(),
        ],
        (100, 30),
        Some((50, 20)),
    );
    let text = plain_text(&pane);
    // The frames after the resize, the last one included, fit 50 columns.
    // (What the terminal did to the frame on screen when it narrowed, tmux
    // rewraps it and may push it into the scrollback, is not the display's
    // to undo, as with BuildKit's.)
    let last = text.rfind("[+] Building").unwrap();
    for l in text[last..].lines() {
        assert!(
            l.chars().count() <= 50,
            "wider than the resized terminal: {l:?}"
        );
    }
    assert!(text.contains("FINISHED"), "{text}");
}

#[test]
fn a_failed_step_shows_its_output_once_and_running_ones_are_canceled() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox AS slow\nRUN sleep 5\nFROM busybox\nCOPY --from=slow /etc/passwd /p\nFROM busybox AS bad\nRUN echo boom-output && exit 3\nFROM busybox\nCOPY --from=bad /etc/passwd /a\nCOPY --from=slow /etc/passwd /b\n",
        &[],
    );
    let pane = in_tmux(
        &d,
        &["build", ctx.path().to_str().unwrap(), "--progress", "tty"],
        (100, 40),
    );
    let text = plain_text(&pane);
    // The output line (not the command that prints it) is shown once.
    let shown = text
        .lines()
        .filter(|l| l.trim_end().ends_with("boom-output") && !l.contains("echo"))
        .count();
    assert_eq!(shown, 1, "{text}");
    assert!(
        text.contains("------\n > [bad 1/1] RUN echo boom-output"),
        "{text}"
    );
    assert!(
        text.contains("CANCELED"),
        "the sleeping step was not shown canceled:\n{text}"
    );
    assert!(text.contains("ERROR"), "{text}");
}

#[test]
fn plain_progress_times_output_from_the_step_start_and_sanitises_it() {
    require_root!();
    let d = Daemon::start();
    let ctx = busybox_context(
        "FROM busybox\nRUN printf 'progress 10%%\\rprogress 50%%\\r\\033[31mred\\033[0m done\\n'\n",
        &[],
    );
    let o = d.ok(&["build", ctx.path().to_str().unwrap(), "--progress", "plain"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains('\u{1b}'), "{err}");
    let line = err
        .lines()
        .find(|l| l.ends_with(" red done"))
        .unwrap_or_else(|| panic!("{err}"));
    // `#N 0.123 red done`: seconds since the step started.
    let secs: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(secs < 30.0, "{line}");
    // The bar's earlier states (not the command that prints them) are gone.
    assert!(
        !err.lines()
            .any(|l| l.contains("progress 10%") && !l.contains("printf")),
        "{err}"
    );
    assert!(err.contains("[busybox 2/3] RUN"), "{err}");
}
