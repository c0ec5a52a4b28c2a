//! OpenTelemetry traces: kilnd exports spans per build, step, pull, push
//! and export over OTLP/HTTP, joined to the client's trace (TRACEPARENT),
//! received by a local OTLP receiver (scripts/otlp-receiver.py on the
//! OTLP project's own protobuf messages from PyPI).

use std::io::BufRead;
use std::process::{Command, Stdio};

use kiln_e2e::{Daemon, Registry, busybox_context, require_root, venv_tool};

struct Receiver {
    child: std::process::Child,
    port: u16,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/otlp-receiver.py");
        let mut child = Command::new(venv_tool("python3"))
            .arg(script)
            .arg("0")
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .expect("otlp receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said {line:?}"));
        Receiver {
            child,
            port,
            out,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn spans_for_build_steps_pull_push_and_export_join_the_clients_trace() {
    require_root!();
    let receiver = Receiver::start();
    let reg = Registry::start();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut d = Daemon::start_with(&["--otlp-endpoint", &endpoint]);
    let (trace_a, parent_a) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (trace_b, parent_b) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let image = format!("{}/traced/app:1", reg.addr);
    let ctx = busybox_context("FROM busybox\nRUN echo traced > /t\n", &[]);
    let o = d.kilnctl_env(
        &[
            "build",
            ctx.path().to_str().unwrap(),
            "-t",
            &image,
            "--push",
        ],
        &[("TRACEPARENT", &format!("00-{trace_a}-{parent_a}-01"))],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Another build pulls what the first pushed.
    d.ok(&["prune", "-a", "-f"]);
    let user = tempfile::tempdir().unwrap();
    std::fs::write(
        user.path().join("Dockerfile"),
        format!("FROM {image}\nRUN cat /t\n"),
    )
    .unwrap();
    let o = d.kilnctl_env(
        &["build", user.path().to_str().unwrap()],
        &[("TRACEPARENT", &format!("00-{trace_b}-{parent_b}-01"))],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A clean stop flushes what the batch processor holds.
    assert!(d.stop());
    let spans = receiver.spans();
    let in_trace = |t: &str| -> Vec<&serde_json::Value> {
        spans.iter().filter(|s| s["trace_id"] == t).collect()
    };
    let a = in_trace(trace_a);
    let solve = a
        .iter()
        .find(|s| s["name"] == "Solve")
        .unwrap_or_else(|| panic!("no Solve span in {spans:#?}"));
    assert_eq!(
        solve["parent_span_id"], parent_a,
        "a child of the client's span"
    );
    assert_eq!(solve["kind"], 2, "a server span");
    assert_eq!(solve["service_name"], "kilnd");
    let solve_id = solve["span_id"].as_str().unwrap();
    let run = a
        .iter()
        .find(|s| s["name"].as_str().unwrap().contains("RUN echo traced"))
        .unwrap_or_else(|| panic!("no step span in {a:#?}"));
    assert_eq!(run["parent_span_id"], solve_id, "{run}");
    assert_eq!(run["attributes"]["cached"], false);
    let export = a
        .iter()
        .find(|s| s["name"].as_str().unwrap().starts_with("pushing "))
        .unwrap_or_else(|| panic!("no export span in {a:#?}"));
    assert_eq!(export["parent_span_id"], solve_id);
    let push = a
        .iter()
        .find(|s| s["name"] == "push")
        .unwrap_or_else(|| panic!("no push span in {a:#?}"));
    assert_eq!(push["parent_span_id"], export["span_id"]);
    assert!(
        push["attributes"]["reference"]
            .as_str()
            .unwrap()
            .contains("traced/app")
    );
    // The second build's trace has its pulls.
    let b = in_trace(trace_b);
    assert!(
        b.iter()
            .any(|s| s["name"] == "Solve" && s["parent_span_id"] == parent_b)
    );
    let pull = b
        .iter()
        .find(|s| s["name"] == "pull")
        .unwrap_or_else(|| panic!("no pull span in {b:#?}"));
    assert!(
        pull["attributes"]["layer"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    // No span of either build leaked into a trace of its own.
    assert!(
        !spans
            .iter()
            .any(|s| s["name"] == "Solve" && s["parent_span_id"] == ""),
        "{spans:#?}"
    );
}
